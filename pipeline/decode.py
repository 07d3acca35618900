"""Decode one WebDataset sample into an RGB array plus validated sidecar prompts, or a status row with a reason.

Contract of ``decode_sample``: it never raises for bad input. Every outcome is a ``DecodedSample`` whose ``status``
is one of ``ok | decode_error | bad_prompt | no_prompts`` (``model_error`` is set later by the model stage) and,
unless ``ok``, whose ``error`` says why in words a person can act on.

Image policy:

- The image is the first present member among ``jpg``, ``jpeg``, ``png``, ``webp`` (in that order).
- Dimensions are checked against ``max_pixels`` from the header, before pixel data is decoded.
- Pixel data is decoded completely (``LOAD_TRUNCATED_IMAGES`` forced off), so truncated files are errors.
- EXIF orientation is applied; ``width``/``height`` are those of the oriented image.
- Every mode becomes ``HxWx3`` uint8 RGB. Alpha (``RGBA``, ``LA``, ``P`` with transparency, ...) is composited
  onto a white background, so transparent regions look the way viewers show them rather than exposing whatever
  colour the encoder left under alpha = 0. 16-bit data (``I;16*``, or ``I`` with values up to 65535) keeps its
  high byte (``>> 8``); ``I``/``F`` data outside that range is min-max scaled.

Sidecar policy (``json`` member, optional): malformed JSON or malformed prompt lists give ``bad_prompt`` (the image
is still decoded, so ``width``/``height`` are known). Individual boxes/points that are NaN/inf, zero-area,
inverted or entirely outside the image are dropped with a reason; boxes partly outside are clipped.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sources import Sample

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
STATUSES = ("ok", "decode_error", "bad_prompt", "no_prompts", "model_error")
_PIL_LOCK = threading.Lock()
_STRICT: dict[str, Any] = {"depth": 0, "saved": False}


@dataclass
class DecodedSample:
    """A decoded sample. ``image`` is ``HxWx3`` uint8 RGB or None; ``boxes_xyxy`` ``[N, 4]`` float64 and
    ``points`` ``[M, 2]`` float64 in original (EXIF-oriented) pixels; ``scores``/``labels`` align with
    ``boxes_xyxy``; ``dropped_prompts`` lists ``(index, reason)`` for prompts that were discarded."""

    key: str
    image: np.ndarray | None
    width: int | None
    height: int | None
    source_format: str | None
    status: str
    error: str | None
    sidecar: dict | None
    shard: str = ""
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float64))
    scores: list[float | None] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    dropped_prompts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_prompts_dropped(self) -> int:
        return len(self.dropped_prompts)

    @property
    def has_prompts(self) -> bool:
        return bool(self.boxes_xyxy.shape[0] or self.points.shape[0])


class ImageDecodeError(ValueError):
    """The image member could not be turned into RGB pixels; the message is the reason shown to users."""


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Force ``ImageFile.LOAD_TRUNCATED_IMAGES`` off while any decode is running, restoring the process's own
    setting when the last concurrent decode ends (decodes run in thread pools, so this is reference-counted).

    The flag is a Pillow module global: code in another thread of the same process that relies on it being True
    sees False while a decode here is running."""
    from PIL import ImageFile

    with _PIL_LOCK:
        if _STRICT["depth"] == 0:
            _STRICT["saved"] = ImageFile.LOAD_TRUNCATED_IMAGES
        _STRICT["depth"] += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _PIL_LOCK:
            _STRICT["depth"] -= 1
            if _STRICT["depth"] == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _STRICT["saved"]


