"""Teacher cache for SAM2CLIP distillation: SAM image embeddings written next to the original image bytes.

``ovsam distill --dump-teacher`` runs the teacher (a ``sam-*`` model) once over image shards and writes, per input
shard, a WebDataset shard of the same name under the output root. Each sample keeps the input's members (the
original image bytes, never re-encoded, and the ``json`` sidecar if any) under the input's key and adds
``<key>.teacher.npy``: the teacher's ``[C, g, g]`` embedding as **float16 ``.npy`` bytes** (``numpy.save``, no
pickle), about 2 MiB per image for SAM ViT-H. The root also holds

``_teacher.json``
    what made the cache: teacher name, checkpoint file name, size and SHA-256, the input preprocessing
    (:class:`~pipeline.training.distill_data.InputSpec`), the embedding shape, dtype and encoding. Training checks its
    student against it; a dump with another teacher or preprocessing into the same root is refused.
``<name>.idx.json``
    per shard, written after the shard's tar is complete and moved into place: the commit point. It holds the
    sample count (read by the annotation reader and by training), the samples left out with their reasons, the
    input URL, bytes and SHA-256 of the tar.
``_index.json``
    ``{"<name>.tar": {"num_samples", "bytes", "first_item", "num_items", "sha256"}}`` over the committed shards
    (``schemas/training.py``'s ``ShardEntry``), rewritten after each commit.

A rerun skips committed shards and rewrites the others from the start; leftovers of killed attempts in
``_tmp/`` are removed first. Everything goes through fsspec, so the output may be any URL fsspec writes. No Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from schemas.training import INDEX_FILE, ShardEntry, index_from_json, index_to_json

from pipeline.inputs.decode import ImageDecodeError, decode_image
from pipeline.training.distill_data import EMBEDDING_EXT, InputSpec, encode_embedding, image_member
from pipeline.training.packers.writer import HashingWriter
from pipeline.inputs.sources import ShardRef, iter_samples, tar_stem

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ovsam-teacher-cache"
CACHE_VERSION = 1
CACHE_FILE = "_teacher.json"
TMP_DIR = "_tmp"


@dataclass(frozen=True)
class CacheInfo:
    """The contents of ``_teacher.json``. ``checkpoint`` is the teacher file's base name (None: the config's
    seeded random init), ``checkpoint_sha256``/``checkpoint_bytes`` identify it."""

    teacher: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    checkpoint_bytes: int | None
    spec: InputSpec
    embedding_shape: tuple[int, int, int]
    dtype: str = "float16"
    encoding: str = "npy"
    format: str = CACHE_FORMAT
    version: int = CACHE_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["embedding_shape"] = list(self.embedding_shape)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = CACHE_FILE) -> CacheInfo:
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != CACHE_FORMAT:
            raise ValueError(f"{where}: expected a {CACHE_FORMAT!r} file written by `ovsam distill --dump-teacher`, "
                             f"got format {d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        if d.get("version") != CACHE_VERSION:
            raise ValueError(f"{where}: cache version {d.get('version')!r}; this build reads version {CACHE_VERSION}")
        try:
            return cls(teacher=str(d["teacher"]), checkpoint=d["checkpoint"], checkpoint_sha256=d["checkpoint_sha256"],
                       checkpoint_bytes=d["checkpoint_bytes"], spec=InputSpec.from_dict(d["spec"]),
                       embedding_shape=tuple(int(v) for v in d["embedding_shape"]), dtype=d["dtype"],
                       encoding=d["encoding"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed teacher cache description ({type(e).__name__}: {e})") from None

    def differences(self, other: CacheInfo) -> list[str]:
        a, b = json.loads(self.to_json()), json.loads(other.to_json())
        return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]


def file_identity(path: str | Path | None) -> tuple[str | None, str | None, int | None]:
    """``(base name, SHA-256, size)`` of a checkpoint file, or ``(None, None, None)``."""
    if path is None:
        return None, None, None
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return Path(path).name, digest.hexdigest(), size


def _fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, root.rstrip("/") or root


def _read_text(fs: Any, path: str) -> str | None:
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None


def _write_text(fs: Any, path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    fs.pipe_file(tmp, text.encode("utf-8"))
    fs.mv(tmp, path)


def read_cache_info(url: str, storage_options: dict | None = None) -> CacheInfo:
    """``_teacher.json`` of the cache at ``url``; ``ValueError`` if there is none."""
    fs, root = _fs(url, storage_options)
    path = posixpath.join(root, CACHE_FILE)
    text = _read_text(fs, path)
    if text is None:
        raise ValueError(f"{url} has no {CACHE_FILE}: it is not a teacher cache; write one with "
                         "`ovsam distill --dump-teacher --output URL`")
    return CacheInfo.from_json(text, path)


def open_cache(url: str, info: CacheInfo, storage_options: dict | None = None) -> None:
    """Start or resume a dump into ``url``: write ``_teacher.json``, or check the existing one equals ``info``;
    remove leftovers of killed attempts from ``_tmp/``."""
    fs, root = _fs(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, CACHE_FILE)
    text = _read_text(fs, path)
    if text is None:
        _write_text(fs, path, info.to_json())
    else:
        old = CacheInfo.from_json(text, path)
        changed = old.differences(info)
        if changed:
            raise ValueError(f"{url} holds a teacher cache made differently ({'; '.join(changed[:4])}); rerun with "
                             "the same teacher, checkpoint and preprocessing to resume, or dump into another --output")
    tmp = posixpath.join(root, TMP_DIR)
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)


def committed(url: str, storage_options: dict | None = None) -> dict[str, dict]:
    """``{shard name: its .idx.json record}`` for every committed shard of the cache at ``url``."""
    fs, root = _fs(url, storage_options)
    fs.invalidate_cache(root)
    out = {}
    try:
        paths = fs.glob(posixpath.join(root, "*.idx.json"))
    except FileNotFoundError:
        return {}
    for path in sorted(paths):
        name = posixpath.basename(path)[: -len(".idx.json")]
        text = _read_text(fs, path)
        if text is not None:
            out[name] = json.loads(text)
    return out


def cache_shards(url: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the committed shards of the cache at ``url``, in name order (``ValueError`` if none)."""
    read_cache_info(url, storage_options)
    done = committed(url, storage_options)
    if not done:
        raise ValueError(f"teacher cache {url} has no committed shard yet; run `ovsam distill --dump-teacher` "
                         "to completion first")
    base = url.rstrip("/")
    return [f"{base}/{name}.tar" for name in sorted(done)]


