"""Inputs nobody sends on purpose: image formats and encodings beyond JPEG/PNG/WebP, hostile sidecars, and tar
shards that are compressed, concatenated, damaged, not tars at all, or full of links and odd names.

Each generator returns ``CorpusCase``s (one sample each, with the status and reason ``decode_sample`` must give)
or writes shards through ``corpus.write_corpus``'s ``put`` so the unit tests and the job's end-to-end test share
one set of expectations. Everything is generated from fixed seeds.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from .corpus import (
    CorpusCase,
    _png_chunk,
    encode,
    good_cases,
    good_jpeg,
    good_png,
    gradient_rgb,
    member_spans,
    sidecar,
    tar_bytes,
    truncated,
)

BOX = sidecar(boxes=[[2, 2, 12, 12]])
NO_SIDECAR = "no_prompts"

# ----------------------------------------------------------------------------------------------------------------
# Image bytes


def _rgb(width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(gradient_rgb(width, height))


def gif(animated: bool = False) -> bytes:
    first = _rgb().convert("P")
    if not animated:
        return encode(first, "GIF")
    return encode(first, "GIF", save_all=True, append_images=[Image.new("P", (64, 48), 3)], duration=100, loop=0)


def tiff(kind: str = "rgb") -> bytes:
    """``rgb``, ``multipage``, ``16bit`` (I;16), ``float`` (F, with NaN and ±inf), ``int`` (I, negative values)."""
    if kind == "rgb":
        return encode(_rgb(), "TIFF")
    if kind == "multipage":
        return encode(_rgb(), "TIFF", save_all=True, append_images=[Image.new("RGB", (300, 300))])
    if kind == "16bit":
        return encode(Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))), "TIFF")
    if kind == "float":
        values = np.linspace(-1.0, 1.0, 48 * 64, dtype=np.float32).reshape(48, 64)
        values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
        return encode(Image.fromarray(values, "F"), "TIFF")
    if kind == "int":
        return encode(Image.fromarray(np.arange(48 * 64, dtype=np.int32).reshape(48, 64) - 1000, "I"), "TIFF")
    raise ValueError(kind)


def tiff_header_only(width: int, height: int) -> bytes:
    """A grayscale TIFF whose IFD declares ``width`` x ``height`` with 64 bytes of pixel data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, 64)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, typ, value in entries:
        value = data_offset if tag == 273 else value
        out += struct.pack("<HHIHH", tag, typ, 1, value, 0) if typ == 3 else struct.pack("<HHII", tag, typ, 1, value)
    return out + struct.pack("<I", 0) + b"\0" * 64


