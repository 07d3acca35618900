"""Writing a packed training dataset: shards, ``classes.json`` and ``_index.json`` (format: ``schemas/training.py``).

A packer (``pipeline/training/packers/``) turns a source dataset into a :class:`PackPlan`: the classes, the settings that
determine the output, a deterministic sequence of items and a ``load(item) -> PackedSample`` function.
:func:`write_plan` streams the items through ``load`` on a thread pool (results consumed in item order, at most a
bounded window in flight) into ``<prefix>-NNNNNN.tar`` shards, closing a shard when it holds
``samples_per_shard`` samples or the next sample would take the file past ``max_shard_bytes``.

Commit protocol, so an interrupted run can be resumed by running it again:

1. ``classes.json`` is written first (temporary name, then moved). It records the settings and their hash; a run
   with other settings or another source into the same output is refused, naming what changed.
2. Each shard is streamed to ``<name>.tmp`` and moved to its final name when complete.
3. Then ``_index.json`` is rewritten (temporary name, then moved) with the shard's entry. The index is the commit
   point: a shard file without an entry (the run died between 2 and 3) is written again.

A restarted run reads the index, checks the committed shards are present with their recorded sizes, and continues
at ``first_item + num_items`` of the last entry; shards are written byte for byte as an uninterrupted run writes
them (``TarWriter`` with ``mtime=0``). All I/O goes through fsspec, so the output can be any URL fsspec writes.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec

from schemas.training import (CLASSES_FILE, INDEX_FILE, ClassesFile, ShardEntry, TrainingRecord, index_from_json,
                              index_to_json, is_valid_key)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads a closed archive to a multiple of this
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class PackedSample:
    """One sample ready to write: key, image extension and original bytes, and the sidecar record.
    ``dropped`` counts annotations of this item left out while loading it, by reason."""

    key: str
    image_ext: str
    image: bytes
    record: TrainingRecord
    dropped: dict[str, int] = field(default_factory=dict)

    def members(self) -> dict[str, bytes]:
        return {self.image_ext: self.image, "json": self.record.to_json().encode("utf-8")}


class SkipItem(Exception):
    """Raised by a plan's ``load`` for an item that cannot become a sample; ``reason`` is a short counter name
    (``missing_image``, ``unreadable_image``, ...), the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PackPlan:
    """What to pack. ``settings`` (JSON-able, no credentials) determine the output together with the sharding
    options; ``stats`` are counts made while planning (annotations left out, by reason)."""

    classes: ClassesFile
    settings: dict[str, Any]
    items: Sequence[Any]
    load: Callable[[Any], PackedSample]
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class PackSummary:
    """What a :func:`write_plan` call did. ``skipped`` merges the plan's counts and this run's load-time skips."""

    output: str
    dataset: str
    kind: str
    num_classes: int
    items: int
    shards: int
    samples: int
    shards_written: int
    samples_written: int
    shards_kept: int
    skipped: dict[str, int]
    seconds: float

    def describe(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        return (f"{self.output}: {self.dataset} ({self.kind}, {self.num_classes} classes): {self.samples} samples "
                f"in {self.shards} shards ({self.shards_written} written now, {self.shards_kept} kept from an "
                f"earlier run); {self.items} source items; left out: {skipped}; {self.seconds:.1f} s")


def member_bytes(size: int) -> int:
    """Bytes a tar member of ``size`` data bytes takes (a short ASCII name: one header block, no PAX record)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(content: int) -> int:
    """Size of a closed tar archive whose members take ``content`` bytes: two zero blocks, padded to a record."""
    return -(-(content + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


class HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to ``raw`` (``size``, ``sha256``)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw = raw
        self.size = 0
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.sha256.update(view)
        self.size += len(view)
        return len(view)


class _OpenShard:
    """A shard being streamed to its temporary file."""

    def __init__(self, fs: Any, path: str, first_item: int) -> None:
        import webdataset as wds

        self.fs, self.path, self.tmp = fs, path, path + TMP_SUFFIX
        self.first_item = first_item
        self.num_items = 0
        self.num_samples = 0
        self.content = 0
        self._file = fs.open(self.tmp, "wb")
        self._hashing = HashingWriter(self._file)
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0)

    def size_with(self, members: dict[str, bytes]) -> int:
        return tar_file_bytes(self.content + sum(member_bytes(len(v)) for v in members.values()))

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **members})
        self.content += sum(member_bytes(len(v)) for v in members.values())
        self.num_samples += 1

    def commit(self) -> ShardEntry:
        self._tar.close()
        self._file.close()
        expected = tar_file_bytes(self.content)
        if self._hashing.size != expected:
            # the byte limit relies on this arithmetic; a mismatch means tarfile wrote extra headers
            logger.warning("shard %s: %d bytes written, %d predicted", self.path, self._hashing.size, expected)
        self.fs.mv(self.tmp, self.path)
        return ShardEntry(num_samples=self.num_samples, bytes=self._hashing.size, first_item=self.first_item,
                          num_items=self.num_items, sha256=self._hashing.sha256.hexdigest())

    def abort(self) -> None:
        # Closing publishes the partial temporary file on object stores; it is removed right after (and, should
        # that fail, never read: only committed shards are, and a resumed run writes the name again).
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the run is failing already
            logger.debug("closing %s after a failure failed too", self.tmp, exc_info=True)
        try:
            self.fs.rm(self.tmp)
        except (OSError, ValueError):
            logger.debug("could not remove %s", self.tmp, exc_info=True)


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, window: int) -> Iterator[Any]:
    """``fn(item)`` for every item, in order, computed on ``threads`` threads with at most ``window`` results
    pending; exceptions come back as values so the caller sees them in order."""

    def call(item: Any) -> Any:
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 - re-raised (or counted, for SkipItem) by the consumer, in order
            return e

    if threads <= 1:
        for item in items:
            yield call(item)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pack-load") as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(pool.submit(call, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _write_text(fs: Any, path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a move, so readers never see a partial file."""
    tmp = path + TMP_SUFFIX
    fs.pipe_file(tmp, text.encode("utf-8"))
    fs.mv(tmp, path)


def _read_text(fs: Any, path: str) -> str | None:
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def _check_classes_file(fs: Any, root: str, classes: ClassesFile, prefix: str) -> bool:
    """Write ``classes.json`` or check the existing one records the same settings; True when it existed."""
    path = posixpath.join(root, CLASSES_FILE)
    text = _read_text(fs, path)
    if text is None:
        foreign = [p for p in _listing(fs, root) if posixpath.basename(p) == INDEX_FILE
                   or (posixpath.basename(p).startswith(prefix + "-") and p.endswith(".tar"))]
        if foreign:
            raise ValueError(f"{root} holds {posixpath.basename(foreign[0])} but no {CLASSES_FILE}: it is not the "
                             f"output of an interrupted `ovsam pack` run; choose an empty --output")
        _write_text(fs, path, classes.to_json())
        return False
    try:
        old = ClassesFile.from_json(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; choose another --output or remove the old one") from None
    old_settings = old.source.get("settings", {})
    if old.source.get("settings_hash") != classes.source["settings_hash"]:
        new_settings = classes.source["settings"]
        changed = sorted(k for k in set(old_settings) | set(new_settings) if old_settings.get(k) != new_settings.get(k))
        detail = "; ".join(f"{k}: {old_settings.get(k)!r} -> {new_settings.get(k)!r}" for k in changed[:5])
        raise ValueError(f"{root} was packed with other settings or from another source ({detail or 'classes'}); "
                         f"rerun with the same arguments to resume, or pack into another --output")
    return True


def _listing(fs: Any, root: str) -> dict[str, int]:
    """``{path: size}`` of the files directly under ``root`` (fresh, not from a listing cache)."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/"): int(e.get("size") or 0) for e in entries if e.get("type") == "file"}


def _committed(fs: Any, root: str, prefix: str) -> dict[str, ShardEntry]:
    """The index of an earlier run, checked: contiguous shard names, chained item ranges, files present with their
    recorded sizes."""
    path = posixpath.join(root, INDEX_FILE)
    text = _read_text(fs, path)
    if text is None:
        return {}
    index = index_from_json(text)
    files = {posixpath.basename(p): size for p, size in _listing(fs, root).items()}
    next_item = 0
    for number in range(len(index)):
        name = shard_name(prefix, number)
        entry = index.get(name)
        if entry is None:
            raise ValueError(f"{path} lists {sorted(index)} but not {name}; expected shards {prefix}-000000.tar "
                             f"onwards without gaps. Pack into another --output")
        if entry.first_item != next_item:
            raise ValueError(f"{path}: {name} starts at item {entry.first_item}, expected {next_item} (where the "
                             f"previous shard ends); the index is damaged. Pack into another --output")
        if files.get(name) != entry.bytes:
            raise ValueError(f"{path} lists {name} with {entry.bytes} bytes, but the file "
                             f"{'is missing' if name not in files else f'has {files[name]} bytes'}; the output was "
                             f"changed after packing. Pack into another --output")
        next_item = entry.first_item + entry.num_items
    return index


def write_plan(
    plan: PackPlan,
    output: str,
    *,
    storage_options: dict | None = None,
    samples_per_shard: int | None = 1000,
    max_shard_bytes: int | None = None,
    prefix: str = "shard",
    io_threads: int = 8,
) -> PackSummary:
    """Pack ``plan`` into ``output`` (any fsspec URL), resuming an earlier run of the same plan there.

    Raises ``ValueError`` when ``output`` holds another dataset or one packed with other settings.
    """
    start = time.monotonic()
    if samples_per_shard is None and max_shard_bytes is None:
        raise ValueError("set samples_per_shard, max_shard_bytes or both; otherwise every sample lands in one shard")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < TAR_RECORD:
        raise ValueError(f"max_shard_bytes must be at least {TAR_RECORD} (one tar record), got {max_shard_bytes}")
    if not prefix or "/" in prefix or not is_valid_key(prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
    fs, root = fsspec.core.url_to_fs(output, **dict(storage_options or {}))
    root = root.rstrip("/") or root
    fs.makedirs(root, exist_ok=True)

    settings = {**plan.settings, "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                "prefix": prefix, "format_version": FORMAT_VERSION,
                "classes_sha256": settings_hash({k: v for k, v in plan.classes.to_dict().items() if k != "source"})}
    digest = settings_hash(settings)
    classes = replace(plan.classes, source={**plan.classes.source, "settings": settings, "settings_hash": digest})
    _check_classes_file(fs, root, classes, prefix)
    index = _committed(fs, root, prefix)
    kept = len(index)
    if index:
        last = index[shard_name(prefix, kept - 1)]
        position = last.first_item + last.num_items
        logger.info("%s: resuming after %d committed shards at item %d of %d", output, kept, position,
                    len(plan.items))
    else:
        position = 0

    skipped: collections.Counter = collections.Counter(plan.stats)
    written = samples_written = 0
    shard: _OpenShard | None = None
    first_free = position  # first item not yet attributed to a committed shard

    def commit() -> None:
        nonlocal shard, written, first_free
        assert shard is not None
        entry = shard.commit()
        name = posixpath.basename(shard.path)
        index[name] = entry
        _write_text(fs, posixpath.join(root, INDEX_FILE), index_to_json(index))
        logger.info("committed %s: %d samples, %d bytes", name, entry.num_samples, entry.bytes)
        first_free = entry.first_item + entry.num_items
        written += 1
        shard = None

    items = plan.items[position:] if position else plan.items
    threads = max(1, int(io_threads))
    loaded = _ordered_map(plan.load, items, threads, 4 * threads)
    try:
        for item_index, result in enumerate(loaded, start=position):
            if isinstance(result, SkipItem):
                logger.warning("item %d skipped (%s): %s", item_index, result.reason, result)
                skipped[result.reason] += 1
                if shard is not None:
                    shard.num_items += 1
                continue
            if isinstance(result, BaseException):
                raise result
            if not is_valid_key(result.key):
                raise ValueError(f"item {item_index}: packer produced an unsafe sample key {result.key!r}")
            skipped.update(result.dropped)
            members = result.members()
            if (shard is not None and max_shard_bytes is not None and shard.num_samples
                    and shard.size_with(members) > max_shard_bytes):
                commit()
            if shard is None:
                shard = _OpenShard(fs, posixpath.join(root, shard_name(prefix, kept + written)), first_free)
                shard.num_items = item_index - first_free
                if max_shard_bytes is not None and shard.size_with(members) > max_shard_bytes:
                    logger.warning("item %d (%s) alone makes a %d-byte shard, over max_shard_bytes=%d", item_index,
                                   result.key, shard.size_with(members), max_shard_bytes)
            shard.write(result.key, members)
            shard.num_items += 1
            samples_written += 1
            if samples_per_shard is not None and shard.num_samples >= samples_per_shard:
                commit()
        if shard is not None:
            commit()
        if not index:
            _write_text(fs, posixpath.join(root, INDEX_FILE), index_to_json(index))
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        loaded.close()  # stops the loader threads now, not when the traceback is collected
    return PackSummary(
        output=output, dataset=classes.dataset, kind=classes.kind, num_classes=len(classes.classes),
        items=len(plan.items), shards=len(index), samples=sum(e.num_samples for e in index.values()),
        shards_written=written, samples_written=samples_written, shards_kept=kept, skipped=dict(skipped),
        seconds=time.monotonic() - start)
