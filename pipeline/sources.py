"""Shard sources: expand shard specs into ``ShardRef``s and stream WebDataset samples out of tar shards.

Contracts:

- ``expand_shards`` turns globs, brace ranges, list files (or a list of those) into a sorted, de-duplicated list of
  ``ShardRef(url, name)`` whose ``name`` is a filesystem-safe, unique shard id. Missing shards raise ``ValueError``.
- ``iter_samples`` reads one shard as a stream of 512-byte tar blocks (``tarfile.TarInfo.frombuf``); member names
  are only ever used as dictionary keys, never as filesystem paths. After the iterator is exhausted its ``report``
  (``ShardReadReport``) says how many samples were read and whether the shard was truncated (a cut inside a member,
  a cut at a member boundary without the end-of-archive blocks, or a count that disagrees with the shard index).
- Transient errors are retried when opening; a failed read mid-stream re-opens the file and seeks back to the
  exact byte offset (logged), or fails the shard with an error naming the offset. Nothing is skipped silently.

No Ray, no torch: this module is used inside Ray tasks but is testable on its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

logger = logging.getLogger(__name__)

BLOCK = 512
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
LIST_SUFFIXES = (".txt", ".list")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class ShardRef:
    """One input shard: ``url`` as fsspec opens it, ``name`` a unique filesystem-safe id used for output files."""

    url: str
    name: str


@dataclass
class Sample:
    """One WebDataset sample: ``files`` maps lowercased extension (``jpg``, ``json``, ``seg.png``) to raw bytes.

    ``errors`` holds per-sample read problems (an oversized member that was refused, a member cut by truncation);
    a sample with errors must become a status row, not be annotated as if complete.
    """

    key: str
    files: dict[str, bytes]
    shard: str
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardReadReport:
    """What reading one shard produced. ``truncated`` is set for a cut inside a member, a missing end-of-archive
    marker, or a sample count that disagrees with ``expected`` (from the shard index); ``error`` says which.
    ``read_failed`` is set when the shard could not be opened or a read kept failing after its retries: the data
    may be intact and a later attempt may read it whole, unlike a truncated or corrupt file."""

    samples_read: int
    truncated: bool
    error: str | None
    expected: int | None
    url: str = ""
    bytes_read: int = 0
    problems: tuple[str, ...] = ()
    read_failed: bool = False


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


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def _with_protocol(original: str, path: str) -> str:
    """Give a filesystem-relative ``path`` (as ``fs.glob`` returns it) the protocol of the ``original`` spec."""
    prefix = _protocol_prefix(original)
    if not prefix or path.startswith(prefix):
        return path
    if prefix == "file://":
        return prefix + path
    return prefix + path.lstrip("/")


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


def _shard_name(url: str) -> str:
    base = posixpath.basename(url.rstrip("/"))
    if base.lower().endswith(".tar"):
        base = base[: -len(".tar")]
    name = _SAFE.sub("_", base).strip("_") or "shard"
    if name.startswith("."):
        name = "_" + name
    return name


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


def expand_shards(
    spec: str | list[str],
    storage_options: dict | None = None,
    *,
    allow_missing: bool = False,
) -> list[ShardRef]:
    """Expand a shard spec into ``ShardRef``s in sorted URL order, without duplicates.

    ``spec`` is a URL, a brace pattern (``shard-{000000..000999}.tar``, ``{a,b}``), a glob (``s3://b/c/*.tar``),
    a list file of URLs (``@urls.txt``, or a path ending in ``.txt``/``.list``; one entry per line, ``#``
    comments; entries may themselves be patterns), or a list of any of these. Explicit URLs that do not exist
    raise ``ValueError`` naming them unless ``allow_missing`` (then they are dropped with a warning); a glob
    that matches nothing raises ``ValueError`` too.
    """
    storage_options = dict(storage_options or {})
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("expected at least one shard URL, pattern or list file; got an empty spec")
    urls: list[str] = []
    explicit: list[str] = []
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
                urls.extend(_with_protocol(url, m) for m in matches)
            else:
                url = _normalize_local(url)
                urls.append(url)
                explicit.append(url)
    urls = sorted(set(urls))
    missing = _missing(sorted(set(explicit)), storage_options) if explicit else []
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        if not allow_missing:
            raise ValueError(f"{len(missing)} shard(s) do not exist: {shown}; fix the spec or pass allow_missing")
        logger.warning("skipping %d missing shard(s): %s", len(missing), shown)
        gone = set(missing)
        urls = [u for u in urls if u not in gone]
    if not urls:
        raise ValueError(f"shard spec {spec!r} expanded to no existing shards")
    return [ShardRef(url, name) for url, name in zip(urls, shard_names(urls))]


# ----------------------------------------------------------------------------------------------------------------
# Shard index


def read_expected_count(url: str, storage_options: dict | None = None) -> int | None:
    """The shard's expected sample count from ``<stem>.idx.json`` / ``<name>.tar.idx.json`` (``{"num_samples": N}``)
    or a sibling ``_index.json`` (``{"<stem or basename>": N}``), or None when no index exists."""
    storage_options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    parent, base = posixpath.split(path)
    stem = base[:-4] if base.lower().endswith(".tar") else base
    for candidate in (posixpath.join(parent, stem + ".idx.json"), posixpath.join(parent, base + ".idx.json")):
        data = _read_json(fs, candidate)
        if isinstance(data, dict) and "num_samples" in data:
            return _as_count(data["num_samples"], candidate)
    data = _read_json(fs, posixpath.join(parent, "_index.json"))
    if isinstance(data, dict):
        for k in (stem, base):
            if k in data:
                value = data[k]
                if isinstance(value, dict):
                    value = value.get("num_samples")
                return _as_count(value, posixpath.join(parent, "_index.json"))
    return None


def _read_json(fs: Any, path: str) -> Any:
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable shard index %s: %s", path, exc)
        return None


def _as_count(value: Any, where: str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    logger.warning("ignoring shard index %s: expected a non-negative integer count, got %r", where, value)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Opening with retries


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(exc, _NOT_TRANSIENT)


def open_with_retry(
    url: str,
    storage_options: dict | None = None,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> IO[bytes]:
    """Open ``url`` for binary reading, retrying transient errors (not missing/permission) with exponential
    backoff. Raises the last error when every attempt failed."""
    storage_options = dict(storage_options or {})
    attempt = 0
    while True:
        try:
            fs, path = fsspec.core.url_to_fs(url, **storage_options)
            return fs.open(path, "rb")
        except Exception as exc:
            if not _is_transient(exc) or attempt >= retries:
                raise
            delay = backoff_s * (2 ** attempt)
            logger.warning("opening %s failed (%s: %s); retry %d/%d in %.1fs",
                           url, type(exc).__name__, exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1


class _ResumableStream:
    """Sequential reads that survive a transient error by re-opening and seeking back to the exact offset.

    Every resume is logged; if re-opening or seeking fails, the error propagates with the offset in it."""

    def __init__(self, opener: Callable[[], IO[bytes]], url: str, retries: int, backoff_s: float):
        self._opener = opener
        self._url = url
        self._retries = retries
        self._backoff_s = backoff_s
        self._fh = opener()
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at end of file."""
        chunks: list[bytes] = []
        remaining = n
        attempt = 0
        while remaining > 0:
            try:
                chunk = self._fh.read(remaining)
            except Exception as exc:
                if not _is_transient(exc) or attempt >= self._retries:
                    raise OSError(f"read of {self._url} failed at byte offset {self.offset}: "
                                  f"{type(exc).__name__}: {exc}") from exc
                attempt += 1
                logger.warning("read of %s failed at byte %d (%s); re-opening and seeking back (attempt %d/%d)",
                               self._url, self.offset, exc, attempt, self._retries)
                time.sleep(self._backoff_s * (2 ** (attempt - 1)))
                self._reopen()
                continue
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
            self.offset += len(chunk)
        return b"".join(chunks)

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes without holding them in memory; returns how many were actually skipped."""
        skipped = 0
        while skipped < n:
            got = len(self.read(min(n - skipped, 1 << 20)))
            if got == 0:
                break
            skipped += got
        return skipped

    def _reopen(self) -> None:
        try:
            self._fh.close()
        except Exception as exc:  # the old handle is already broken; closing it is best effort
            logger.debug("closing the failed handle of %s: %s", self._url, exc)
        self._fh = self._opener()
        self._fh.seek(self.offset)

    def close(self) -> None:
        self._fh.close()


# ----------------------------------------------------------------------------------------------------------------
# Streaming tar reader


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension split: key = directory + basename up to its first dot, extension = the rest,
    lowercased. None for names without an extension (not part of any sample)."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    if not stem or not ext:
        return None
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"``; raises ValueError on a malformed record."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\x00":
            break
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError(f"pax record length {length} at {pos}")
        record = data[space + 1: pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"malformed pax record at {pos}")
        k, v = record[:-1].split(b"=", 1)
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "backslashreplace")
        pos += length
    return out


MAX_REPORTED_PROBLEMS = 100


def _capped(problems: list[str]) -> tuple[str, ...]:
    if len(problems) <= MAX_REPORTED_PROBLEMS:
        return tuple(problems)
    extra = len(problems) - MAX_REPORTED_PROBLEMS
    return (*problems[:MAX_REPORTED_PROBLEMS], f"... and {extra} more problems")


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


class _Truncated(Exception):
    pass


class ShardReader:
    """Iterator over the ``Sample``s of one tar shard; ``report`` is set once iteration ends (or ``close``).

    The shard never raises out of iteration for bad content: truncation, corrupt headers and read failures end
    iteration and are described in ``report``. Members larger than ``max_member_bytes`` are skipped without
    being buffered, and their sample carries an error. A key that reappears after other keys (non-contiguous
    sample) is not merged into the earlier sample: the later members are dropped and listed in
    ``report.problems``.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        shard: str | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        expected: int | None = None,
        use_index: bool = True,
        open_retries: int = 3,
        backoff_s: float = 0.5,
    ):
        self.url = url
        self.shard = shard if shard is not None else _shard_name(url)
        self.storage_options = dict(storage_options or {})
        self.max_member_bytes = max_member_bytes
        self._expected = expected
        self._use_index = use_index
        self._open_retries = open_retries
        self._backoff_s = backoff_s
        self.report: ShardReadReport | None = None
        self._gen = self._run()

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> Sample:
        return next(self._gen)

    def close(self) -> None:
        """Stop early; ``report`` then describes what was read so far (not marked truncated)."""
        self._gen.close()

    def _run(self) -> Iterator[Sample]:
        problems: list[str] = []
        count = 0
        truncated = False
        read_failed = False
        error: str | None = None
        stream: _ResumableStream | None = None
        finished = False
        expected = self._expected
        try:
            if expected is None and self._use_index:
                expected = read_expected_count(self.url, self.storage_options)
            try:
                stream = _ResumableStream(
                    lambda: open_with_retry(self.url, self.storage_options,
                                            retries=self._open_retries, backoff_s=self._backoff_s),
                    self.url, self._open_retries, self._backoff_s)
            except Exception as exc:
                error = f"could not open shard: {type(exc).__name__}: {exc}"
                read_failed = finished = True
                return
            try:
                for sample in self._samples(stream, problems):
                    count += 1
                    yield sample
                finished = True
            except _Truncated as exc:
                truncated, error, finished = True, str(exc), True
            except (OSError, ValueError) as exc:
                error, finished = f"{type(exc).__name__}: {exc}", True
                read_failed = isinstance(exc, OSError)
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception as exc:  # everything was read already; a failing close changes nothing
                    logger.debug("closing %s: %s", self.url, exc)
            if finished and expected is not None and count != expected:
                truncated = True
                msg = f"shard index expects {expected} samples, read {count}"
                error = f"{error}; {msg}" if error else msg
            if error:
                logger.warning("shard %s: %s", self.url, error)
            self.report = ShardReadReport(
                samples_read=count, truncated=truncated, error=error,
                expected=expected,
                url=self.url, bytes_read=stream.offset if stream is not None else 0,
                problems=_capped(problems), read_failed=read_failed)

    def _samples(self, stream: _ResumableStream, problems: list[str]) -> Iterator[Sample]:
        """Group members into samples. When the shard ends early (truncation, corrupt header, failed read) the
        sample in progress is still yielded (with an error when the cut went through one of its members) before
        the exception propagates, so it gets a status row."""
        state: dict[str, Any] = {"current": None}
        try:
            yield from self._group(stream, problems, state)
        except (_Truncated, OSError, ValueError) as exc:
            current: Sample | None = state["current"]
            if current is not None:
                if state.get("cut_member"):
                    current.errors.append(f"member {state['cut_member']!r} cut by shard truncation or a read "
                                          f"failure: {exc}")
                yield current
            raise

    def _group(self, stream: _ResumableStream, problems: list[str], state: dict[str, Any]) -> Iterator[Sample]:
        finished_keys: set[str] = set()
        dropped_keys: set[str] = set()
        for name, size, offset in self._members(stream, problems):
            split = split_member_name(name)
            if split is None:
                problems.append(f"member {name!r} at byte {offset} has no extension; skipped")
                self._consume(stream, size, name)
                continue
            key, ext = split
            current: Sample | None = state["current"]
            if current is not None and key != current.key:
                finished_keys.add(current.key)
                state["current"] = None
                yield current
                current = None
            if current is None:
                if key in finished_keys:
                    if key not in dropped_keys:
                        problems.append(f"non-contiguous sample key {key!r}: members reappear at byte {offset} "
                                        "after other samples; later members dropped")
                        dropped_keys.add(key)
                    logger.warning("shard %s: dropping non-contiguous member %r", self.url, name)
                    self._consume(stream, size, name)
                    continue
                current = Sample(key=key, files={}, shard=self.shard)
                state["current"] = current
            if ext in current.files:
                problems.append(f"duplicate member {name!r} in sample {key!r}; kept the first")
                self._consume(stream, size, name)
                continue
            state["cut_member"] = name
            if size > self.max_member_bytes:
                current.errors.append(f"member {name!r} is {size} bytes, over the limit of "
                                      f"{self.max_member_bytes} bytes; refused")
                self._consume(stream, size, name)
            else:
                current.files[ext] = self._read_data(stream, size, name)
            state["cut_member"] = None
        if state["current"] is not None:
            current, state["current"] = state["current"], None
            yield current

    def _read_data(self, stream: _ResumableStream, size: int, name: str) -> bytes:
        data = stream.read(size)
        if len(data) < size:
            raise _Truncated(f"tar truncated inside member {name!r}: expected {size} bytes, got {len(data)}")
        pad = _padded(size) - size
        if pad and len(stream.read(pad)) < pad:
            raise _Truncated(f"tar truncated in the padding after member {name!r}")
        return data

    def _consume(self, stream: _ResumableStream, size: int, name: str) -> None:
        total = _padded(size)
        if stream.skip(total) < total:
            raise _Truncated(f"tar truncated inside member {name!r} ({size} bytes declared)")

    def _members(self, stream: _ResumableStream, problems: list[str]) -> Iterator[tuple[str, int, int]]:
        """Yield (name, size, header offset) of regular files; the caller must consume exactly the padded data."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        pax_global: dict[str, str] = {}
        while True:
            offset = stream.offset
            buf = stream.read(BLOCK)
            if len(buf) == 0:
                if offset == 0:
                    raise _Truncated("shard is an empty file (0 bytes), not a tar archive")
                raise _Truncated(f"tar ends at byte {offset} without the end-of-archive blocks "
                                 "(cut at a member boundary)")
            if len(buf) < BLOCK:
                raise _Truncated(f"tar truncated inside a header at byte {offset}")
            if buf == b"\0" * BLOCK:
                if stream.read(BLOCK) != b"\0" * BLOCK:
                    problems.append(f"lone end-of-archive block at byte {offset}")
                return
            try:
                info = tarfile.TarInfo.frombuf(buf, "utf-8", "backslashreplace")
            except tarfile.HeaderError as exc:
                raise ValueError(f"corrupt tar header at byte {offset}: {exc}") from exc
            size = info.size
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE):
                if size > 1 << 20:
                    raise ValueError(f"tar extension header at byte {offset} declares {size} bytes")
                data = self._read_data(stream, size, f"<header extension at byte {offset}>")
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
                elif info.type == tarfile.XHDTYPE:
                    pax = _parse_pax(data)
                elif info.type == tarfile.XGLTYPE:
                    pax_global.update(_parse_pax(data))
                continue
            name = info.name
            headers = {**pax_global, **pax}
            if "path" in headers:
                name = headers["path"]
            if long_name is not None:
                name = long_name
            if "size" in headers:
                size = int(headers["size"])
            long_name, pax = None, {}
            if info.type in tarfile.REGULAR_TYPES and info.type != tarfile.GNUTYPE_SPARSE:
                yield name, size, offset
                continue
            if info.type != tarfile.DIRTYPE:
                problems.append(f"member {name!r} at byte {offset} is not a regular file "
                                f"(type {info.type!r}); skipped")
            data_size = size if info.type not in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE) else info.size
            total = _padded(data_size)
            if stream.skip(total) < total:
                raise _Truncated(f"tar truncated inside member {name!r}")


def iter_samples(
    url: str,
    storage_options: dict | None = None,
    **kwargs: Any,
) -> ShardReader:
    """Stream the samples of one shard. Returns a ``ShardReader`` (an ``Iterator[Sample]``) whose ``report``
    holds the ``ShardReadReport`` once iteration has ended. ``kwargs`` go to ``ShardReader``."""
    return ShardReader(url, storage_options, **kwargs)
