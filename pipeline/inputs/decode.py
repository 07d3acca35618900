"""Decode one WebDataset sample into an RGB array plus validated sidecar prompts, or a status row with a reason.

Contract of ``decode_sample``: it never raises for bad input. Every outcome is a ``DecodedSample`` whose ``status``
is one of ``ok | decode_error | bad_prompt | no_prompts`` (``model_error`` is set later by the model stage) and,
unless ``ok``, whose ``error`` says why in words a person can act on.

Image policy:

- The image is the first present member among ``IMAGE_EXTENSIONS`` (``jpg``, ``jpeg``, ``png``, ``webp``, then
  ``gif``, ``bmp``, ``tif``, ``tiff``); other image members of the sample are noted, not decoded. Extensions are
  matched case-insensitively (the reader lowercases them).
- The content decides the decoder, not the extension (a JPEG in a ``.png`` member decodes, with a note), but only
  the formats in ``IMAGE_FORMATS`` are decoded: Pillow's other plugins (ICO, PSD, EPS, ...) are never run on
  shard data. Anything else is a ``decode_error`` that names what the bytes look like.
- Dimensions are checked against ``max_pixels`` from the header, before pixel data is decoded.
- Pixel data is decoded completely (``LOAD_TRUNCATED_IMAGES`` forced off while opening and decoding), so
  truncated files are errors.
- Animated or multi-page images (GIF, APNG, WebP, TIFF, MPO) give their first frame, with a note.
- EXIF orientations 2..8 are applied; ``width``/``height`` are those of the oriented image. A missing, invalid
  (0, 9, text) or unreadable orientation leaves the pixels as stored, with a note when it was present but unusable.
- Every mode becomes ``HxWx3`` uint8 RGB. Alpha (``RGBA``, ``LA``, ``P`` with transparency, ...) is composited
  onto a white background, so transparent regions look the way viewers show them rather than exposing whatever
  colour the encoder left under alpha = 0. 16-bit data (``I;16*``, or ``I`` with values up to 65535) keeps its
  high byte (``>> 8``); ``I``/``F`` data outside that range is min-max scaled over its finite values (NaN and
  -inf become black, +inf white).

Sidecar policy (``json`` member, optional): UTF-8 (a byte-order mark is allowed, as are UTF-16/32 with one). A
sidecar over ``max_sidecar_bytes``, malformed JSON or malformed prompt lists give ``bad_prompt`` (the image is
still decoded, so ``width``/``height`` are known). Individual boxes/points that are NaN/inf/null, zero-area,
inverted or entirely outside the image are dropped with a reason; boxes partly outside are clipped. Prompts past
``max_prompts`` per sample are dropped with a reason, which bounds the model stage's work per image.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.inputs.shard_bytes import describe_bytes
from pipeline.inputs.shard_io import Sample
from pipeline.inputs.sidecar import DEFAULT_MAX_SIDECAR_BYTES, parse_sidecar, short_text, validate_sidecar_prompts

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# Pillow format ids that may decode shard data (its JPEG reader also opens MPO, camera JPEGs with extra frames).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Members named like images in formats that are not decoded: they get a precise reason instead of "no image".
UNSUPPORTED_IMAGE_EXTENSIONS = ("heic", "heif", "avif", "jxl", "jp2", "j2k", "ico", "cur", "psd", "svg", "eps",
                                "pdf", "tga", "dds", "exr", "hdr", "pcx", "ppm", "pgm", "pbm", "pnm", "qoi",
                                "dng", "cr2", "cr3", "nef", "arw", "raw")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_PROMPTS = 1000
MAX_LISTED_DROPS = 20
STATUSES = ("ok", "decode_error", "bad_prompt", "no_prompts", "model_error")
_EXTENSION_FORMATS = {"jpg": ("jpeg", "mpo"), "jpeg": ("jpeg", "mpo"), "png": ("png",), "webp": ("webp",),
                      "gif": ("gif",), "bmp": ("bmp",), "tif": ("tiff",), "tiff": ("tiff",)}
# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                          6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_EXIF_ORIENTATION = 0x0112
_PIL_LOCK = threading.Lock()
_STRICT: dict[str, Any] = {"depth": 0, "saved": False}


@dataclass
class DecodedSample:
    """A decoded sample. ``image`` is ``HxWx3`` uint8 RGB or None; ``boxes_xyxy`` ``[N, 4]`` float64 and
    ``points`` ``[M, 2]`` float64 in original (EXIF-oriented) pixels; ``scores``/``labels`` align with
    ``boxes_xyxy``; ``dropped_prompts`` lists ``(where, reason)`` for discarded prompts (at most
    ``MAX_LISTED_DROPS`` of them plus a summary entry; ``num_prompts_dropped`` is the full count). ``source_name``
    is the image's name as exports write it: the tar member's (``<key>.<ext>``) or the image file's path."""

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
    dropped_total: int | None = None
    source_name: str | None = None

    @property
    def num_prompts_dropped(self) -> int:
        return len(self.dropped_prompts) if self.dropped_total is None else self.dropped_total

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




