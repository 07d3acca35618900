"""Request parsing for ``ovsam serve``: every field checked before the model sees it, and the API's errors.

Each ``parse_*`` takes the decoded JSON body and returns a plain dataclass, or raises :class:`ApiError` naming the
field (``points[2][0]``) and what was wrong with it. Coordinates are original-image pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("rle", "polygon")
MAX_POINTS = 64
MAX_TOP_K = 100
MAX_NAMES = 25_000
MAX_NAME_CHARS = 200
MAX_POINTS_PER_SIDE = 64
MAX_DETECT_CLASSES = 256
MAX_DETECTIONS = 1000


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a stable ``code``, the ``field`` at fault (or None) and a
    message for people."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __reduce__(self):  # keeps every field across processes (Ray pickles it between replicas)
        return (type(self), (self.status, self.code, self.message, self.field))

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


def invalid(field_name: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", message, field_name)


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__)


def _object(body: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", f"the {what} must be a JSON object, got {_type_name(body)}")
    return body


def _no_extra(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in body:
        if key not in allowed:
            raise invalid(key, f"unknown field; expected some of {', '.join(allowed)}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise invalid(name, f"must be a finite number, got {value}")
    return float(value)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise invalid(name, f"must be an integer, got {_type_name(value)} {value!r}"[:200])
    if not low <= value <= high:
        raise invalid(name, f"must be in [{low}, {high}], got {value}")
    return int(value)


def _fraction(value: Any, name: str) -> float:
    v = _number(value, name)
    if not 0.0 <= v <= 1.0:
        raise invalid(name, f"must be in [0, 1], got {v}")
    return v


def _string(value: Any, name: str, max_chars: int = 200) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {_type_name(value)}")
    if not value or len(value) > max_chars:
        raise invalid(name, f"must be 1 to {max_chars} characters, got {len(value)}")
    return value


def _optional_string(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return None if value is None else _string(value, key)


def _format(body: dict[str, Any]) -> str:
    fmt = body.get("format", "rle")
    if fmt not in FORMATS:
        raise invalid("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}"[:200])
    return fmt


@dataclass
class SegmentParams:
    """One interactive prompt: ``points`` ``[[x, y, label], ...]``, ``box`` or None, ``previous`` the id of an
    earlier answer whose low-res logits are fed back, ``vocabulary`` an id or None (the default)."""

    points: list[list[float]] = field(default_factory=list)
    box: list[float] | None = None
    previous: str | None = None
    vocabulary: str | None = None
    top_k: int = 5
    format: str = "rle"


def parse_segment(body: Any, width: int, height: int) -> SegmentParams:
    """``POST /v1/images/{id}/segment``'s body, for an image of ``width x height``."""
    body = _object(body)
    _no_extra(body, ("points", "box", "previous", "vocabulary", "top_k", "format"))
    out = SegmentParams(previous=_optional_string(body, "previous"), vocabulary=_optional_string(body, "vocabulary"),
                        top_k=_integer(body.get("top_k", 5), "top_k", 1, MAX_TOP_K), format=_format(body))
    points = body.get("points")
    if points is not None:
        if not isinstance(points, list):
            raise invalid("points", f"must be an array of [x, y, label], got {_type_name(points)}")
        if len(points) > MAX_POINTS:
            raise invalid("points", f"at most {MAX_POINTS} points, got {len(points)}")
        for i, p in enumerate(points):
            name = f"points[{i}]"
            if not isinstance(p, list) or len(p) not in (2, 3):
                raise invalid(name, f"must be [x, y] or [x, y, label], got {p!r}"[:200])
            x = _number(p[0], f"{name}[0]")
            y = _number(p[1], f"{name}[1]")
            label = 1 if len(p) == 2 else _integer(p[2], f"{name}[2]", 0, 1)
            if not (0 <= x <= width and 0 <= y <= height):
                raise invalid(name, f"({x:g}, {y:g}) lies outside the {width}x{height} image "
                                    f"(x in [0, {width}], y in [0, {height}])")
            out.points.append([x, y, label])
    box = body.get("box")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise invalid("box", f"must be [x0, y0, x1, y1], got {box!r}"[:200])
        b = [_number(v, f"box[{i}]") for i, v in enumerate(box)]
        if b[2] <= b[0] or b[3] <= b[1]:
            raise invalid("box", f"{b} has no area: needs x0 < x1 and y0 < y1")
        if b[0] < 0 or b[1] < 0 or b[2] > width or b[3] > height:
            raise invalid("box", f"{b} lies outside the {width}x{height} image")
        out.box = b
    if not out.points and out.box is None:
        raise invalid("points", "give points, a box, or both")
    return out


@dataclass
class EverythingParams:
    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.6
    box_nms_thresh: float = 0.85
    min_mask_area: int = 0
    vocabulary: str | None = None
    top_k: int = 5
    format: str = "rle"


