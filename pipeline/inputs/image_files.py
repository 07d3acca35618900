"""Image files as input: a directory or glob of image files, or a Parquet/CSV/JSONL list of image paths or URLs,
split into deterministic virtual shards that the job commits, resumes and checks like tar shards.

- ``expand_image_input`` lists one input (recursively for a directory, on any fsspec filesystem), sorts it by the
  files' names relative to the input root, and cuts it into shards of ``images_per_shard`` files named
  ``<root>-img-000000``, ``<root>-img-000001``, ... A shard's ``url`` names the input, the file range and a digest
  of its files' names, so a resume against a listing that has changed is caught instead of mixing two listings.
- A file's sample key is its path relative to the input root (with its extension: ``a/b.jpg``), the name the
  exports use; for a URL list it is the URL as listed. A ``<stem>.json`` beside an image is that image's sidecar
  (prompts), as in a WebDataset tar; every other file is a sample of its own, so a file that is not an image gets
  a ``decode_error`` row. Names starting with a dot (``.DS_Store``, ``.git/``) are skipped.
- ``FileListReader`` reads a virtual shard's files one by one (retrying transient errors). A file that is gone or
  cannot be read for good becomes a sample with an error (its own ``decode_error`` row); a read that keeps failing
  for a transient reason ends the shard as ``read_failed``, so it is retried rather than committed.

No Ray, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
import fsspec

from pipeline.inputs.shard_io import (
    _SAFE,
    DEFAULT_MAX_MEMBER_BYTES,
    Sample,
    ShardReadReport,
    ShardRef,
    _is_transient,
    _with_protocol,
    open_with_retry,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_URL_COLUMN = "url"
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
VIRTUAL_MARK = "#images="


def is_table_list(url: str) -> bool:
    """Whether ``url`` names a Parquet/CSV/JSONL list of image paths or URLs (by its suffix)."""
    return url.lower().split("?", 1)[0].endswith(TABLE_SUFFIXES)


def is_virtual(ref: ShardRef) -> bool:
    """Whether ``ref`` is a virtual shard of image files (not a tar)."""
    return bool(ref.members)


def _image_extensions() -> tuple[str, ...]:
    from pipeline.inputs.decode import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _extension(name: str) -> str:
    base = posixpath.basename(name.split("?", 1)[0])
    return base.rsplit(".", 1)[-1].lower() if "." in base.lstrip(".") else ""


def _stem(relative: str) -> str:
    head, base = posixpath.split(relative)
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return posixpath.join(head, stem)


def _root_name(url: str) -> str:
    base = posixpath.basename(url.rstrip("/").split("?", 1)[0]) or "images"
    if is_table_list(base) or _extension(base) in _image_extensions():
        base = base.rsplit(".", 1)[0]
    name = _SAFE.sub("_", base).strip("_") or "images"
    return "_" + name if name.startswith(".") else name


def list_image_files(url: str, storage_options: dict | None = None) -> list[tuple[str, str, list[str], int]]:
    """The samples of a directory, glob or single file ``url``: ``(key, image URL, sidecar URLs, bytes)`` sorted by
    key (the path relative to the input root; the file name for a single file). Hidden names are skipped."""
    storage_options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if any(c in path for c in "*?["):
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = {p: info for p, info in fs.find(path, detail=True).items() if info.get("type") != "directory"}
    else:
        root = posixpath.dirname(path.rstrip("/"))
        found = {path: fs.info(path)}
    files: dict[str, tuple[str, int]] = {}
    for p, info in found.items():
        rel = posixpath.relpath(p, root) if root else p.lstrip("/")
        if rel.startswith("../"):
            rel = posixpath.basename(p)
        if not _hidden(rel):
            files[rel] = (_with_protocol(url, p), int(info.get("size") or 0))
    hidden = len(found) - len(files)
    if hidden:
        logger.info("%s: skipped %d hidden file(s) (names starting with a dot)", url, hidden)
    from pipeline.inputs.decode import IMAGE_EXTENSIONS

    images_by_stem = {}
    for rel in files:
        if _extension(rel) in IMAGE_EXTENSIONS:
            images_by_stem.setdefault(_stem(rel), []).append(rel)
    out = []
    for rel in sorted(files):
        if _extension(rel) == "json" and _stem(rel) in images_by_stem:
            continue  # the sidecar of an image beside it
        sidecars = []
        if _extension(rel) in IMAGE_EXTENSIONS:
            side = _stem(rel) + ".json"
            if side in files and images_by_stem[_stem(rel)][0] == rel:
                sidecars.append(files[side][0])
        out.append((rel, files[rel][0], sidecars, files[rel][1]))
    return out


def read_url_list(url: str, column: str = DEFAULT_URL_COLUMN,
                  storage_options: dict | None = None) -> list[tuple[str, str]]:
    """``(key, image URL)`` for each row of a Parquet, CSV or JSONL list, in row order. Relative paths are taken
    relative to the list's own location; keys are the entries as written (made unique with ``#<row>`` when an
    entry repeats). Raises ``ValueError`` naming the column when it is missing, and for empty entries."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    from pipeline.inputs.parquet import arrow_buffer, parquet_from_bytes

    storage_options = dict(storage_options or {})
    lower = url.lower().split("?", 1)[0]
    with fsspec.open(url, "rb", **storage_options) as fh:
        data = fh.read()
    try:
        if lower.endswith(".parquet"):
            table = parquet_from_bytes(data)
        elif lower.endswith(".csv"):
            table = pacsv.read_csv(pa.BufferReader(arrow_buffer(data)))
        else:
            table = pajson.read_json(pa.BufferReader(arrow_buffer(data)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"--input {url}: cannot read it as a {lower.rsplit('.', 1)[-1]} list: {exc}") from None
    if column not in table.column_names:
        raise ValueError(f"--input {url} has no column {column!r} (columns: {', '.join(table.column_names)}); "
                         "name the one with image paths or URLs with --url-column")
    entries = table.column(column).to_pylist()
    parent = url.rsplit("/", 1)[0] if "/" in url else "."
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for row, entry in enumerate(entries):
        if entry is None or not str(entry).strip():
            raise ValueError(f"--input {url}: row {row} of column {column!r} is empty")
        entry = str(entry).strip()
        target = entry if "://" in entry or entry.startswith("/") else f"{parent}/{entry}"
        key = entry if entry not in seen else f"{entry}#{row}"
        seen[entry] = row
        out.append((key, target))
    return out


def _digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:12]


