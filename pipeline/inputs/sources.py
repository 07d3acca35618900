"""Input sources: expand an ``--input`` spec into ``ShardRef``s and open one shard as a stream of ``Sample``s.

Contracts:

- ``expand_shards`` turns globs, brace ranges, list files (or a list of those) into a sorted, de-duplicated list of
  ``ShardRef(url, name)`` whose ``name`` is a filesystem-safe, unique shard id. Missing shards raise ``ValueError``.
- ``iter_samples`` streams one tar shard (``pipeline.inputs.tar_reader``); its ``report`` says what was read.
- Transient errors are retried when opening (``pipeline.inputs.shard_io``); nothing is skipped silently.

No Ray, no torch: this module is used inside Ray tasks but is testable on its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
from typing import Any

import fsspec

from pipeline.inputs.shard_io import (  # noqa: F401
    BLOCK,
    DEFAULT_MAX_MEMBER_BYTES,
    TAR_SUFFIXES,
    Sample,
    ShardReadReport,
    ShardRef,
    _protocol_prefix,
    _shard_name,
    _with_protocol,
    open_with_retry,
    read_expected_count,
    tar_stem,
)
from pipeline.inputs.tar_reader import ShardReader

logger = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".list")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")

# ----------------------------------------------------------------------------------------------------------------
# Shard listing


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero-padded to the widest endpoint when either has a leading zero) and
    ``{a,b,c}`` lists, left to right, possibly several per pattern. Raises ``ValueError`` on an empty group."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        padded = (len(lo_s) > 1 and lo_s.startswith("0")) or (len(hi_s) > 1 and hi_s.startswith("0"))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"brace group '{{{body}}}' in {pattern!r} is neither a range like {{000..099}} "
                         "nor a list like {a,b}")
    head, tail = pattern[: match.start()], pattern[match.end():]
    out: list[str] = []
    for option in options:
        out.extend(expand_braces(head + option + tail))
    return out


def _normalize_local(url: str) -> str:
    """Local paths become absolute so the same file spelled two ways is one shard (and workers with another
    working directory still find it); URLs with a protocol are left as given."""
    return url if "://" in url else os.path.abspath(url)


def _is_list_file(item: str) -> bool:
    return item.startswith("@") or item.lower().endswith(LIST_SUFFIXES)


def _read_list_file(spec: str, storage_options: dict) -> list[str]:
    url = spec.removeprefix("@")
    with fsspec.open(url, "rt", encoding="utf-8", **storage_options) as fh:
        lines = fh.read().splitlines()
    entries = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line)
    if not entries:
        logger.warning("shard list %s has no entries", url)
    return entries


def shard_names(urls: list[str]) -> list[str]:
    """Unique, filesystem-safe names for ``urls`` (same order); clashing basenames get ``-<8 hex of sha1(url)>``."""
    names = [_shard_name(u) for u in urls]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = []
    for url, n in zip(urls, names):
        if counts[n] > 1:
            n = f"{n}-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:8]}"
        out.append(n)
    if len(set(out)) != len(out):
        raise ValueError(f"could not derive unique shard names for {len(urls)} URLs")
    return out


def _missing(urls: list[str], storage_options: dict) -> list[str]:
    """URLs that do not exist; one directory listing per parent directory rather than one request per file."""
    by_parent: dict[tuple[str, str], list[str]] = {}
    fss: dict[str, Any] = {}
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        proto = _protocol_prefix(url)
        fss[proto] = fs
        by_parent.setdefault((proto, posixpath.dirname(path)), []).append(url)
    missing = []
    for (proto, parent), members in by_parent.items():
        fs = fss[proto]
        try:
            listed = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            listed = set()
        except OSError:
            listed = None
        for url in members:
            path = fs._strip_protocol(url)
            present = path in listed if listed is not None else fs.exists(path)
            if not present and listed is not None and fs.exists(path):
                present = True
            if not present:
                missing.append(url)
    return missing


def _is_tar(url: str) -> bool:
    return url.lower().split("?", 1)[0].endswith(TAR_SUFFIXES)


def _is_image_file(url: str) -> bool:
    from pipeline.inputs.image_files import _extension, _image_extensions

    return _extension(url) in _image_extensions()


def _image_prefixes(inputs: list[str]) -> dict[str, str]:
    """Shard-name prefixes for image inputs: the input's base name, made unique with a hash of its URL."""
    from pipeline.inputs.image_files import _root_name

    names = {u: _root_name(u) for u in inputs}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {u: (n if counts[n] == 1 else f"{n}-{hashlib.sha1(u.encode('utf-8')).hexdigest()[:8]}")
            for u, n in names.items()}