def parse_everything(body: Any) -> EverythingParams:
    """``POST /v1/images/{id}/everything``'s body (every field optional)."""
    body = _object(body)
    d = EverythingParams()
    _no_extra(body, tuple(d.__dataclass_fields__))
    return EverythingParams(
        points_per_side=_integer(body.get("points_per_side", d.points_per_side), "points_per_side", 1,
                                 MAX_POINTS_PER_SIDE),
        pred_iou_thresh=_fraction(body.get("pred_iou_thresh", d.pred_iou_thresh), "pred_iou_thresh"),
        stability_score_thresh=_fraction(body.get("stability_score_thresh", d.stability_score_thresh),
                                         "stability_score_thresh"),
        box_nms_thresh=_fraction(body.get("box_nms_thresh", d.box_nms_thresh), "box_nms_thresh"),
        min_mask_area=_integer(body.get("min_mask_area", d.min_mask_area), "min_mask_area", 0, 1 << 40),
        vocabulary=_optional_string(body, "vocabulary"),
        top_k=_integer(body.get("top_k", d.top_k), "top_k", 1, MAX_TOP_K),
        format=_format(body),
    )


@dataclass
class VocabularySpec:
    """Either ``names`` (class names, each its own prompt) or ``builtin`` (``coco``, ``lvis``, ``imagenet21k``)."""

    names: list[str] | None = None
    builtin: str | None = None


def parse_vocabulary(body: Any, builtins: list[str]) -> VocabularySpec:
    """``POST /v1/vocabularies``'s body."""
    body = _object(body)
    _no_extra(body, ("names", "builtin"))
    if ("names" in body) == ("builtin" in body):
        raise invalid("names", "give exactly one of names (a list of class names) or builtin")
    if "builtin" in body:
        name = body["builtin"]
        if name not in builtins:
            raise invalid("builtin", f"must be one of {', '.join(builtins)}, got {name!r}"[:200])
        return VocabularySpec(builtin=name)
    names = body["names"]
    if not isinstance(names, list) or not names:
        raise invalid("names", f"must be a non-empty array of strings, got {_type_name(names)}")
    if len(names) > MAX_NAMES:
        raise invalid("names", f"at most {MAX_NAMES} names, got {len(names)}")
    clean: list[str] = []
    seen: set[str] = set()
    for i, n in enumerate(names):
        text = " ".join(_string(n, f"names[{i}]", MAX_NAME_CHARS).split())
        if not text:
            raise invalid(f"names[{i}]", "is blank")
        if text.lower() in seen:
            raise invalid(f"names[{i}]", f"{text!r} appears twice")
        seen.add(text.lower())
        clean.append(text)
    return VocabularySpec(names=clean)


@dataclass
class DetectParams:
    """``POST /v1/images/{id}/detect``: the typed classes (whitespace collapsed, duplicates dropped, in order), and
    this request's score threshold and cap of detector boxes (None: the server's)."""

    text: list[str]
    detector_score_thresh: float | None = None
    max_detections: int | None = None
    top_k: int = 5
    format: str = "rle"


DETECT_SCHEMA = {
    "type": "object", "required": ["text"],
    "properties": {
        "text": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_DETECT_CLASSES,
                 "description": "class names to find (a comma-separated string also works)"},
        "detector_score_thresh": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": "keep detector boxes scoring above this (default: the server's)"},
        "max_detections": {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS,
                           "description": "at most this many boxes (default: the server's)"},
        "top_k": {"type": "integer", "minimum": 1}, "format": {"enum": list(FORMATS)},
    },
}


def parse_detect(body: Any) -> DetectParams:
    """``POST /v1/images/{id}/detect``'s body: ``text`` (an array of class names, or one string of
    comma-separated names; a name's commas separate names too) and the optional fields."""
    body = _object(body)
    _no_extra(body, tuple(DETECT_SCHEMA["properties"]))
    if "text" not in body:
        raise invalid("text", "give the class names to find, e.g. [\"traffic cone\", \"pastry\"]")
    text = body["text"]
    items = [text] if isinstance(text, str) else text
    if not isinstance(items, list):
        raise invalid("text", f"must be an array of class names, got {_type_name(text)}")
    names: list[str] = []
    for i, item in enumerate(items):
        field_name = "text" if isinstance(text, str) else f"text[{i}]"
        if not isinstance(item, str):
            raise invalid(field_name, f"must be a string, got {_type_name(item)}")
        parts = [" ".join(part.split()) for part in item.split(",")]
        if not any(parts):
            raise invalid(field_name, "is blank; give a class name")
        for part in parts:
            if len(part) > MAX_NAME_CHARS:
                raise invalid(field_name, f"a class name is at most {MAX_NAME_CHARS} characters, got {len(part)}")
            if part and part not in names:
                names.append(part)
    if not names:
        raise invalid("text", "give at least one class name, e.g. [\"traffic cone\", \"pastry\"]")
    if len(names) > MAX_DETECT_CLASSES:
        raise invalid("text", f"at most {MAX_DETECT_CLASSES} class names, got {len(names)}")
    thresh = body.get("detector_score_thresh")
    cap = body.get("max_detections")
    return DetectParams(
        text=names,
        detector_score_thresh=None if thresh is None else _fraction(thresh, "detector_score_thresh"),
        max_detections=None if cap is None else _integer(cap, "max_detections", 1, MAX_DETECTIONS),
        top_k=_integer(body.get("top_k", 5), "top_k", 1, MAX_TOP_K), format=_format(body))


def parse_url(body: Any) -> str:
    """``POST /v1/images`` with a JSON body: ``{"url": "..."}``."""
    body = _object(body)
    _no_extra(body, ("url",))
    return _string(body.get("url"), "url", 4096)