def expand_image_input(url: str, storage_options: dict | None = None, *,
                       images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
                       url_column: str = DEFAULT_URL_COLUMN, prefix: str | None = None) -> list[ShardRef]:
    """Virtual shards of one image input (a directory, a glob of image files, one image file, or a URL list).
    Raises ``ValueError`` when it holds no files."""
    if images_per_shard < 1:
        raise ValueError(f"--images-per-shard must be at least 1, got {images_per_shard}")
    if is_table_list(url):
        listed = [(key, target, [], 0) for key, target in read_url_list(url, url_column, storage_options)]
    else:
        listed = list_image_files(url, storage_options)
    if not listed:
        raise ValueError(f"--input {url} holds no files")
    stem = prefix or _root_name(url)
    refs = []
    for index, start in enumerate(range(0, len(listed), images_per_shard)):
        part = listed[start:start + images_per_shard]
        keys = [k for k, _, _, _ in part]
        refs.append(ShardRef(
            url=f"{url}{VIRTUAL_MARK}{start}-{start + len(part) - 1};sha1={_digest(keys)}",
            name=f"{stem}-img-{index:06d}",
            members=tuple(t for _, t, _, _ in part), keys=tuple(keys),
            sidecars=tuple(tuple(s) for _, _, s, _ in part), sizes=tuple(n for _, _, _, n in part),
        ))
    return refs


class FileListReader:
    """Iterator over the ``Sample``s of a virtual shard; ``report`` is set once iteration ends (or ``close``)."""

    def __init__(self, ref: ShardRef, storage_options: dict | None = None, *, shard: str | None = None,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, open_retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        self.ref = ref
        self.storage_options = dict(storage_options or {})
        self.shard = shard or ref.name
        self.max_member_bytes = max_member_bytes
        self.open_retries, self.backoff_s = open_retries, backoff_s
        self.report: ShardReadReport | None = None
        self._closed = False
        self._it = self._run()

    def __iter__(self) -> FileListReader:
        return self

    def __next__(self) -> Sample:
        return next(self._it)

    def close(self) -> None:
        self._closed = True
        if self.report is None:
            self.report = ShardReadReport(samples_read=0, truncated=False, error="closed before the end",
                                          expected=len(self.ref.members), url=self.ref.url)

    def _read(self, url: str) -> bytes:
        with open_with_retry(url, self.storage_options, retries=self.open_retries, backoff_s=self.backoff_s) as fh:
            data = fh.read(self.max_member_bytes + 1)
        if len(data) > self.max_member_bytes:
            raise _TooLarge(f"{len(data) - 1}+ bytes, over the {self.max_member_bytes}-byte member limit")
        return data

    def _run(self) -> Iterator[Sample]:
        from pipeline.inputs.decode import IMAGE_EXTENSIONS

        read = nbytes = 0
        failed: str | None = None
        sidecars = self.ref.sidecars or tuple(() for _ in self.ref.members)
        for key, url, side in zip(self.ref.keys, self.ref.members, sidecars):
            if self._closed:
                return
            ext = _extension(url) or _extension(key)
            sample = Sample(key=key, files={}, shard=self.shard, source_name=key)
            try:
                data = self._read(url)
                nbytes += len(data)
                if ext in _image_extensions():
                    sample.files[ext] = data
                else:
                    sample.files[ext or "bin"] = data
                    shown = f"extension .{ext}" if ext else "no extension"
                    sample.errors.append(f"{key}: not an image file ({shown}; decoded: "
                                         f"{', '.join(IMAGE_EXTENSIONS)})")
                for side_url in side:
                    sample.files["json"] = self._read(side_url)
            except _TooLarge as exc:
                sample.errors.append(f"{key}: {exc}; not read")
            except Exception as exc:  # noqa: BLE001 - each file's failure is its own row, or the shard's retry
                if _is_transient(exc):
                    failed = f"reading {url} kept failing: {type(exc).__name__}: {exc}"
                    break
                sample.errors.append(f"{key}: could not read the file: {type(exc).__name__}: {exc}")
            read += 1
            yield sample
        self.report = ShardReadReport(samples_read=read, truncated=False, error=failed,
                                      expected=len(self.ref.members), url=self.ref.url, bytes_read=nbytes,
                                      read_failed=failed is not None)


class _TooLarge(ValueError):
    pass


__all__ = ["DEFAULT_IMAGES_PER_SHARD", "DEFAULT_URL_COLUMN", "FileListReader", "expand_image_input", "is_table_list",
           "is_virtual", "list_image_files", "read_url_list"]
