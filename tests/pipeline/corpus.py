"""Generators of WebDataset test shards, good and bad, with the status each sample must end up with.

``bad_input_cases()`` returns one ``CorpusCase`` per kind of input the job must survive; ``tar_bytes`` packs cases
into a tar with ``tarfile`` (realistic member names: ``<key>.jpg``, ``<key>.json``, keys with directories);
``write_corpus`` writes a directory of shards (good, bad, truncated two ways, empty) plus shard indexes and returns
what every shard and sample is expected to produce, so unit tests and the job's end-to-end test compare the same
expectations.

Expected statuses: ``status`` is what ``decode_sample(sample)`` returns with default arguments;
``status_prompts_required`` what it returns with ``require_prompts=True`` (the job's sidecar prompt mode).
``reason`` is a lowercase substring the error message must contain (``|`` separates accepted alternatives).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CorpusCase:
    """One sample: its members and what decoding it must give."""

    key: str
    members: dict[str, bytes]
    status: str
    reason: str | None = None
    status_prompts_required: str | None = None
    kind: str = ""

    def reason_matches(self, error: str | None) -> bool:
        """True when ``reason`` is unset or one of its ``|``-separated alternatives occurs in ``error``."""
        if self.reason is None:
            return True
        return any(alt in (error or "").lower() for alt in self.reason.split("|"))

    @property
    def required_status(self) -> str:
        return self.status_prompts_required or self.status


@dataclass
class ShardExpectation:
    """What reading one generated shard must report."""

    path: str
    samples: dict[str, CorpusCase] = field(default_factory=dict)
    samples_read: int = 0
    truncated: bool = False
    expected: int | None = None
    error: str | None = None

    def error_matches(self, error: str | None) -> bool:
        """True when ``self.error`` is unset or one of its ``|``-separated alternatives occurs in ``error``."""
        if self.error is None:
            return True
        return any(alt in (error or "").lower() for alt in self.error.lower().split("|"))


# ----------------------------------------------------------------------------------------------------------------
# Image bytes


def gradient_rgb(width: int = 64, height: int = 48) -> np.ndarray:
    """A deterministic ``HxWx3`` uint8 test image."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def good_jpeg(width: int = 64, height: int = 48) -> bytes:
    return encode(Image.fromarray(gradient_rgb(width, height)), "JPEG", quality=95)


def good_png(width: int = 64, height: int = 48) -> bytes:
    return encode(Image.fromarray(gradient_rgb(width, height)), "PNG")


def good_webp() -> bytes:
    return encode(Image.fromarray(gradient_rgb()), "WEBP", lossless=True)


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(gradient_rgb()).convert("CMYK"), "JPEG", quality=95)


def gray_png() -> bytes:
    return encode(Image.fromarray(gradient_rgb()[..., 0]), "PNG")


def bilevel_png() -> bytes:
    return encode(Image.fromarray(gradient_rgb()[..., 0] > 127), "PNG")


def png16(values: np.ndarray | None = None) -> bytes:
    """A 16-bit grayscale PNG; default values span 0..65535 along x."""
    if values is None:
        values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def rgba_png() -> bytes:
    """Left half opaque red, right half fully transparent black (composites to white)."""
    arr = np.zeros((32, 64, 4), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0, 255)
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def la_png() -> bytes:
    arr = np.zeros((32, 64, 2), dtype=np.uint8)
    arr[:, :32] = (100, 255)
    return encode(Image.fromarray(arr, "LA"), "PNG")


def palette_transparent_png() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 8, 16))
    return encode(img, "PNG", transparency=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """40 wide x 20 high: left half red, right half blue, tagged with EXIF ``orientation``.
    Orientation 6 displays rotated 90° clockwise: 20 wide x 40 high, red on top."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def corrupt_jpeg() -> bytes:
    """JPEG start-of-image marker followed by garbage: no decodable structure."""
    rng = np.random.default_rng(0)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel stream (IDAT) is overwritten with garbage, CRCs recomputed."""
    raw = good_png()
    pos = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[pos - 4:pos])[0]
    junk = np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8).tobytes()
    return raw[: pos - 4] + _png_chunk(b"IDAT", junk) + raw[pos + 4 + length + 4:]


