"""Overlays of annotation output for people to look at: the image, masks lightened and outlined, captions.

``render_overlay`` draws one image's instance rows (as stored in ``instances/<shard>.parquet``);
``write_overlays`` picks committed images with status ``ok`` from an annotation output, reads their pixels from
the original shards through the job's own reader and decoder (so EXIF rotation, palette and 16-bit handling are
exactly what the model saw) and writes one PNG per image.

What is drawn where: each mask is lightened (towards white, so the object keeps its hue, which may be what its
label is about) and gets a solid outline in its instance's colour along the inside of its edge; each caption (``"label score"``) sits on a dark plate
just above the mask's box (``box_xyxy``), or at the image's top edge when there is no room above, shifted left if
it would leave the image. Nothing else is drawn, so pixels outside every mask and caption keep their values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from pipeline.annotate.outputs import open_output, source_refs

logger = logging.getLogger(__name__)

#: Mask/box colours (RGB), cycled over the instances of an image.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 200, 0), (0, 220, 230), (240, 0, 240), (60, 230, 60), (255, 90, 60),
    (120, 140, 255), (255, 255, 255), (255, 150, 200), (160, 255, 180), (200, 120, 40),
)
MASK_ALPHA = 0.3  # how far a mask's pixels are lightened towards white (hue kept); its outline is solid
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _font(height: int, width: int) -> Any:
    from PIL import ImageFont

    size = int(max(10, min(28, round(min(height, width) / 30))))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(image: np.ndarray, instance_rows: list[dict]) -> Any:
    """The image with each instance's mask tinted and outlined, and a ``"label score"`` caption above its box.

    ``image`` is ``HxWx3`` uint8 RGB (as ``pipeline.inputs.decode.decode_sample`` returns it); ``instance_rows`` are rows
    of ``instances/<shard>.parquet`` for that image (``mask_rle`` with ``size == [H, W]``, ``box_xyxy`` in
    original pixels, ``label_name``, ``label_score``). Returns a ``PIL.Image.Image`` of size ``(W, H)``.
    """
    from PIL import Image, ImageDraw

    from ovsam.masks import decode_rle

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    line = max(1, round(min(h, w) / 250))
    for i, row in enumerate(instance_rows):
        size = list(row["mask_rle"]["size"])
        if size != [h, w]:
            raise ValueError(f"instance {row.get('instance_index', i)} of {row.get('image_key')!r}: mask size {size} "
                             f"!= image size [{h}, {w}]; the image is not the one that was annotated")
        mask = decode_rle([row["mask_rle"]])[0]
        colour = np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float32)
        out[mask] = (1.0 - MASK_ALPHA) * out[mask] + MASK_ALPHA * 255.0
        out[mask_edge(mask, line)] = colour
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")
    if not instance_rows:
        return canvas
    draw = ImageDraw.Draw(canvas)
    font = _font(h, w)
    boxes = []
    for row in instance_rows:
        x0, y0, x1, y1 = (float(v) for v in row["box_xyxy"])
        # box_xyxy has exclusive max edges
        boxes.append((max(0, int(np.floor(x0))), max(0, int(np.floor(y0))),
                      min(w - 1, int(np.ceil(x1)) - 1), min(h - 1, int(np.ceil(y1)) - 1)))
    for i, (row, box) in enumerate(zip(instance_rows, boxes)):
        caption = f"{row['label_name']} {float(row['label_score']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        pad = 2
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(box[0], max(0, w - tw))
        y = max(0, box[1] - th)
        plate = (x, y, min(w - 1, x + tw - 1), min(h - 1, y + th - 1))
        draw.rectangle(plate, fill=(0, 0, 0))
        draw.text((x + pad - left, y + pad - top), caption, fill=PALETTE[i % len(PALETTE)], font=font)
    return canvas


def mask_edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask pixels within ``width`` pixels (4-neighbour steps) of its outside: a ``width``-pixel outline drawn
    along the inside of the mask's edge, image borders counting as outside."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay_filename(shard: str, key: str) -> str:
    """``<shard>__<key>.png`` with ``/`` and every character outside ``[A-Za-z0-9._-]`` replaced by ``_``.

    Tar member names never become paths: a key that needed more than the ``/`` replacement (``..``, non-ASCII,
    very long) gets an 8-hex suffix of its sha1 so different keys keep different names.
    """
    flat = key.replace("/", "_")
    safe = _UNSAFE.sub("_", flat).lstrip(".") or "_"
    if safe != flat or len(safe) > 120:
        safe = f"{safe[:120]}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"
    return f"{_UNSAFE.sub('_', shard)}__{safe}.png"






def write_overlays(output: str, out_dir: str | Path, *, limit: int = 8, shards: list[str] | None = None,
                   storage_options: dict | None = None, on_written: Any = None) -> list[Path]:
    """Render up to ``limit`` committed images of the annotation output ``output`` into ``out_dir``.

    Images are taken in (shard, tar) order from committed shards; only status ``ok`` images are drawn (the others
    are counted and logged). ``shards`` gives the original shard URLs when ``run.json``/the manifests do not point
    at them any more. Returns the written paths (``<shard>__<key>.png``, see :func:`overlay_filename`);
    ``on_written(path, shard, key, instance_rows)`` is called after each (``label_name``, ``label_score``, ...).
    Raises ``ValueError`` when no committed shard can be matched to a tar, when a matched tar cannot be opened, or
    when a decoded image's size differs from the one recorded for it (the tar is not the one that was annotated).
    """
    from pipeline.inputs.decode import DEFAULT_MAX_PIXELS, decode_sample
    from pipeline.inputs.parquet import read_parquet
    from pipeline.inputs.sources import open_shard

    storage_options = dict(storage_options or {})
    fs, root, ledger, run, manifests = open_output(output, storage_options)
    done = sorted(ledger.committed_shards(run["config_hash"]) if run and "config_hash" in run else manifests)
    if not done:
        raise ValueError(f"{output} has no committed shards; expected the output of `ovsam annotate`")
    urls = source_refs(fs, root, done, manifests, run, shards, storage_options)
    if not urls:
        raise ValueError(f"none of the {len(done)} committed shards of {output} matched a shard in "
                         f"{shards or 'run.json'}; pass --shards with the original shard URLs")
    max_pixels = int((run or {}).get("config", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir.resolve()
    written: list[Path] = []
    skipped: dict[str, int] = {}
    for shard in done:
        if len(written) >= limit:
            break
        if shard not in urls:
            logger.info("shard %s: no matching input tar, skipped", shard)
            continue
        image_rows = read_parquet(fs, f"{root}/images/{shard}.parquet").to_pylist()
        wanted = {}
        for row in image_rows:
            if row["status"] == "ok":
                wanted[row["image_key"]] = row
            else:
                skipped[row["status"]] = skipped.get(row["status"], 0) + 1
        if not wanted:
            continue
        cols = ["image_key", "instance_index", "mask_rle", "box_xyxy", "label_name", "label_score"]
        instances = read_parquet(fs, f"{root}/instances/{shard}.parquet", columns=cols).to_pylist()
        by_key: dict[str, list[dict]] = {}
        for row in sorted(instances, key=lambda r: r["instance_index"]):
            by_key.setdefault(row["image_key"], []).append(row)
        reader = open_shard(urls[shard], storage_options)
        try:
            for sample in reader:
                if sample.key not in wanted:
                    continue
                decoded = decode_sample(sample, max_pixels=max_pixels)
                if decoded.image is None:
                    logger.warning("%s/%s was annotated but does not decode now (%s); skipped", shard, sample.key,
                                   decoded.error)
                    continue
                row = wanted.pop(sample.key)
                got = (decoded.image.shape[1], decoded.image.shape[0])
                if got != (row["width"], row["height"]):
                    raise ValueError(f"{urls[shard].url}: {sample.key!r} decodes to {got[0]}x{got[1]}, it was "
                                     "annotated "
                                     f"at {row['width']}x{row['height']}; pass --shards with the annotated shards")
                path = out_dir / overlay_filename(shard, sample.key)
                if path in written:  # two keys that differ only in "/" vs "_"
                    digest = hashlib.sha1(sample.key.encode("utf-8")).hexdigest()[:8]
                    path = path.with_name(f"{path.stem}-{digest}.png")
                assert path.resolve().parent == base, path
                render_overlay(decoded.image, by_key.get(sample.key, [])).save(path)
                written.append(path)
                if on_written is not None:
                    on_written(path, shard, sample.key, by_key.get(sample.key, []))
                if len(written) >= limit:
                    break
        finally:
            reader.close()
        report = reader.report
        if report is not None and report.read_failed and report.samples_read == 0:
            raise ValueError(f"shard {shard}: could not read {urls[shard].url} ({report.error}); pass --shards with "
                             "the original shard URLs")
        if wanted and len(written) < limit:
            logger.warning("shard %s: %d annotated images not found in %s", shard, len(wanted), urls[shard].url)
    if skipped:
        logger.info("skipped images by status: %s", json.dumps(skipped, sort_keys=True))
    return written