def with_dimensions(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """``data`` (a small JPEG, GIF or BMP) with the dimensions in its header replaced: a decompression bomb's
    header, the pixel data being far too short for it."""
    out = bytearray(data)
    if fmt == "jpeg":
        at = out.index(b"\xff\xc0") + 5
        struct.pack_into(">HH", out, at, height, width)
    elif fmt == "gif":
        struct.pack_into("<HH", out, 6, width, height)
    elif fmt == "bmp":
        struct.pack_into("<ii", out, 18, width, height)
    else:
        raise ValueError(fmt)
    return bytes(out)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, pixels: np.ndarray) -> bytes:
    """A PNG written chunk by chunk (filter 0 rows), for layouts Pillow does not write (16-bit RGB/RGBA)."""
    rows = b"".join(b"\0" + pixels[r].astype(">u2" if bit_depth == 16 else np.uint8).tobytes() for r in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def png_with_chunk(kind: bytes, payload: bytes, *, after_idat: bool = False, bad_crc: bool = False) -> bytes:
    """``good_png()`` with one extra chunk, before IDAT (right after IHDR) or just before IEND."""
    base = good_png()
    chunk = _png_chunk(kind, payload)
    if bad_crc:
        chunk = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
    at = len(base) - 12 if after_idat else 33
    return base[:at] + chunk + base[at:]


def png_bad_ihdr_crc() -> bytes:
    data = bytearray(good_png())
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    return bytes(data)


def jpeg_with_app1(payload: bytes) -> bytes:
    """``good_jpeg()`` with an APP1 segment holding ``payload`` right after the start-of-image marker."""
    base = good_jpeg()
    return base[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def exif_orientation_ascii(text: bytes = b"x") -> bytes:
    """A JPEG whose EXIF orientation tag is an ASCII string instead of a SHORT."""
    value = (text + b"\0" * 4)[:4]
    ifd = struct.pack("<H", 1) + struct.pack("<HHI4s", 0x0112, 2, 2, value) + struct.pack("<I", 0)
    return jpeg_with_app1(b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd)


def exif_broken() -> bytes:
    """A JPEG whose EXIF block claims 65535 IFD entries and then ends."""
    return jpeg_with_app1(b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + b"\xff\xff" + b"junk" * 10)


def oriented_jpeg(orientation: int) -> bytes:
    """The 40x20 red|blue test image tagged with EXIF ``orientation`` (see ``corpus.exif_rotated_jpeg``)."""
    from .corpus import exif_rotated_jpeg

    return exif_rotated_jpeg(orientation)


def heic_bytes() -> bytes:
    return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(range(256)) * 2


def psd_bytes() -> bytes:
    return b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 48, 64, 8, 3) + b"\x00" * 200


# ----------------------------------------------------------------------------------------------------------------
# Sample cases


def image_format_cases() -> list[CorpusCase]:
    """Formats, encodings, modes, dimensions and member namings beyond the basic bad-input list."""
    tiny_box = sidecar(boxes=[[0, 0, 1, 1]])
    cases = [
        CorpusCase("img/gif", {"gif": gif(), "json": BOX}, "ok", kind="gif member"),
        CorpusCase("img/gif-animated", {"gif": gif(animated=True), "json": BOX}, "ok", kind="animated gif"),
        CorpusCase("img/gif-in-jpg", {"jpg": gif(), "json": BOX}, "ok", kind="gif bytes in a .jpg member"),
        CorpusCase("img/bmp", {"bmp": encode(_rgb(), "BMP"), "json": BOX}, "ok", kind="bmp"),
        CorpusCase("img/tiff", {"tif": tiff("rgb"), "json": BOX}, "ok", kind="tiff"),
        CorpusCase("img/tiff-pages", {"tiff": tiff("multipage"), "json": BOX}, "ok", kind="multi-page tiff"),
        CorpusCase("img/tiff-16", {"tiff": tiff("16bit"), "json": BOX}, "ok", kind="16-bit tiff"),
        CorpusCase("img/tiff-float", {"tiff": tiff("float"), "json": BOX}, "ok", kind="float32 tiff with NaN/inf"),
        CorpusCase("img/tiff-int", {"tiff": tiff("int"), "json": BOX}, "ok", kind="32-bit int tiff"),
        CorpusCase("img/tiff-cmyk", {"tiff": encode(_rgb().convert("CMYK"), "TIFF"), "json": BOX}, "ok",
                   kind="cmyk tiff"),
        CorpusCase("img/png-rgb16", {"png": png_raw(8, 8, 16, 2, np.random.default_rng(2).integers(
            0, 65535, (8, 8, 3))), "json": BOX}, "ok", kind="48-bit rgb png"),
        CorpusCase("img/png-rgba16", {"png": png_raw(8, 8, 16, 6, np.random.default_rng(3).integers(
            0, 65535, (8, 8, 4))), "json": BOX}, "ok", kind="64-bit rgba png"),
        CorpusCase("img/gif-transparent", {"gif": encode(_rgb().convert("P"), "GIF", transparency=0), "json": BOX},
                   "ok", kind="gif with transparency"),
        CorpusCase("img/webp-animated", {"webp": encode(_rgb(), "WEBP", save_all=True, lossless=True,
                                                          append_images=[Image.new("RGB", (64, 48))]), "json": BOX},
                   "ok", kind="animated webp"),
        CorpusCase("img/apng", {"png": encode(_rgb(), "PNG", save_all=True, append_images=[Image.new("RGB", (64, 48))]),
                                "json": BOX}, "ok", kind="animated png"),
        CorpusCase("img/mpo", {"jpg": encode(_rgb(), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))]),
                               "json": BOX}, "ok", kind="mpo (camera jpeg with a second frame)"),
        CorpusCase("img/progressive", {"jpg": encode(_rgb(), "JPEG", progressive=True, quality=90), "json": BOX},
                   "ok", kind="progressive jpeg"),
        CorpusCase("img/progressive-cut", {"jpg": truncated(encode(_rgb(256, 192), "JPEG", progressive=True), 0.4),
                                           "json": BOX}, "decode_error", "truncated", kind="truncated progressive"),
        CorpusCase("img/jpeg-in-png", {"png": good_jpeg(), "json": BOX}, "ok", kind="jpeg bytes in a .png member"),
        CorpusCase("img/upper-jpg", {"JPG": good_jpeg(), "json": BOX}, "ok", kind="upper-case .JPG"),
        CorpusCase("img/mixed-png", {"Png": good_png(), "json": BOX}, "ok", kind="mixed-case .Png"),
        CorpusCase("img/two-images", {"jpg": good_jpeg(), "png": good_png(), "json": BOX}, "ok",
                   kind="jpg and png in one sample"),
        CorpusCase("img/garbage-after-eoi", {"jpg": good_jpeg() + b"\x00garbage" * 64, "json": BOX}, "ok",
                   kind="jpeg with data after EOI"),
        CorpusCase("img/exif-broken", {"jpg": exif_broken(), "json": BOX}, "ok", kind="jpeg with a broken EXIF block"),
        CorpusCase("img/exif-0", {"jpg": oriented_jpeg(0), "json": BOX}, "ok", kind="EXIF orientation 0"),
        CorpusCase("img/exif-9", {"jpg": oriented_jpeg(9), "json": BOX}, "ok", kind="EXIF orientation 9"),
        CorpusCase("img/exif-text", {"jpg": exif_orientation_ascii(), "json": BOX}, "ok",
                   kind="EXIF orientation as text"),
        *[CorpusCase(f"img/exif-{o}", {"jpg": oriented_jpeg(o), "json": BOX}, "ok", kind=f"EXIF orientation {o}")
          for o in (2, 3, 4, 5, 7, 8)],
        CorpusCase("img/1x1", {"png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "json": tiny_box},
                   "ok", kind="1x1 image"),
        CorpusCase("img/3x2", {"png": encode(Image.new("RGB", (3, 2), (10, 200, 10)), "PNG"),
                               "json": sidecar(boxes=[[0, 0, 3, 2]])}, "ok", kind="smaller than a model patch"),
        CorpusCase("img/2x500", {"png": encode(_rgb(2, 500), "PNG"), "json": sidecar(boxes=[[0, 10, 2, 90]])}, "ok",
                   kind="thin tall image"),
        CorpusCase("img/500x2", {"png": encode(_rgb(500, 2), "PNG"), "json": sidecar(boxes=[[10, 0, 90, 2]])}, "ok",
                   kind="thin wide image"),
        CorpusCase("img/ico", {"jpg": encode(_rgb(), "ICO"), "json": BOX}, "decode_error", "ico icon",
                   kind="ico bytes in a .jpg member"),
        CorpusCase("img/ico-member", {"ico": encode(_rgb(), "ICO"), "json": BOX}, "decode_error",
                   "format that is not decoded", kind=".ico member"),
        CorpusCase("img/psd", {"png": psd_bytes(), "json": BOX}, "decode_error", "photoshop", kind="psd bytes"),
        CorpusCase("img/heic", {"jpg": heic_bytes(), "json": BOX}, "decode_error", "heic image",
                   kind="heic bytes in a .jpg member"),
        CorpusCase("img/heic-member", {"heic": heic_bytes(), "json": BOX}, "decode_error",
                   "format that is not decoded", kind=".heic member"),
        CorpusCase("img/avif", {"jpg": encode(_rgb(), "AVIF") if _can_save("AVIF") else heic_bytes().replace(
            b"heic", b"avif"), "json": BOX}, "decode_error", "avif image|heic image", kind="avif bytes"),
        CorpusCase("img/svg", {"png": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
                               "json": BOX}, "decode_error", "svg", kind="svg text"),
        CorpusCase("img/png-iccp-bomb", {"png": png_with_chunk(b"iCCP", b"icc\0\0" + zlib.compress(
            b"\0" * (8 << 20))), "json": BOX}, "decode_error", "too large", kind="png iCCP decompression bomb"),
        CorpusCase("img/png-ztxt-bomb", {"png": png_with_chunk(b"zTXt", b"k\0\0" + zlib.compress(
            b"\0" * (8 << 20)), after_idat=True), "json": BOX}, "decode_error", "too large",
                   kind="png zTXt decompression bomb after IDAT"),
        CorpusCase("img/png-bad-ihdr-crc", {"png": png_bad_ihdr_crc(), "json": BOX}, "decode_error",
                   "bad header checksum", kind="png with a bad IHDR CRC"),
        CorpusCase("img/png-bad-text-crc", {"png": png_with_chunk(b"tEXt", b"k\0v", bad_crc=True), "json": BOX},
                   "decode_error", "bad header checksum", kind="png with a bad tEXt CRC"),
        CorpusCase("img/gif-cut", {"gif": truncated(encode(_rgb(256, 192).convert("P"), "GIF"), 0.3), "json": BOX},
                   "decode_error", "truncated", kind="truncated gif"),
        CorpusCase("img/webp-cut", {"webp": truncated(encode(_rgb(256, 192), "WEBP"), 0.5), "json": BOX},
                   "decode_error", "truncated", kind="truncated webp"),
        CorpusCase("img/tiff-cut", {"tiff": truncated(encode(_rgb(256, 192), "TIFF"), 0.3), "json": BOX},
                   "decode_error", "truncated", kind="truncated tiff"),
        CorpusCase("img/bmp-cut", {"bmp": truncated(encode(_rgb(256, 192), "BMP"), 0.3), "json": BOX},
                   "decode_error", "truncated", kind="truncated bmp"),
        CorpusCase("img/jpeg-bomb", {"jpg": with_dimensions(good_jpeg(), "jpeg", 9000, 9000)}, "decode_error",
                   "max_pixels", kind="jpeg header declaring 9000x9000"),
        CorpusCase("img/gif-bomb", {"gif": with_dimensions(gif(), "gif", 9000, 9000)}, "decode_error", "max_pixels",
                   kind="gif header declaring 9000x9000"),
        CorpusCase("img/bmp-bomb", {"bmp": with_dimensions(encode(_rgb(), "BMP"), "bmp", 9000, 9000)},
                   "decode_error", "max_pixels", kind="bmp header declaring 9000x9000"),
        CorpusCase("img/tiff-bomb", {"tiff": tiff_header_only(9000, 9000)}, "decode_error", "max_pixels",
                   kind="tiff header declaring 9000x9000"),
        CorpusCase("img/jpeg-zero-height", {"jpg": with_dimensions(good_jpeg(), "jpeg", 64, 0), "json": BOX},
                   "decode_error", "truncated or corrupt", kind="jpeg header with height 0"),
        CorpusCase("img/text-only", {"txt": b"a caption", "cls": b"3"}, "decode_error", "no image member",
                   kind="sample with only .txt and .cls"),
        CorpusCase("img/pickle", {"jpg": b"\x80\x04\x95" + bytes(range(256)), "json": BOX}, "decode_error",
                   "not a recognised image", kind="pickle bytes in a .jpg member"),
    ]
    return cases