def sidecar(**fields) -> bytes:
    return json.dumps(fields).encode("utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Cases


def good_cases() -> list[CorpusCase]:
    """Decodable samples, each with a valid sidecar box."""
    box = sidecar(boxes=[[4, 4, 30, 30]], scores=[0.9], labels=["thing"])
    return [
        CorpusCase("good/000000", {"jpg": good_jpeg(), "json": box}, "ok", kind="jpeg"),
        CorpusCase("good/000001", {"png": good_png(), "json": box}, "ok", kind="png"),
        CorpusCase("good/000002", {"webp": good_webp(), "json": box}, "ok", kind="webp"),
        CorpusCase("good/000003", {"jpeg": good_jpeg(), "json": box, "txt": b"a caption"}, "ok", kind="jpeg ext"),
    ]


def bad_input_cases() -> list[CorpusCase]:
    """Every kind of bad or unusual input named in the job's acceptance list."""
    box = sidecar(boxes=[[2, 2, 12, 12]])
    no_sidecar = "no_prompts"
    return [
        CorpusCase("s000000", {"jpg": corrupt_jpeg(), "json": box}, "decode_error",
                   "not a recognised image|cannot read image header|truncated or corrupt", kind="corrupt jpeg"),
        CorpusCase("s000001", {"jpg": truncated(good_jpeg(256, 192)), "json": box}, "decode_error",
                   "truncated or corrupt", kind="truncated jpeg"),
        CorpusCase("s000002", {"png": corrupt_png(), "json": box}, "decode_error", "truncated or corrupt",
                   kind="corrupt png"),
        CorpusCase("s000003", {"png": truncated(good_png(256, 192)), "json": box}, "decode_error",
                   "truncated or corrupt", kind="truncated png"),
        CorpusCase("s000004", {"jpg": b"", "json": box}, "decode_error", "empty (0 bytes)", kind="zero-byte image"),
        CorpusCase("s000005", {"jpg": b"<html>not an image</html>\n" * 4, "json": box}, "decode_error",
                   "not a recognised image", kind="non-image bytes"),
        CorpusCase("s000006", {"png": png_header_only(100000, 100000)}, "decode_error", "pixel",
                   kind="huge declared dimensions (PIL bomb limit)"),
        CorpusCase("s000007", {"png": png_header_only(9000, 9000)}, "decode_error", "max_pixels",
                   kind="huge declared dimensions (our limit)"),
        CorpusCase("s000008", {"jpg": cmyk_jpeg(), "json": box}, "ok", kind="cmyk jpeg"),
        CorpusCase("s000009", {"png": png16(), "json": box}, "ok", kind="16-bit png"),
        CorpusCase("s000010", {"png": gray_png(), "json": box}, "ok", kind="grayscale png"),
        CorpusCase("s000011", {"png": rgba_png(), "json": box}, "ok", kind="rgba png"),
        CorpusCase("s000012", {"jpg": exif_rotated_jpeg(6), "json": box}, "ok", kind="exif orientation 6"),
        CorpusCase("s000013", {"json": box}, "decode_error", "no image member", kind="sidecar only"),
        CorpusCase("s000014", {"jpg": good_jpeg(), "json": b'{"boxes": [[1, 2, 3, 4]'}, "bad_prompt",
                   "malformed sidecar json", kind="malformed sidecar"),
        CorpusCase("s000015", {"jpg": good_jpeg(), "json": sidecar(boxes=[[-10, -10, 20, 20], [50, 40, 500, 500],
                                                                            [1, 1, 30, 30]])},
                   "ok", kind="boxes partly outside (clipped)"),
        CorpusCase("s000016", {"jpg": good_jpeg(), "json": sidecar(boxes=[[100, 100, 200, 200], [5, 5, 5, 20],
                                                                            [float("nan"), 0, 10, 10]])},
                   "ok", status_prompts_required="no_prompts", reason=None,
                   kind="boxes outside / zero area / NaN only"),
        CorpusCase("s000017", {"jpg": good_jpeg(), "json": sidecar(boxes=[[1, 2, "x", 4]])}, "bad_prompt",
                   "must be numeric", kind="non-numeric box"),
        CorpusCase("s000018", {"jpg": good_jpeg(), "json": sidecar(boxes="1,2,3,4")}, "bad_prompt",
                   "must be a list", kind="boxes not a list"),
        CorpusCase("s000019", {"png": la_png(), "json": box}, "ok", kind="LA png"),
        CorpusCase("s000020", {"png": palette_transparent_png(), "json": box}, "ok", kind="P png with transparency"),
        CorpusCase("s000021", {"png": bilevel_png(), "json": box}, "ok", kind="1-bit png"),
        CorpusCase("s000022", {"jpg": good_jpeg()}, "ok", status_prompts_required=no_sidecar, kind="no sidecar"),
        CorpusCase("../../escape/s000023", {"jpg": good_jpeg(), "json": box}, "ok", kind="traversal member name"),
        CorpusCase("s000024", {"jpg": good_jpeg(), "json": b"[1, 2]"}, "bad_prompt", "must be an object",
                   kind="sidecar not an object"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Tars


def tar_bytes(cases: list[CorpusCase], *, fmt: int = tarfile.GNU_FORMAT, extra: list[tuple[str, bytes]] = ()) -> bytes:
    """Pack ``cases`` (members in key order, extensions sorted) plus ``extra`` raw ``(name, data)`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        entries = [(f"{c.key}.{ext}", data) for c in cases for ext, data in sorted(c.members.items())]
        for name, data in [*entries, *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_spans(data: bytes) -> list[tuple[str, int, int]]:
    """``(name, data_offset, size)`` of each member of a complete tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def cut_mid_member(data: bytes) -> bytes:
    """Cut inside the last member's data."""
    _, offset, size = member_spans(data)[-1]
    return data[: offset + max(size // 2, 1)]


def cut_at_boundary(data: bytes) -> bytes:
    """Cut right after the last member's padded data: every member intact, end-of-archive blocks gone."""
    _, offset, size = member_spans(data)[-1]
    return data[: offset + (size + 511) // 512 * 512]


def write_index(directory: Path, shard_stem: str, num_samples: int) -> None:
    (directory / f"{shard_stem}.idx.json").write_text(json.dumps({"num_samples": num_samples}))


def write_corpus(directory: str | Path) -> dict[str, ShardExpectation]:
    """Write the test corpus into ``directory`` and return expectations keyed by shard file stem.

    Shards: ``good-000000`` (good cases; GNU long names and a directory entry), ``good-000001`` (pax format,
    non-ASCII key), ``bad-000000`` (all bad-input cases), ``trunc-mid-000000`` (cut inside a member),
    ``trunc-edge-000000`` (cut at a member boundary), ``empty-000000`` (a valid tar with no members),
    ``short-000000`` (complete tar whose index claims one more sample than it holds), ``bad-000001`` (image
    formats and encodings), ``bad-000002`` (hostile sidecars), and the shards of
    ``hostile_corpus.write_hostile_shards`` (compressed, concatenated, damaged, not tars, links, odd names). Every
    file is named ``*.tar`` whatever its content, as a mislabelled shard would be.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, ShardExpectation] = {}

    def put(stem: str, data: bytes, cases: list[CorpusCase], *, read: int | None = None,
            truncated_: bool = False, expected: int | None = None, error: str | None = None) -> None:
        path = directory / f"{stem}.tar"
        path.write_bytes(data)
        if expected is not None:
            write_index(directory, stem, expected)
        out[stem] = ShardExpectation(str(path), {c.key: c for c in cases},
                                     len(cases) if read is None else read, truncated_, expected, error)

    good = good_cases()
    long_key = "good/" + "a-very-long-directory-name-" * 5 + "/000009"
    long_case = CorpusCase(long_key, {"jpg": good_jpeg(), "json": sidecar(boxes=[[1, 1, 9, 9]])}, "ok",
                           kind="GNU long name")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dir_info = tarfile.TarInfo("good")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
    dir_tar = buf.getvalue()
    data = dir_tar[:512] + tar_bytes([*good, long_case])
    put("good-000000", data, [*good, long_case], expected=len(good) + 1)

    pax_case = CorpusCase("pax/échantillon-000000", {"jpg": good_jpeg(), "json": sidecar(boxes=[[1, 1, 9, 9]])},
                          "ok", kind="pax header")
    put("good-000001", tar_bytes([pax_case, *good[:1]], fmt=tarfile.PAX_FORMAT), [pax_case, *good[:1]])

    bad = bad_input_cases()
    put("bad-000000", tar_bytes(bad), bad, expected=len(bad))

    three = good[:3]
    full = tar_bytes(three)
    # Cut inside the last member: that sample is yielded with an error, so it is still reported.
    mid = [*three[:2], CorpusCase(three[2].key, three[2].members, "decode_error", "cut by shard truncation")]
    put("trunc-mid-000000", cut_mid_member(full), mid, read=3, truncated_=True, expected=3)
    put("trunc-edge-000000", cut_at_boundary(full), three, read=3, truncated_=True)
    put("empty-000000", tar_bytes([]), [], read=0)
    put("short-000000", tar_bytes(good[:2]), good[:2], truncated_=True, expected=3)

    from .hostile_corpus import image_format_cases, sidecar_cases, write_hostile_shards

    images = image_format_cases()
    put("bad-000001", tar_bytes(images), images, expected=len(images))
    sidecars = sidecar_cases()
    put("bad-000002", tar_bytes(sidecars), sidecars)
    write_hostile_shards(put)
    return out
