"""What every packer shares: opening sources with fsspec, probing an image's format and size without decoding
it, class text, dataset prefixes, boxes and masks as the training format stores them (compressed COCO RLE).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import fsspec


from pipeline.training.packers.writer import SkipItem

logger = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "MPO": "jpg"}


_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def open_fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def read_source_json(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """The parsed JSON at ``url`` and the SHA-256 of its bytes (read once)."""
    fs, path = open_fs(url, storage_options)
    data = fs.cat_file(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return json.loads(data), digest
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url}: not a JSON file: {e}") from None


def probe_image(data: bytes) -> tuple[str, int, int]:
    """``(extension, width, height)`` of encoded image bytes, from the header only; ``SkipItem`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; every one means "not an image"
        raise SkipItem("unreadable_image", f"not a readable image ({len(data)} bytes): {type(e).__name__}: {e}")
    return _FORMAT_EXT.get(fmt or "", (fmt or "img").lower()), int(width), int(height)


def read_image(fs: Any, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise SkipItem("missing_image", f"{path}: no such file") from None


def class_text(synonyms: Sequence[str]) -> str:
    """``"name,synonym,..."``: commas inside a synonym become spaces, duplicates and empties are dropped."""
    out: list[str] = []
    for s in synonyms:
        s = " ".join(str(s).replace(",", " ").split())
        if s and s not in out:
            out.append(s)
    if not out:
        raise ValueError(f"a class needs a name, got {list(synonyms)!r}")
    return ",".join(out)


def dataset_prefix(dataset: str) -> str:
    """A shard-name prefix from a dataset name."""
    return _NAME.sub("_", dataset).strip("_") or "shard"


def xyxy(bbox: Any) -> list[float] | None:
    """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]``; None when it is not 4 finite numbers with w, h > 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    return [x, y, x + w, y + h]



def valid_segmentation(seg: Any, height: int | None, width: int | None) -> Any:
    """The segmentation in a form pycocotools takes (polygons as a list of lists), or None when malformed."""
    if isinstance(seg, list):
        if seg and all(isinstance(v, (int, float)) for v in seg):
            seg = [seg]  # one flat polygon
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            return None
        if height is not None and width is not None and [int(size[0]), int(size[1])] != [height, width]:
            return None
        if isinstance(seg["counts"], (str, bytes, list)):
            return seg
    return None


def encode_mask(mask: Any) -> dict[str, Any]:
    """A boolean ``HxW`` mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}``."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE ``{"size", "counts": str}``
    of an ``height x width`` image; polygons of one object are merged into one mask."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": [int(seg["size"][0]), int(seg["size"][1])],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


