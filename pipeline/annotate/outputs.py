"""Reading a committed annotation output back: its shards' tables, ``run.json``, the name each image gets in an
export, and the pixels of the source images it was made from.

Only committed shards are read: a shard counts iff ``_manifest/<shard>.json`` exists (the commit point). The source
images are found through the inputs recorded in ``run.json`` and the manifests (or given ``shards``) and decoded by
the job's own reader and decoder, so EXIF rotation, palette and 16-bit handling are exactly what the model saw.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.inputs.parquet import read_parquet

logger = logging.getLogger(__name__)


@dataclass
class ShardOutput:
    """The committed tables of one shard (pyarrow tables)."""

    shard: str
    images: Any
    instances: Any


def committed_shards(fs: Any, output: str) -> list[str]:
    """Shard names with a manifest under ``output``, sorted."""
    root = output.rstrip("/")
    fs.invalidate_cache(f"{root}/_manifest")  # s3fs would list from a cache that predates the workers' commits
    try:
        paths = fs.glob(f"{root}/_manifest/*.json")
    except FileNotFoundError:
        return []
    return sorted(p.rsplit("/", 1)[-1][: -len(".json")] for p in paths)


def iter_committed(fs: Any, output: str, columns: list[str] | None = None) -> Iterator[ShardOutput]:
    """Yield each committed shard's ``images`` and ``instances`` tables."""
    root = output.rstrip("/")
    for shard in committed_shards(fs, output):
        images = read_parquet(fs, f"{root}/images/{shard}.parquet")
        instances = read_parquet(fs, f"{root}/instances/{shard}.parquet", columns=columns)
        yield ShardOutput(shard, images, instances)


def read_run(fs: Any, output: str) -> dict:
    with fs.open(f"{output.rstrip('/')}/run.json", "r") as f:
        return json.load(f)


_FORMAT_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tif"}


def coco_file_name(shard: str, row: dict[str, Any]) -> str:
    """The name an export gives an annotated image: an image file's path relative to its input (``a/b.jpg``), or
    ``<shard>/<tar member name>`` (``shard-000000/000123.jpg``) for a tar sample. Outputs written before
    ``source_name`` existed get ``<shard>/<key>.<extension of the decoded format>``."""
    name = row.get("source_name")
    if name is None:
        ext = _FORMAT_EXTENSIONS.get(str(row.get("source_format") or "").lower(), "jpg")
        return f"{shard}/{row['image_key']}.{ext}"
    return name if name == row["image_key"] else f"{shard}/{name}"



def source_refs(fs: Any, root: str, shards_done: list[str], manifests: dict[str, dict], run: dict | None,
                 shards: list[str] | None, storage_options: dict) -> dict[str, Any]:
    """Committed shard name -> ``ShardRef`` of its input (a tar, or a virtual shard of image files).

    With ``shards`` (URLs, globs, brace patterns or list files), a committed shard is matched by the exact URL its
    manifest records, else by shard name (for a copy of the corpus elsewhere). Without, the inputs recorded in
    ``run.json`` are used the same way, and finally the manifest's own input URL.
    """
    from pipeline.inputs.image_files import VIRTUAL_MARK
    from pipeline.inputs.sources import ShardRef, expand_shards

    spec = shards if shards else (run or {}).get("config", {}).get("inputs")
    refs = []
    if spec:
        try:
            recorded_cfg = (run or {}).get("config", {})
            refs = expand_shards(list(spec), storage_options, allow_missing=True,
                                 images_per_shard=recorded_cfg.get("images_per_shard"),
                                 url_column=recorded_cfg.get("url_column"))
        except ValueError as e:
            if shards:
                raise
            logger.warning("the inputs recorded in run.json no longer expand (%s); using the manifests' URLs", e)
    by_url = {r.url: r for r in refs}
    by_name = {r.name: r for r in refs}
    out = {}
    for shard in shards_done:
        recorded = manifests[shard].get("input_url")
        if recorded in by_url:
            out[shard] = by_url[recorded]
        elif shard in by_name:
            out[shard] = by_name[shard]
        elif not shards and recorded and VIRTUAL_MARK not in recorded:
            out[shard] = ShardRef(recorded, shard)
    return out


def open_output(output: str, storage_options: dict) -> tuple[Any, str, Any, dict | None, dict[str, dict]]:
    """``(fs, root, ledger, run.json record, manifests)`` of an annotation output."""
    import fsspec

    from pipeline.annotate.ledger import Ledger

    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    ledger = Ledger(fs, root)
    return fs, root, ledger, ledger.run_record(), ledger.manifests()


def read_annotated_images(output: str, wanted: dict[str, set[str]], *, shards: list[str] | None = None,
                          storage_options: dict | None = None) -> dict[tuple[str, str], np.ndarray]:
    """The decoded pixels of some annotated images of ``output``: ``wanted`` maps a committed shard to image keys.
    They are read from the inputs recorded in run.json and the manifests (or ``shards``), each input once; an image
    that cannot be found or decoded any more is left out (and logged)."""
    from pipeline.inputs.decode import DEFAULT_MAX_PIXELS, decode_sample
    from pipeline.inputs.sources import open_shard

    storage_options = dict(storage_options or {})
    fs, root, _, run, manifests = open_output(output, storage_options)
    refs = source_refs(fs, root, sorted(s for s in wanted if s in manifests), manifests, run, shards,
                       storage_options)
    max_pixels = int((run or {}).get("config", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
    out: dict[tuple[str, str], np.ndarray] = {}
    for shard, keys in sorted(wanted.items()):
        if shard not in refs:
            logger.warning("shard %s: its input was not found; its images are not drawn", shard)
            continue
        left = set(keys)
        reader = open_shard(refs[shard], storage_options)
        try:
            for sample in reader:
                if sample.key in left:
                    decoded = decode_sample(sample, max_pixels=max_pixels)
                    left.discard(sample.key)
                    if decoded.image is not None:
                        out[(shard, sample.key)] = decoded.image
                    if not left:
                        break
        finally:
            reader.close()
        if left:
            logger.warning("shard %s: %d image(s) not found in %s", shard, len(left), refs[shard].url)
    return out


