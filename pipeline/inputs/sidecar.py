"""Sidecar prompts: the optional ``json`` member of a sample, parsed and validated.

``parse_sidecar`` reads the bytes (UTF-8, or UTF-16/32 with a byte-order mark; at most ``max_sidecar_bytes``) into
a dict; ``validate_sidecar_prompts`` turns its ``boxes``, ``points``, ``scores`` and ``labels`` into clean arrays in
original-image pixels, dropping each NaN/inf/null, zero-area, inverted or outside prompt with a reason and clipping
boxes that are partly outside. The policy is described in ``pipeline/inputs/decode.py``, which calls both.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
from typing import Any

import numpy as np


logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDECAR_BYTES = 16 * 1024 * 1024


def short_text(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote input, and input can be megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite_vector(value: Any, length: int, what: str, index: int) -> list[float]:
    """A list of ``length`` real numbers (NaN/inf allowed here, filtered by the caller); ValueError otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{what}[{index}] must be a list of {length} numbers, got {short_text(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            if v is None:
                out.append(math.nan)
                continue
            raise ValueError(f"{what}[{index}] must be numeric, got {short_text(v)}")
        out.append(_to_float(v))
    return out


def _to_float(v: float) -> float:
    """JSON integers can exceed the float range; those become inf and are dropped like other non-finite values."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _clean_text(text: str) -> str:
    """JSON escapes can produce lone surrogates, which no UTF-8 writer (Arrow, Parquet) accepts: escape them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _optional_list(sidecar: dict, name: str) -> list | tuple | None:
    value = sidecar.get(name)
    if value is not None and not isinstance(value, (list, tuple)):
        raise ValueError(f"sidecar '{name}' must be a list, got {type(value).__name__} {short_text(value, 40)}")
    return value


def validate_sidecar_prompts(
    sidecar: dict, width: int, height: int, *, max_prompts: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[float | None], list[str | None], list[tuple[str, str]]]:
    """Validate a sidecar's ``boxes`` (``[[x0,y0,x1,y1], ...]``), ``points`` (``[[x,y], ...]``), ``scores`` and
    ``labels`` against an image of ``width`` x ``height`` original pixels.

    Returns ``(boxes_xyxy [N,4] float64, points [M,2] float64, scores, labels, dropped)`` where ``scores`` and
    ``labels`` align with the kept boxes and ``dropped`` holds ``("boxes[i]" | "points[i]", reason)``.
    Boxes with NaN/inf (or null) coordinates, zero or negative area, or lying entirely outside the image are
    dropped; boxes partly outside are clipped to ``[0, width] x [0, height]``; points outside or non-finite are
    dropped; with ``max_prompts``, valid boxes and then points past that many are dropped. Raises ``ValueError``
    for structurally malformed prompts (a value of the wrong type, wrong arity, non-numeric values, labels that
    are not strings or numbers, ``scores``/``labels`` whose length differs from ``boxes``).
    """
    if not isinstance(sidecar, dict):
        raise ValueError(f"sidecar must be a JSON object, got {type(sidecar).__name__}")
    raw_boxes = _optional_list(sidecar, "boxes") or []
    raw_points = _optional_list(sidecar, "points") or []
    raw_scores = _optional_list(sidecar, "scores")
    raw_labels = _optional_list(sidecar, "labels")
    for name, value in (("scores", raw_scores), ("labels", raw_labels)):
        if value is not None and len(value) != len(raw_boxes):
            raise ValueError(f"sidecar '{name}' has {len(value)} entries but 'boxes' has {len(raw_boxes)}")
    scores_in: list[float | None] = []
    for i, s in enumerate(raw_scores or [None] * len(raw_boxes)):
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise ValueError(f"scores[{i}] must be a number or null, got {short_text(s)}")
        scores_in.append(None if s is None or not math.isfinite(_to_float(s)) else _to_float(s))
    labels_in: list[str | None] = []
    for i, lb in enumerate(raw_labels or [None] * len(raw_boxes)):
        if lb is not None and (isinstance(lb, bool) or not isinstance(lb, (str, int, float))):
            raise ValueError(f"labels[{i}] must be a string, a number or null, got {short_text(lb)}")
        labels_in.append(None if lb is None else _clean_text(str(lb)))

    dropped: list[tuple[str, str]] = []
    boxes: list[list[float]] = []
    scores: list[float | None] = []
    labels: list[str | None] = []
    for i, raw in enumerate(raw_boxes):
        x0, y0, x1, y1 = _finite_vector(raw, 4, "boxes", i)
        where = f"boxes[{i}]"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            dropped.append((where, f"non-finite coordinate in {short_text(raw)}"))
            continue
        if x1 <= x0 or y1 <= y0:
            dropped.append((where, f"zero or negative area: {short_text(raw)}"))
            continue
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            dropped.append((where, f"entirely outside the {width}x{height} image: {short_text(raw)}"))
            continue
        if max_prompts is not None and len(boxes) >= max_prompts:
            dropped.append((where, f"over the limit of {max_prompts} prompts per sample"))
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
            dropped.append((where, f"non-finite coordinate in {short_text(raw)}"))
        elif not (0 <= x <= width and 0 <= y <= height):
            dropped.append((where, f"outside the {width}x{height} image: {short_text(raw)}"))
        elif max_prompts is not None and len(boxes) + len(points) >= max_prompts:
            dropped.append((where, f"over the limit of {max_prompts} prompts per sample"))
        else:
            points.append([x, y])
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(points, dtype=np.float64).reshape(-1, 2),
            scores, labels, dropped)


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def parse_sidecar(data: bytes, max_bytes: int = DEFAULT_MAX_SIDECAR_BYTES) -> dict:
    if len(data) > max_bytes:
        raise ValueError(f"sidecar JSON is {len(data)} bytes, over the limit of {max_bytes} bytes; not parsed")
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(f"sidecar JSON is not UTF-8: {exc}") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed sidecar JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError("malformed sidecar JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise ValueError(f"malformed sidecar JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"sidecar JSON must be an object, got {type(value).__name__}")
    return value