def _gray_to_u8(img: Any) -> np.ndarray:
    """Single-channel 16-bit/32-bit/float pixels -> ``HxW`` uint8 (see the module docstring)."""
    mode = img.mode
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if mode.startswith("I;16"):
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    values = np.where(finite, values, np.where(np.isposinf(values), hi, lo))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((values - lo) * scale).round().clip(0, 255).astype(np.uint8)


def _to_rgb(img: Any) -> np.ndarray:
    """Any PIL mode -> ``HxWx3`` uint8 RGB (see the module docstring for the alpha and 16-bit policy)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        rgb = img
    elif mode.startswith("I;16") or mode in ("I", "F"):
        gray = _gray_to_u8(img)
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


def _unidentified_reason(data: bytes) -> str:
    """Why none of ``IMAGE_FORMATS`` could open ``data``: the error of the plugin whose signature matches
    (a PNG with a bad header checksum), else what the bytes look like."""
    from PIL import Image

    Image.init()
    for fmt in IMAGE_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(data[:16])):
            continue
        try:
            factory(io.BytesIO(data), "").close()
        except Exception as exc:  # the plugin's own complaint is the most precise reason available
            return (f"cannot read image header ({fmt.lower()}); the file is truncated or corrupt: "
                    f"{type(exc).__name__}: {exc}")
    what = describe_bytes(data)
    supported = ", ".join(f.lower() for f in IMAGE_FORMATS)
    if what and ("image" in what or "icon" in what or "cursor" in what or "Photoshop" in what
                 or "texture" in what or "codestream" in what):
        return f"not a recognised image format: the data looks like {what}, which is not decoded (supported: " \
               f"{supported})"
    hint = f", looks like {what}" if what else ""
    return f"not a recognised image format ({len(data)} bytes, starts with {data[:8]!r}{hint})"


def apply_orientation(img: Any, notes: list[str]) -> Any:
    """Apply the EXIF orientation (2..8); unusable tags leave the image as stored, with a note."""
    from PIL import Image

    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception as exc:  # a corrupt EXIF block must not cost the image: the pixels are fine
        notes.append(f"EXIF block unreadable ({type(exc).__name__}: {exc}); orientation not applied")
        return img
    if orientation is None or orientation == 1:
        return img
    if isinstance(orientation, bool) or not isinstance(orientation, int) or orientation not in _ORIENTATION_TRANSPOSE:
        notes.append(f"EXIF orientation {short_text(orientation, 40)} is not one of 1..8; ignored")
        return img
    return img.transpose(getattr(Image.Transpose, _ORIENTATION_TRANSPOSE[orientation]))


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, extension: str | None = None
) -> tuple[np.ndarray, str, list[str]]:
    """Bytes of an image file -> (``HxWx3`` uint8 RGB, lowercase format name, notes).

    Raises ``ImageDecodeError`` with a reason for empty data, unsupported or non-image bytes, images over
    ``max_pixels`` (checked from the header before decoding), truncated or corrupt pixel data. ``extension``
    (the member's, e.g. ``"png"``) only adds a note when the content is another format.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("image member is empty (0 bytes)")
    notes: list[str] = []
    with _strict_truncation():
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"image dimensions exceed the pixel limit (decompression bomb): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(_unidentified_reason(data)) from exc
        except Exception as exc:
            raise ImageDecodeError(f"cannot read image header; the file is truncated or corrupt: "
                                   f"{type(exc).__name__}: {exc}") from exc
        fmt = (img.format or "unknown").lower()
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image has empty dimensions {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, over max_pixels="
                                   f"{max_pixels} (decompression bomb guard); not decoded")
        if extension is not None and fmt not in _EXTENSION_FORMATS.get(extension, (fmt,)):
            notes.append(f"member .{extension} holds {fmt} data; decoded as {fmt}")
        try:
            if getattr(img, "is_animated", False):
                notes.append(f"{fmt} has several frames or pages; the first was used")
        except Exception as exc:  # a broken later frame does not matter: only the first is decoded
            notes.append(f"could not inspect later frames ({type(exc).__name__}: {exc}); the first was used")
        try:
            img.load()
        except Exception as exc:
            raise ImageDecodeError(f"{fmt} pixel data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    img = apply_orientation(img, notes)
    try:
        arr = _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert mode {img.mode!r} to RGB: {type(exc).__name__}: {exc}") from exc
    return arr, fmt, notes


# ----------------------------------------------------------------------------------------------------------------
# Sidecar prompts
















# ----------------------------------------------------------------------------------------------------------------
# Samples


def decode_sample(
    sample: Sample,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    require_prompts: bool = False,
    max_sidecar_bytes: int = DEFAULT_MAX_SIDECAR_BYTES,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    use_sidecar_prompts: bool = True,
) -> DecodedSample:
    """Decode ``sample`` (see the module docstring). Never raises for bad input.

    With ``use_sidecar_prompts=False`` (prompt modes that ignore the sidecar: detector, grid, whole image), the
    sidecar's prompts are not read and a malformed sidecar is a note on an ``ok`` sample, not ``bad_prompt``.

    Status precedence: read errors attached to the sample, a missing or undecodable image → ``decode_error``;
    an oversized or malformed sidecar or malformed prompt lists → ``bad_prompt``; with ``require_prompts``
    (sidecar prompt mode), a sample left with no valid box or point → ``no_prompts``; otherwise ``ok``. An
    unexpected exception is logged with its traceback and becomes ``decode_error`` naming the exception type.
    """
    try:
        return _decode_sample(sample, max_pixels=max_pixels, require_prompts=require_prompts,
                              max_sidecar_bytes=max_sidecar_bytes, max_prompts=max_prompts,
                              use_sidecar_prompts=use_sidecar_prompts)
    except Exception as exc:
        logger.exception("unexpected error decoding sample %s/%s", sample.shard, sample.key)
        return DecodedSample(key=sample.key, image=None, width=None, height=None, source_format=None,
                             status="decode_error", error=f"unexpected {type(exc).__name__} while decoding: {exc}",
                             sidecar=None, shard=sample.shard, source_name=sample.source_name)


def _no_image_reason(sample: Sample) -> str:
    unsupported = [ext for ext in sample.files if ext in UNSUPPORTED_IMAGE_EXTENSIONS]
    if unsupported:
        reason = (f"image member .{unsupported[0]} is in a format that is not decoded (supported members: "
                  f"{', '.join(IMAGE_EXTENSIONS)})")
    else:
        members = ", ".join(sorted(sample.files)) or "none"
        reason = f"no image member (expected one of {', '.join(IMAGE_EXTENSIONS)}; members: {members})"
    if sample.notes:
        reason += "; " + "; ".join(sample.notes[:3])
    return reason


def _decode_sample(sample: Sample, *, max_pixels: int, require_prompts: bool, max_sidecar_bytes: int,
                   max_prompts: int, use_sidecar_prompts: bool = True) -> DecodedSample:
    out = DecodedSample(key=sample.key, image=None, width=None, height=None, source_format=None,
                        status="ok", error=None, sidecar=None, shard=sample.shard)
    out.notes.extend(sample.notes)
    out.source_name = sample.source_name
    sidecar_error: str | None = None
    if "json" in sample.files:
        try:
            out.sidecar = parse_sidecar(sample.files["json"], max_sidecar_bytes)
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
    present = [ext for ext in IMAGE_EXTENSIONS if ext in sample.files]
    if not present:
        return fail("decode_error", _no_image_reason(sample))
    image_ext = present[0]
    if out.source_name is None:
        out.source_name = f"{sample.key}.{image_ext}"
    if len(present) > 1:
        out.notes.append(f"several image members ({', '.join(present)}); decoded .{image_ext}")
    try:
        image, fmt, notes = decode_image(sample.files[image_ext], max_pixels=max_pixels, extension=image_ext)
    except ImageDecodeError as exc:
        return fail("decode_error", f"{image_ext}: {exc}")
    out.image, out.source_format = image, fmt
    out.height, out.width = int(image.shape[0]), int(image.shape[1])
    out.notes.extend(notes)
    if not use_sidecar_prompts:
        if sidecar_error:
            out.notes.append(f"sidecar ignored: {sidecar_error}")
        return out
    if sidecar_error:
        return fail("bad_prompt", sidecar_error)
    if out.sidecar is not None:
        try:
            boxes, points, scores, labels, dropped = validate_sidecar_prompts(
                out.sidecar, out.width, out.height, max_prompts=max_prompts)
        except (ValueError, TypeError) as exc:
            return fail("bad_prompt", f"invalid sidecar prompts: {exc}")
        out.boxes_xyxy, out.points, out.scores, out.labels = boxes, points, scores, labels
        out.dropped_total = len(dropped)
        out.dropped_prompts = dropped[:MAX_LISTED_DROPS]
        if len(dropped) > MAX_LISTED_DROPS:
            out.dropped_prompts.append(("...", f"and {len(dropped) - MAX_LISTED_DROPS} more prompts dropped"))
    if require_prompts and not out.has_prompts:
        detail = "; ".join(f"{w}: {r}" for w, r in out.dropped_prompts[:5])
        reason = "no valid box or point prompts in the sidecar" if out.sidecar is not None else "no sidecar"
        return fail("no_prompts", f"{reason}{' (dropped ' + detail + ')' if detail else ''}")
    return out
