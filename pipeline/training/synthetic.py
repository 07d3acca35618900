"""A synthetic world of coloured shapes on textured backgrounds, written as WebDataset shards.

Each scene holds a few objects (a colour x shape class, e.g. ``red circle``) at random sizes and places, drawn in
order so later objects occlude earlier ones; every object's visible mask, its box and its class are known exactly.
Image sizes and aspect ratios vary. ``write_shards`` packs scenes into ``<prefix>-NNNNNN.tar`` shards with the
``webdataset`` library: ``<key>.jpg`` plus a ``<key>.json`` sidecar holding the boxes and class names (the form an
upstream detector's output takes), the visible masks as COCO RLE, and a ``<shard>.idx.json`` sample count so
truncation is detectable.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 180, 70), "blue": (45, 80, 220), "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
SIZES: tuple[tuple[int, int], ...] = ((240, 320), (320, 320), (360, 480), (480, 360), (300, 560))


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its class, visible mask (``HxW`` bool) and the mask's box (``xyxy``, pixels)."""

    name: str
    mask: np.ndarray
    box_xyxy: tuple[float, float, float, float]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    period_x, period_y = rng.uniform(5, 14), rng.uniform(15, 30)
    stripes = 16.0 * np.sin(xx / period_x + yy / period_y) + 9.0 * np.sin(yy / rng.uniform(4, 8))
    base = rng.uniform(85, 150, size=3)
    noise = rng.normal(0.0, 8.0, size=(height, width, 3))
    return np.clip(base + stripes[..., None] + noise, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, height: int, width: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        corners = 4 if shape == "square" else 3
        draw.regular_polygon((cx, cy, r), corners, rotation=angle, fill=255)
    return np.asarray(canvas) > 0


def draw_scene(rng: np.random.Generator, height: int, width: int, num_objects: int,
               min_visible: float = 0.35) -> tuple[np.ndarray, list[SceneObject]]:
    """A ``HxWx3`` uint8 RGB scene and its objects (those left with less than ``min_visible`` of their area visible
    after occlusion are dropped from the list, their pixels stay drawn)."""
    image = _background(rng, height, width)
    s = min(height, width)
    drawn: list[tuple[str, np.ndarray]] = []
    for _ in range(num_objects):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        r = rng.uniform(0.09, 0.22) * s
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        mask = _shape_mask(shape, height, width, cx, cy, r, float(rng.uniform(0, 360)))
        shade = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 10, size=3), 0, 255)
        image[mask] = shade.astype(np.uint8)
        drawn.append((f"{colour} {shape}", mask))
    objects = []
    covered = np.zeros((height, width), dtype=bool)
    for name, mask in reversed(drawn):
        visible = mask & ~covered
        covered |= mask
        if visible.sum() < min_visible * mask.sum() or not visible.any():
            continue
        ys, xs = np.nonzero(visible)
        objects.append(SceneObject(name, visible, (float(xs.min()), float(ys.min()),
                                                   float(xs.max() + 1), float(ys.max() + 1))))
    return image, objects[::-1]


def scene_sidecar(objects: list[SceneObject]) -> dict[str, Any]:
    """The sidecar of a scene: boxes, class names, unit scores and the visible masks as COCO RLE."""
    from ovsam.masks import encode_rle

    masks = np.stack([o.mask for o in objects]) if objects else np.zeros((0, 1, 1), dtype=bool)
    return {"boxes": [list(o.box_xyxy) for o in objects], "labels": [o.name for o in objects],
            "scores": [1.0] * len(objects), "masks": encode_rle(masks) if objects else []}


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(directory: str | Path, *, num_shards: int = 2, samples_per_shard: int = 8, seed: int = 0,
                 prefix: str = "shard", max_objects: int = 4, bad_samples: bool = False) -> list[Path]:
    """Write ``num_shards`` shards of synthetic scenes into ``directory``; returns their paths.

    With ``bad_samples`` the last shard ends with a truncated JPEG and a sample whose sidecar is not JSON, so a
    run over the shards shows how bad input is reported. The same arguments always write the same bytes.
    """
    import webdataset as wds

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard_index in range(num_shards):
        path = directory / f"{prefix}-{shard_index:06d}.tar"
        count = 0
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
            for i in range(samples_per_shard):
                height, width = SIZES[int(rng.integers(len(SIZES)))]
                image, objects = draw_scene(rng, height, width, int(rng.integers(1, max_objects + 1)))
                sink.write({"__key__": f"{shard_index:06d}/{i:06d}", "jpg": _jpeg(image),
                            "json": json.dumps(scene_sidecar(objects)).encode()})
                count += 1
            if bad_samples and shard_index == num_shards - 1:
                good = _jpeg(draw_scene(rng, 240, 320, 1)[0])
                sink.write({"__key__": f"{shard_index:06d}/truncated-jpeg", "jpg": good[: len(good) // 2],
                            "json": b'{"boxes": [[10, 10, 100, 100]]}'})
                sink.write({"__key__": f"{shard_index:06d}/broken-sidecar", "jpg": good,
                            "json": b'{"boxes": [[10, 10, 100'})
                count += 2
        (directory / f"{prefix}-{shard_index:06d}.idx.json").write_text(json.dumps({"num_samples": count}))
        paths.append(path)
    return paths