def expand_shards(
    spec: str | list[str],
    storage_options: dict | None = None,
    *,
    allow_missing: bool = False,
    images_per_shard: int | None = None,
    url_column: str | None = None,
) -> list[ShardRef]:
    """Expand an input spec into ``ShardRef``s: tar shards in sorted URL order, then the virtual shards of image
    inputs (``pipeline.inputs.image_files``) in sorted input order, without duplicates.

    ``spec`` is a URL, a brace pattern (``shard-{000000..000999}.tar``, ``{a,b}``), a glob (``s3://b/c/*.tar``),
    a list file of URLs (``@urls.txt``, or a path ending in ``.txt``/``.list``; one entry per line, ``#``
    comments; entries may themselves be patterns), or a list of any of these. What each entry is:

    - a Parquet, CSV or JSONL file: a list of image paths or URLs in its ``url_column``;
    - a directory: its tar files (recursively) when it holds any, else its image files, recursively;
    - a glob: the tars it matches; when it matches no tar, the files it matches are image files;
    - a file with an image extension: that image; any other file: a tar shard.

    Image inputs are cut into shards of ``images_per_shard`` files. Explicit URLs that do not exist raise
    ``ValueError`` naming them unless ``allow_missing`` (then they are dropped with a warning); a glob that matches
    nothing raises ``ValueError`` too.
    """
    from pipeline.inputs.image_files import (
        DEFAULT_IMAGES_PER_SHARD,
        DEFAULT_URL_COLUMN,
        expand_image_input,
        is_table_list,
    )

    storage_options = dict(storage_options or {})
    images_per_shard = DEFAULT_IMAGES_PER_SHARD if images_per_shard is None else images_per_shard
    url_column = url_column or DEFAULT_URL_COLUMN
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("expected at least one shard URL, pattern or list file; got an empty spec")
    urls: list[str] = []
    explicit: list[str] = []
    image_inputs: list[str] = []
    pending = list(items)
    while pending:
        item = pending.pop(0).strip()
        if not item:
            continue
        if _is_list_file(item):
            entries = _read_list_file(item, storage_options)
            nested = [e for e in entries if _is_list_file(e)]
            if nested:
                raise ValueError(f"shard list {item!r} names other list files ({', '.join(nested[:3])}); "
                                 "expected shard URLs, globs or brace patterns, one per line")
            pending[:0] = entries
            continue
        for url in expand_braces(item):
            if _GLOB_CHARS.search(url.split("://", 1)[-1]):
                fs, path = fsspec.core.url_to_fs(url, **storage_options)
                matches = sorted(fs.glob(path))
                matches = [m for m in matches if not fs.isdir(m)]
                if not matches:
                    raise ValueError(f"glob {url!r} matched no shards; check the bucket/prefix and storage options")
                tars = [m for m in matches if _is_tar(m)]
                if tars:
                    urls.extend(_with_protocol(url, m) for m in tars)
                else:
                    image_inputs.append(url)
                continue
            url = _normalize_local(url)
            if is_table_list(url):
                image_inputs.append(url)
                continue
            if not _is_tar(url) and not _is_image_file(url):
                fs, path = fsspec.core.url_to_fs(url, **storage_options)
                if fs.isdir(path):
                    tars = sorted(p for p in fs.find(path) if _is_tar(p))
                    if tars:
                        urls.extend(_with_protocol(url, p) for p in tars)
                    else:
                        image_inputs.append(url)
                    continue
            if _is_image_file(url):
                explicit.append(url)
                image_inputs.append(url)
                continue
            urls.append(url)
            explicit.append(url)
    urls = sorted(set(urls))
    missing = _missing(sorted(set(explicit)), storage_options) if explicit else []
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        if not allow_missing:
            raise ValueError(f"{len(missing)} shard(s) do not exist: {shown}; fix the --input spec (a glob matches "
                             "only what exists)")
        logger.warning("skipping %d missing shard(s): %s", len(missing), shown)
        gone = set(missing)
        urls = [u for u in urls if u not in gone]
        image_inputs = [u for u in image_inputs if u not in gone]
    refs = [ShardRef(url, name) for url, name in zip(urls, shard_names(urls))]
    image_inputs = sorted(set(image_inputs))
    prefixes = _image_prefixes(image_inputs)
    taken = {r.name for r in refs}
    for url in image_inputs:
        for ref in expand_image_input(url, storage_options, images_per_shard=images_per_shard,
                                      url_column=url_column, prefix=prefixes[url]):
            if ref.name in taken:
                raise ValueError(f"input {url} gives shard name {ref.name}, which another input already has; "
                                 "rename one of them")
            taken.add(ref.name)
            refs.append(ref)
    if not refs:
        raise ValueError(f"shard spec {spec!r} expanded to no existing shards")
    return refs


def open_shard(ref: ShardRef, storage_options: dict | None = None, **kwargs: Any) -> Any:
    """Stream the samples of ``ref``: a tar shard's (``ShardReader``) or a virtual shard's image files
    (``FileListReader``). Either iterates ``Sample``s and has ``report`` (a ``ShardReadReport``) once iteration has
    ended, and ``close()``."""
    if ref.members:
        from pipeline.inputs.image_files import FileListReader

        allowed = {k: v for k, v in kwargs.items() if k in ("max_member_bytes", "open_retries", "backoff_s")}
        return FileListReader(ref, storage_options, shard=kwargs.get("shard", ref.name), **allowed)
    kwargs.setdefault("shard", ref.name)
    return ShardReader(ref.url, storage_options, **kwargs)


def iter_samples(
    url: str,
    storage_options: dict | None = None,
    **kwargs: Any,
) -> ShardReader:
    """Stream the samples of one shard. Returns a ``ShardReader`` (an ``Iterator[Sample]``) whose ``report``
    holds the ``ShardReadReport`` once iteration has ended. ``kwargs`` go to ``ShardReader``."""
    return ShardReader(url, storage_options, **kwargs)
