"""What every input source shares: ``ShardRef`` (one unit of work and commit), ``Sample`` (one image's members),
``ShardReadReport`` (what reading a shard produced), and opening and reading files with retries.

No Ray, no torch.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from pipeline.inputs.shard_bytes import skip_by_reading

logger = logging.getLogger(__name__)

BLOCK = 512
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".tbz", ".txz", ".tar")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class ShardRef:
    """One input shard: ``url`` as fsspec opens it, ``name`` a unique filesystem-safe id used for output files.

    A virtual shard of image files (``pipeline.inputs.image_files``) also lists its files: ``members`` (their URLs, in
    order), ``keys`` (their sample keys), ``sidecars`` (per file, the URLs of its sidecar JSON, if any) and
    ``sizes`` (bytes, as listed); its ``url`` then names the input and the range, and is not opened."""

    url: str
    name: str
    members: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    sidecars: tuple[tuple[str, ...], ...] = ()
    sizes: tuple[int, ...] = ()


@dataclass
class Sample:
    """One WebDataset sample: ``files`` maps lowercased extension (``jpg``, ``json``, ``seg.png``) to raw bytes.

    ``errors`` holds per-sample read problems (an oversized member that was refused, a member cut by truncation,
    damage in the tar next to the sample); a sample with errors must become a status row, not be annotated as if
    complete. ``notes`` holds harmless oddities (a duplicate member, a symbolic link named like a member).
    ``source_name`` is the image's own name where the reader knows it (an image file's path relative to its input
    root); for a tar sample decoding makes it ``<key>.<image member's extension>``.
    """

    key: str
    files: dict[str, bytes]
    shard: str
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source_name: str | None = None


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
        return skip_by_reading(self.read, n)

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
# Shard names


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


def tar_stem(base: str) -> str:
    """``shard-000001`` for ``shard-000001.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz`` ...; other names
    are returned as they are."""
    lower = base.lower()
    for suffix in TAR_SUFFIXES:
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _shard_name(url: str) -> str:
    base = tar_stem(posixpath.basename(url.rstrip("/")))
    name = _SAFE.sub("_", base).strip("_") or "shard"
    if name.startswith("."):
        name = "_" + name
    return name


# ----------------------------------------------------------------------------------------------------------------
# Shard index


def read_expected_count(url: str, storage_options: dict | None = None) -> int | None:
    """The shard's expected sample count from ``<stem>.idx.json`` / ``<name>.tar.idx.json`` (``{"num_samples": N}``)
    or a sibling ``_index.json`` (``{"<stem or basename>": N}``), or None when no index exists."""
    storage_options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    parent, base = posixpath.split(path)
    stem = tar_stem(base)
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