def _to_rgb(img: Any) -> np.ndarray:
    """Any PIL mode -> ``HxWx3`` uint8 RGB (see the module docstring for the alpha and 16-bit policy)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        rgb = img
    elif mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if mode.startswith("I;16"):
            gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:
            lo, hi = float(np.nanmin(arr)) if arr.size else 0.0, float(np.nanmax(arr)) if arr.size else 0.0
            if mode == "I" and lo >= 0 and hi <= 255:
                gray = arr.astype(np.uint8)
            elif mode == "I" and lo >= 0 and hi <= 65535:
                gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)
            else:
                scale = 255.0 / (hi - lo) if hi > lo else 0.0
                gray = np.nan_to_num((arr.astype(np.float64) - lo) * scale).round().clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) or (
        mode in ("L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"conversion of mode {mode!r} gave shape {arr.shape}, expected HxWx3")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str, list[str]]:
    """Bytes of an image file -> (``HxWx3`` uint8 RGB, lowercase format name, notes).

    Raises ``ImageDecodeError`` with a reason for empty data, non-image bytes, images over ``max_pixels``
    (checked from the header before decoding), truncated or corrupt pixel data.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("image member is empty (0 bytes)")
    notes: list[str] = []
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image dimensions exceed the pixel limit (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes, starts with "
                               f"{data[:8]!r})") from exc
    except Exception as exc:
        raise ImageDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    fmt = (img.format or "unknown").lower()
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has empty dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, over max_pixels="
                               f"{max_pixels} (decompression bomb guard); not decoded")
    try:
        with _strict_truncation():
            img.load()
    except Exception as exc:
        raise ImageDecodeError(f"{fmt} pixel data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    try:
        oriented = ImageOps.exif_transpose(img)
        if oriented is not None:
            img = oriented
    except Exception as exc:
        notes.append(f"EXIF orientation ignored: {type(exc).__name__}: {exc}")
    try:
        arr = _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert mode {img.mode!r} to RGB: {type(exc).__name__}: {exc}") from exc
    return arr, fmt, notes


# ----------------------------------------------------------------------------------------------------------------
# Sidecar prompts


def _finite_vector(value: Any, length: int, what: str, index: int) -> list[float]:
    """A list of ``length`` real numbers (NaN/inf allowed here, filtered by the caller); ValueError otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{what}[{index}] must be a list of {length} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if v is None:
                out.append(math.nan)
                continue
            raise ValueError(f"{what}[{index}] must be numeric, got {v!r}")
        out.append(_to_float(v))
    return out


def _to_float(v: float) -> float:
    """JSON integers can exceed the float range; those become inf and are dropped like other non-finite values."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def validate_sidecar_prompts(
    sidecar: dict, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, list[float | None], list[str | None], list[tuple[str, str]]]:
    """Validate a sidecar's ``boxes`` (``[[x0,y0,x1,y1], ...]``), ``points`` (``[[x,y], ...]``), ``scores`` and
    ``labels`` against an image of ``width`` x ``height`` original pixels.

    Returns ``(boxes_xyxy [N,4] float64, points [M,2] float64, scores, labels, dropped)`` where ``scores`` and
    ``labels`` align with the kept boxes and ``dropped`` holds ``("boxes[i]" | "points[i]", reason)``.
    Boxes with NaN/inf (or null) coordinates, zero or negative area, or lying entirely outside the image are
    dropped; boxes partly outside are clipped to ``[0, width] x [0, height]``; points outside or non-finite are
    dropped. Raises ``ValueError`` for structurally malformed prompts (not a list, wrong arity, non-numeric
    values, ``scores``/``labels`` whose length differs from ``boxes``).
    """
    if not isinstance(sidecar, dict):
        raise ValueError(f"sidecar must be a JSON object, got {type(sidecar).__name__}")
    raw_boxes = sidecar.get("boxes") or []
    raw_points = sidecar.get("points") or []
    raw_scores = sidecar.get("scores")
    raw_labels = sidecar.get("labels")
    for name, value in (("boxes", raw_boxes), ("points", raw_points)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"sidecar '{name}' must be a list, got {type(value).__name__}")
    for name, value in (("scores", raw_scores), ("labels", raw_labels)):
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"sidecar '{name}' must be a list, got {type(value).__name__}")
        if len(value) != len(raw_boxes):
            raise ValueError(f"sidecar '{name}' has {len(value)} entries but 'boxes' has {len(raw_boxes)}")
    scores_in: list[float | None] = []
    for i, s in enumerate(raw_scores or [None] * len(raw_boxes)):
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise ValueError(f"scores[{i}] must be a number or null, got {s!r}")
        scores_in.append(None if s is None or not math.isfinite(_to_float(s)) else _to_float(s))
    labels_in: list[str | None] = [None if lb is None else str(lb) for lb in (raw_labels or [None] * len(raw_boxes))]

    dropped: list[tuple[str, str]] = []
    boxes: list[list[float]] = []
    scores: list[float | None] = []
    labels: list[str | None] = []
    for i, raw in enumerate(raw_boxes):
        x0, y0, x1, y1 = _finite_vector(raw, 4, "boxes", i)
        where = f"boxes[{i}]"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            dropped.append((where, f"non-finite coordinate in {raw!r}"))
            continue
        if x1 <= x0 or y1 <= y0:
            dropped.append((where, f"zero or negative area: {raw!r}"))
            continue
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            dropped.append((where, f"entirely outside the {width}x{height} image: {raw!r}"))
            continue
        clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                   min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        boxes.append(clipped)
        scores.append(scores_in[i])
        labels.append(labels_in[i])
    points: list[list[float]] = []
    for i, raw in enumerate(raw_points):
        x, y = _finite_vector(raw, 2, "points", i)
        where = f"points[{i}]"
        if not (math.isfinite(x) and math.isfinite(y)):
            dropped.append((where, f"non-finite coordinate in {raw!r}"))
        elif not (0 <= x <= width and 0 <= y <= height):
            dropped.append((where, f"outside the {width}x{height} image: {raw!r}"))
        else:
            points.append([x, y])
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(points, dtype=np.float64).reshape(-1, 2),
            scores, labels, dropped)