def _can_save(fmt: str) -> bool:
    Image.init()
    return fmt in Image.SAVE


def sidecar_cases() -> list[CorpusCase]:
    """Sidecars that are badly encoded, huge, deeply nested, or hold prompts of the wrong shape or value."""
    jpg = good_jpeg()
    big_caption = json.dumps({"boxes": [[4, 4, 30, 30]], "caption": "x" * (10 << 20)}).encode()

    def case(key: str, data: bytes, status: str, reason: str | None = None, required: str | None = None,
             kind: str = "") -> CorpusCase:
        return CorpusCase(f"side/{key}", {"jpg": jpg, "json": data}, status, reason, required, kind or key)

    return [
        case("latin1", '{"boxes": [[1, 1, 9, 9]], "labels": ["café"]}'.encode("latin-1"), "bad_prompt",
             "not utf-8", kind="sidecar in latin-1"),
        case("bom", b"\xef\xbb\xbf" + sidecar(boxes=[[1, 1, 9, 9]]), "ok", kind="UTF-8 with BOM"),
        case("utf16", json.dumps({"boxes": [[1, 1, 9, 9]]}).encode("utf-16"), "ok", kind="UTF-16 with BOM"),
        case("huge", big_caption, "ok", kind="10 MB sidecar"),
        case("deep", b'{"boxes": ' + b"[" * 50000 + b"]" * 50000 + b"}", "bad_prompt", "nested too deeply",
             kind="deeply nested JSON"),
        case("empty-file", b"", "bad_prompt", "malformed sidecar json", kind="zero-byte sidecar"),
        case("null", b"null", "bad_prompt", "must be an object", kind="sidecar is null"),
        case("trailing", sidecar(boxes=[[1, 1, 9, 9]]) + b" x", "bad_prompt", "malformed sidecar json",
             kind="JSON with trailing garbage"),
        case("box-dict", sidecar(boxes={"x0": 1, "y0": 1, "x1": 9, "y1": 9}), "bad_prompt", "must be a list",
             kind="boxes as a dict"),
        case("box-string", sidecar(boxes=""), "bad_prompt", "must be a list", kind="boxes as an empty string"),
        case("box-zero", sidecar(boxes=0), "bad_prompt", "must be a list", kind="boxes as 0"),
        case("box-3", sidecar(boxes=[[1, 2, 3]]), "bad_prompt", "list of 4 numbers", kind="box of 3 numbers"),
        case("box-5", sidecar(boxes=[[1, 2, 3, 4, 5]]), "bad_prompt", "list of 4 numbers", kind="box of 5 numbers"),
        case("box-flat", sidecar(boxes=[1, 2, 30, 40]), "bad_prompt", "list of 4 numbers",
             kind="one box not wrapped in a list"),
        case("box-bool", sidecar(boxes=[[True, 1, 9, 9]]), "bad_prompt", "must be numeric", kind="boolean coordinate"),
        case("box-numeric-string", sidecar(boxes=[["1e999", 1, 9, 9]]), "bad_prompt", "must be numeric",
             kind="coordinate as a numeric string"),
        case("box-flipped", sidecar(boxes=[[30, 30, 4, 4]]), "ok", required="no_prompts",
             kind="x1 < x0 and y1 < y0 only"),
        case("box-inf", b'{"boxes": [[0, 0, Infinity, 10], [-Infinity, 0, 5, 5], [NaN, 1, 2, 3]]}', "ok",
             required="no_prompts", kind="inf / -inf / NaN literals only"),
        case("box-1e308", sidecar(boxes=[[0, 0, 1e308, 1e308]]), "ok", kind="1e308 corner (clipped)"),
        case("box-bigint", b'{"boxes": [[0, 0, 1' + b"0" * 400 + b', 10]]}', "ok", required="no_prompts",
             kind="400-digit integer coordinate"),
        case("box-hugeint", b'{"boxes": [[0, 0, 1' + b"0" * 5000 + b', 10]]}', "bad_prompt", "malformed sidecar json",
             kind="integer beyond the parser's digit limit"),
        case("box-null", b'{"boxes": null}', "ok", required="no_prompts", kind="boxes null"),
        case("box-null-coord", sidecar(boxes=[[None, 1, 9, 9], [1, 1, 9, 9]]), "ok", kind="null coordinate"),
        case("empty", sidecar(boxes=[], points=[]), "ok", required="no_prompts", kind="empty boxes and points"),
        case("points-outside", sidecar(points=[[-1, 5], [500, 5], [5, 48.5]]), "ok", required="no_prompts",
             kind="points outside the image only"),
        case("points-nan", b'{"points": [[NaN, 5], [5, 5]]}', "ok", kind="a NaN point and a good one"),
        case("points-3", sidecar(points=[[1, 2, 1]]), "bad_prompt", "list of 2 numbers", kind="point of 3 numbers"),
        case("labels-short", sidecar(boxes=[[1, 1, 9, 9], [2, 2, 8, 8]], labels=["a"]), "bad_prompt",
             "'labels' has 1 entries", kind="labels shorter than boxes"),
        case("scores-long", sidecar(boxes=[[1, 1, 9, 9]], scores=[0.1, 0.2]), "bad_prompt", "'scores' has 2 entries",
             kind="scores longer than boxes"),
        case("labels-dict", sidecar(boxes=[[1, 1, 9, 9]], labels=[{"name": "cat"}]), "bad_prompt",
             "must be a string", kind="label as an object"),
        case("labels-surrogate", b'{"boxes": [[1, 1, 9, 9]], "labels": ["\\ud800cat"], "scores": [NaN]}', "ok",
             kind="label with a lone surrogate escape"),
        case("scores-bool", sidecar(boxes=[[1, 1, 9, 9]], scores=[True]), "bad_prompt", "must be a number",
             kind="boolean score"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Shards


Put = Callable[..., None]


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _cut_gzip_inside_member(data: bytes) -> tuple[bytes, int]:
    """A prefix of ``_gzip(data)`` whose decompressible part ends inside a member's data, and that member's index."""
    packed = _gzip(data)
    spans = member_spans(data)
    for cut in range(len(packed) // 2, len(packed)):
        available = len(zlib.decompressobj(wbits=31).decompress(packed[:cut]))
        for i, (_, start, size) in enumerate(spans):
            if start < available < start + size:
                return packed[:cut], i
    raise AssertionError("no cut lands inside a member")


def _tar_with(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size, info.mtime = len(entry[1]), 1_700_000_000
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    return info


def _members_of(case: CorpusCase) -> list[tuple[str, bytes]]:
    return [(f"{case.key}.{ext}", data) for ext, data in sorted(case.members.items())]


def write_hostile_shards(put: Put) -> None:
    """Write the hostile shards through ``put(stem, data, cases, *, read=, truncated_=, expected=, error=)``."""
    good = good_cases()
    plain = tar_bytes(good)

    put("gz-000000", _gzip(plain), good, expected=len(good))
    put("bz2-000000", bz2.compress(plain), good)
    put("xz-000000", lzma.compress(plain), good)
    half = len(plain) // 2
    put("gzmulti-000000", _gzip(plain[:half]) + _gzip(plain[half:]), good)
    cut, at = _cut_gzip_inside_member(plain)
    owner = member_spans(plain)[at][0].rsplit(".", 1)[0]
    keys = [c.key for c in good]
    kept = good[: keys.index(owner)]
    cut_case = next(c for c in good if c.key == owner)
    put("gzcut-000000", cut, [*kept, CorpusCase(owner, cut_case.members, "decode_error", "cut by shard truncation")],
        truncated_=True, error="gzip stream ends")

    rng = np.random.default_rng(7)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("a.jpg", good_jpeg())
    put("notar-zip-000000", zipped.getvalue(), [], error="not a tar archive")
    put("notar-html-000000", b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>\n", [],
        error="not a tar archive")
    put("notar-random-000000", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), [], error="not a tar archive")
    put("notar-zstd-000000", b"\x28\xb5\x2f\xfd" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), [],
        error="zstd")
    put("notar-gzjson-000000", _gzip(b'{"not": "a tar"}'), [], error="gzip-decompressed content is 16 bytes")
    put("zero-000000", b"", [], truncated_=True, error="0 bytes")
    put("dirs-000000", _tar_with([_special("a", tarfile.DIRTYPE), _special("a/b.d", tarfile.DIRTYPE)]), [])

    ok = good[0]
    links = [
        *_members_of(ok),
        _special("links/sym.jpg", tarfile.SYMTYPE, "../../etc/passwd"),
        _special("links/hard.jpg", tarfile.LNKTYPE, f"{ok.key}.jpg"),
        _special("links/dev.jpg", tarfile.CHRTYPE),
        _special("links/fifo.jpg", tarfile.FIFOTYPE),
        ("links/mixed.jpg", good_jpeg()), _special("links/mixed.json", tarfile.SYMTYPE, "/etc/hosts"),
        *_members_of(good[1]),
    ]
    put("links-000000", _tar_with(links), [
        ok,
        CorpusCase("links/sym", {}, "decode_error", "symbolic link"),
        CorpusCase("links/hard", {}, "decode_error", "hard link"),
        CorpusCase("links/dev", {}, "decode_error", "character device"),
        CorpusCase("links/fifo", {}, "decode_error", "fifo"),
        CorpusCase("links/mixed", {"jpg": good_jpeg()}, "ok", status_prompts_required=NO_SIDECAR),
        good[1],
    ])

    jpg = good_jpeg()
    names = [
        ("/abs/root.jpg", jpg), ("../up/parent.jpg", jpg), ("./dot/here.jpg", jpg), ("Case.jpg", jpg),
        ("case.jpg", jpg), ("UPPER.JPG", jpg), ("UPPER.JSON", BOX), ("x" * 300 + ".jpg", jpg),
    ]
    name_cases = [CorpusCase(n.rsplit(".", 1)[0], {"jpg": jpg}, "ok", status_prompts_required=NO_SIDECAR)
                  for n, _ in names if not n.startswith("UPPER")]
    name_cases.insert(5, CorpusCase("UPPER", {"jpg": jpg, "json": BOX}, "ok"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [*names, ("nul\0byte-é.jpg", jpg)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    name_cases.append(CorpusCase("nul\\x00byte-é", {"jpg": jpg}, "ok", status_prompts_required=NO_SIDECAR))
    put("names-000000", buf.getvalue(), name_cases)

    a, b = good[0], good[1]
    dup = _tar_with([(f"{a.key}.jpg", a.members["jpg"]), (f"{a.key}.jpg", b"second copy"),
                     *_members_of(b), (f"{a.key}.json", a.members["json"])])
    put("dupkeys-000000", dup, [CorpusCase(a.key, {"jpg": a.members["jpg"]}, "ok", status_prompts_required=NO_SIDECAR),
                                b])

    five = [*good, CorpusCase("good/000004", good[0].members, "ok")]
    data = bytearray(tar_bytes(five))
    spans = member_spans(bytes(data))
    lost_name, lost_start, _ = spans[2]  # the first member of the second sample: its header is destroyed
    header = lost_start - 512
    data[header:header + 512] = np.random.default_rng(9).integers(1, 256, 512, dtype=np.uint8).tobytes()
    lost_ext = lost_name.split(".", 1)[1]
    survivors = {ext: v for ext, v in five[1].members.items() if ext != lost_ext}
    put("damaged-000000", bytes(data), [
        CorpusCase(five[0].key, five[0].members, "decode_error", "damaged right after"),
        CorpusCase(five[1].key, survivors, "decode_error", "damaged right before"),
        *five[2:],
    ], error="corrupt tar header")

    first, second = tar_bytes(good[:2]), tar_bytes(good[2:])
    put("concat-000000", first + second, good[:2], error="continues after its end-of-archive")

    whole = tar_bytes(good[:2])
    _, last_start, last_size = member_spans(whole)[-1]
    data = bytearray(whole[: last_start + (last_size + 511) // 512 * 512])  # no end-of-archive blocks either
    last_header = last_start - 512
    struct_size = b"%011o\0" % (10 << 20)
    data[last_header + 124:last_header + 136] = struct_size
    data[last_header + 148:last_header + 156] = b" " * 8
    data[last_header + 148:last_header + 155] = b"%06o\0" % sum(data[last_header:last_header + 512])
    put("oversize-000000", bytes(data), [good[0], CorpusCase(good[1].key, good[1].members, "decode_error",
                                                             "cut by shard truncation")], truncated_=True,
        error="truncated inside member")

    put("trailing-000000", tar_bytes(good[:2]) + rng.integers(1, 256, 3000, dtype=np.uint8).tobytes(), good[:2])
