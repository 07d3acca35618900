"""A synthetic WebDataset corpus for benchmarks: photo-like JPEGs of a few sizes with sidecar boxes.

Images are a smooth random background plus sensor-like noise with 3-10 filled shapes on top, saved as JPEG at
quality 90, so their file sizes and decode cost are close to real photos (flat synthetic images compress to a few
KB and decode unrealistically fast). Each sample's ``json`` sidecar holds the shapes' boxes (``xyxy``, original
pixels), a score and a label per box. A ``_index.json`` gives every shard's sample count, as a producer would.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_LABELS = ("rectangle", "ellipse")


@dataclass(frozen=True)
class CorpusStats:
    """What ``write_corpus`` wrote. ``sizes`` are ``(width, height)``."""

    shard_paths: tuple[str, ...]
    images: int
    boxes: int
    jpeg_bytes: int
    sizes: tuple[tuple[int, int], ...]

    @property
    def boxes_per_image(self) -> float:
        return self.boxes / max(self.images, 1)


def parse_sizes(spec: str) -> tuple[tuple[int, int], ...]:
    """``"640x480,1024x768"`` (width x height, comma-separated) -> ``((640, 480), (1024, 768))``."""
    sizes = []
    for part in spec.split(","):
        w, sep, h = part.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 16 or int(h) < 16:
            raise ValueError(f"--image-size expects WIDTHxHEIGHT[,WIDTHxHEIGHT...] with sides >= 16, "
                             f"e.g. 640x480,1024x768; got {spec!r}")
        sizes.append((int(w), int(h)))
    return tuple(sizes)


def photo_like(rng: np.random.Generator, width: int, height: int
               ) -> tuple[Image.Image, list[list[float]], list[str]]:
    """One RGB image, the ``xyxy`` boxes of the 3-10 shapes drawn on it and each shape's name."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.normal(0.0, 10.0, size=(height, width, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(int(rng.integers(3, 11))):
        bw = int(rng.integers(width // 10, width // 2))
        bh = int(rng.integers(height // 10, height // 2))
        x0 = int(rng.integers(0, width - bw))
        y0 = int(rng.integers(0, height - bh))
        box = [x0, y0, x0 + bw, y0 + bh]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        label = SHAPE_LABELS[int(rng.integers(0, len(SHAPE_LABELS)))]
        (draw.rectangle if label == "rectangle" else draw.ellipse)(box, fill=colour)
        boxes.append([float(v) for v in box])
        labels.append(label)
    return img, boxes, labels


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_corpus(directory: str | Path, shards: int, images_per_shard: int,
                 sizes: tuple[tuple[int, int], ...], *, seed: int = 0) -> CorpusStats:
    """Write ``shards`` tars of ``images_per_shard`` samples (``<key>.jpg`` + ``<key>.json``) into ``directory``.

    Image ``i`` of the corpus has size ``sizes[i % len(sizes)]``. Deterministic for a given ``seed``.
    """
    if shards < 1 or images_per_shard < 1:
        raise ValueError(f"need at least one shard and one image per shard; got shards={shards}, "
                         f"images_per_shard={images_per_shard}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, index = [], {}
    n_images = n_boxes = n_bytes = 0
    for s in range(shards):
        stem = f"bench-{s:06d}"
        path = directory / f"{stem}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for j in range(images_per_shard):
                width, height = sizes[n_images % len(sizes)]
                img, boxes, labels = photo_like(rng, width, height)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                jpeg = buf.getvalue()
                sidecar = {"boxes": boxes, "scores": [1.0] * len(boxes), "labels": labels}
                key = f"{stem}_{j:06d}"
                _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.json", json.dumps(sidecar).encode())
                n_images += 1
                n_boxes += len(boxes)
                n_bytes += len(jpeg)
        index[stem] = images_per_shard
        paths.append(str(path))
    (directory / "_index.json").write_text(json.dumps(index))
    return CorpusStats(tuple(paths), n_images, n_boxes, n_bytes, tuple(sizes))