def _parse_sidecar(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"sidecar JSON is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed sidecar JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError("malformed sidecar JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError(f"sidecar JSON must be an object, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Samples


def decode_sample(
    sample: Sample,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_prompts: bool = False,
) -> DecodedSample:
    """Decode ``sample`` (see the module docstring). Never raises for bad input.

    Status precedence: read errors attached to the sample, a missing or undecodable image → ``decode_error``;
    malformed sidecar JSON or prompt lists → ``bad_prompt``; with ``require_prompts`` (sidecar prompt mode), a
    sample left with no valid box or point → ``no_prompts``; otherwise ``ok``. An unexpected exception is logged
    with its traceback and becomes ``decode_error`` naming the exception type.
    """
    try:
        return _decode_sample(sample, max_pixels=max_pixels, require_prompts=require_prompts)
    except Exception as exc:
        logger.exception("unexpected error decoding sample %s/%s", sample.shard, sample.key)
        return DecodedSample(key=sample.key, image=None, width=None, height=None, source_format=None,
                             status="decode_error", error=f"unexpected {type(exc).__name__} while decoding: {exc}",
                             sidecar=None, shard=sample.shard)


def _decode_sample(sample: Sample, *, max_pixels: int, require_prompts: bool) -> DecodedSample:
    out = DecodedSample(key=sample.key, image=None, width=None, height=None, source_format=None,
                        status="ok", error=None, sidecar=None, shard=sample.shard)
    sidecar_error: str | None = None
    if "json" in sample.files:
        try:
            out.sidecar = _parse_sidecar(sample.files["json"])
        except ValueError as exc:
            sidecar_error = str(exc)

    def fail(status: str, reason: str) -> DecodedSample:
        out.status, out.error = status, reason
        if sidecar_error and status == "decode_error":
            out.notes.append(sidecar_error)
        logger.debug("sample %s/%s: %s: %s", sample.shard, sample.key, status, reason)
        return out

    if sample.errors:
        return fail("decode_error", "; ".join(sample.errors))
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.files), None)
    if image_ext is None:
        members = ", ".join(sorted(sample.files)) or "none"
        return fail("decode_error", f"no image member (expected one of {', '.join(IMAGE_EXTENSIONS)}; "
                                    f"members: {members})")
    try:
        image, fmt, notes = decode_image(sample.files[image_ext], max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return fail("decode_error", f"{image_ext}: {exc}")
    out.image, out.source_format = image, fmt
    out.height, out.width = int(image.shape[0]), int(image.shape[1])
    out.notes.extend(notes)
    if sidecar_error:
        return fail("bad_prompt", sidecar_error)
    if out.sidecar is not None:
        try:
            boxes, points, scores, labels, dropped = validate_sidecar_prompts(out.sidecar, out.width, out.height)
        except (ValueError, TypeError) as exc:
            return fail("bad_prompt", f"invalid sidecar prompts: {exc}")
        out.boxes_xyxy, out.points, out.scores, out.labels, out.dropped_prompts = (
            boxes, points, scores, labels, dropped)
    if require_prompts and not out.has_prompts:
        detail = "; ".join(f"{w}: {r}" for w, r in out.dropped_prompts[:5])
        reason = "no valid box or point prompts in the sidecar" if out.sidecar is not None else "no sidecar"
        return fail("no_prompts", f"{reason}{' (dropped ' + detail + ')' if detail else ''}")
    return out