def write_index(url: str, storage_options: dict | None = None) -> dict[str, ShardEntry]:
    """Rewrite ``_index.json`` from the committed shards' records; returns it."""
    fs, root = _fs(url, storage_options)
    index: dict[str, ShardEntry] = {}
    first = 0
    for name, rec in sorted(committed(url, storage_options).items()):
        index[f"{name}.tar"] = ShardEntry(num_samples=int(rec["num_samples"]), bytes=int(rec["bytes"]),
                                          first_item=first, num_items=int(rec["num_items"]), sha256=rec["sha256"])
        first += int(rec["num_items"])
    _write_text(fs, posixpath.join(root, INDEX_FILE), index_to_json(index))
    return index


@dataclass
class ShardDump:
    """What dumping one shard did."""

    name: str
    source: str
    num_samples: int = 0
    num_items: int = 0
    skipped: list[dict] = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""
    seconds: float = 0.0


@torch.no_grad()
def dump_shard(teacher: Any, spec: InputSpec, shard: ShardRef, output: str, *, batch_size: int = 8,
               storage_options: dict | None = None) -> ShardDump:
    """Write ``output/<shard.name>.tar`` with each sample's members plus its teacher embedding, then commit it.

    Images are prepared with ``spec`` and encoded by ``teacher.encode_image`` ``batch_size`` at a time; samples
    without a decodable image (or with read errors) are left out and listed in the shard's record."""
    import time

    import webdataset as wds

    start = time.perf_counter()
    fs, root = _fs(output, storage_options)
    name = shard.name
    result = ShardDump(name=name, source=shard.url)
    tmp = posixpath.join(root, TMP_DIR, f"{name}.{uuid.uuid4().hex[:8]}.tar")
    final = posixpath.join(root, f"{name}.tar")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    pending: list[tuple[dict[str, bytes], torch.Tensor]] = []

    def flush(sink: Any) -> None:
        if not pending:
            return
        inputs = torch.stack([x for _, x in pending]).to(teacher.device)
        embeddings = teacher.encode_image(inputs).float().cpu()
        for (members, _), emb in zip(pending, embeddings):
            sink.write({**members, EMBEDDING_EXT: encode_embedding(emb)})
        result.num_samples += len(pending)
        pending.clear()

    with fs.open(tmp, "wb") as raw:
        hashing = HashingWriter(raw)
        with wds.TarWriter(hashing, encoder=False, mtime=0) as sink:
            reader = iter_samples(shard.url, storage_options)
            for sample in reader:
                result.num_items += 1
                ext = image_member(sample)
                reason = "; ".join(sample.errors) if sample.errors else None
                image = None
                if reason is None and ext is None:
                    reason = "no image member"
                if reason is None:
                    try:
                        image, _, _ = decode_image(sample.files[ext], extension=ext)
                    except ImageDecodeError as e:
                        reason = f"{ext}: {e}"
                if reason is not None:
                    logger.warning("%s/%s: left out of the teacher cache: %s", shard.url, sample.key, reason)
                    result.skipped.append({"key": sample.key, "reason": reason})
                    continue
                members = {"__key__": sample.key, ext: sample.files[ext]}
                if "json" in sample.files:
                    members["json"] = sample.files["json"]
                pending.append((members, spec.prepare(image)))
                if len(pending) >= batch_size:
                    flush(sink)
            flush(sink)
            report = reader.report
            if report is not None and (report.error or report.truncated or report.read_failed):
                if report.read_failed:
                    raise OSError(f"{shard.url}: reading failed ({report.error}); rerun to retry this shard")
                logger.warning("%s: %s", shard.url, report.error or "truncated")
                result.skipped.append({"key": None, "reason": report.error or "shard truncated"})
    result.bytes, result.sha256 = hashing.size, hashing.sha256.hexdigest()
    fs.mv(tmp, final)
    result.seconds = time.perf_counter() - start
    record = {"num_samples": result.num_samples, "num_items": result.num_items, "bytes": result.bytes,
              "sha256": result.sha256, "source": shard.url, "skipped": result.skipped}
    _write_text(fs, posixpath.join(root, f"{tar_stem(name)}.idx.json"), json.dumps(record, indent=1))
    return result


def read_index(url: str, storage_options: dict | None = None) -> dict[str, ShardEntry]:
    """The cache's ``_index.json`` (empty if not written yet)."""
    fs, root = _fs(url, storage_options)
    text = _read_text(fs, posixpath.join(root, INDEX_FILE))
    return {} if text is None else index_from_json(text)
