"""What the bytes of a shard are: names for common file kinds (for error messages), and the tar inside a gzip,
bzip2 or xz shard, decompressed as a stream.

No Ray, no torch, no fsspec: plain byte handling used by ``pipeline.inputs.sources`` and ``pipeline.inputs.decode``.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any, Protocol


def skip_by_reading(read: Any, n: int) -> int:
    """Discard ``n`` bytes from ``read(size)`` in pieces of at most 1 MiB (never holding more); returns how many
    were actually skipped (fewer at the end of the data)."""
    skipped = 0
    while skipped < n:
        got = len(read(min(n - skipped, 1 << 20)))
        if got == 0:
            break
        skipped += got
    return skipped

class TruncatedData(Exception):
    """The data ends before its own structure says it should (a cut tar, a cut compressed stream)."""


class RawStream(Protocol):
    """The sequential byte source ``TarBytes`` reads: ``read(n)`` (fewer bytes only at the end), ``skip(n)``
    and ``offset``, the number of bytes consumed so far."""

    offset: int

    def read(self, n: int) -> bytes: ...

    def skip(self, n: int) -> int: ...


# ----------------------------------------------------------------------------------------------------------------
# Recognising bytes


_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip stream"),
    (b"BZh", "a bzip2 stream"),
    (b"\xfd7zXZ\x00", "an xz stream"),
    (b"\x28\xb5\x2f\xfd", "a zstd stream"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"Rar!\x1a\x07", "a rar archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript/EPS document"),
    (b"\xc5\xd0\xd3\xc6", "an EPS document"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"II+\x00", "a BigTIFF image"),
    (b"MM\x00+", "a BigTIFF image"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\x00\x00\x02\x00", "a CUR cursor"),
    (b"8BPS", "a Photoshop PSD document"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (b"\xff\x0a", "a JPEG XL codestream"),
    (b"qoif", "a QOI image"),
    (b"DDS ", "a DDS texture"),
    (b"v/1\x01", "an OpenEXR image"),
    (b"#?RADIANCE", "a Radiance HDR image"),
    (b"icns", "an ICNS icon"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"PAR1", "a Parquet file"),
    (b"\x80\x02", "a Python pickle"),
)
_FTYP_BRANDS = {b"heic": "a HEIC image", b"heix": "a HEIC image", b"hevc": "a HEIC image", b"heim": "a HEIC image",
                b"heis": "a HEIC image", b"mif1": "a HEIF image", b"msf1": "a HEIF image", b"avif": "an AVIF image",
                b"avis": "an AVIF image", b"crx ": "a Canon CR3 raw image", b"qt  ": "a QuickTime video"}


def describe_bytes(data: bytes) -> str | None:
    """What well-known kind of file ``data`` starts like (``"a zip archive"``, ``"HTML text"``), or None.

    Only for messages: a hint for people reading an error, never a decision about how to read the data."""
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return what
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "an ISO media file (MP4/HEIF family)")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    if data[:4] == b"RIFF":
        return "a RIFF file (AVI/WAV)"
    if data[257:262] == b"ustar":
        return "a tar archive"
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML text"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG image"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "XML text"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    sample = data[:512]
    if sample and all(32 <= b < 127 or b in b"\t\r\n" for b in sample):
        return "plain text"
    return None


def describe_hint(data: bytes) -> str:
    """``" (looks like a zip archive)"`` or ``""``: a suffix for messages about unrecognised bytes."""
    what = describe_bytes(data)
    return f" (looks like {what})" if what else ""


# ----------------------------------------------------------------------------------------------------------------
# Compressed shards


_CODECS: tuple[tuple[str, bytes], ...] = (("gzip", b"\x1f\x8b"), ("bzip2", b"BZh"), ("xz", b"\xfd7zXZ\x00"))
_CHUNK = 1 << 16


def _new_decompressor(codec: str) -> Any:
    if codec == "gzip":
        return zlib.decompressobj(wbits=31)
    if codec == "bzip2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)


class TarBytes:
    """The bytes of the tar inside a shard: the shard itself, or the streamed decompression of a gzip, bzip2 or xz
    shard (detected from its first bytes, whatever its name; concatenated streams are read as one, as ``gzip -d``
    does). ``offset`` counts tar bytes, which is what header offsets in messages refer to.

    Output is produced at most ``n`` bytes at a time, so a compression bomb costs time, not memory. Corrupt or
    cut compressed data raises ``ValueError``/``TruncatedData``; a failed read of the shard raises ``OSError``."""

    def __init__(self, raw: RawStream, problems: list[str]):
        self._raw = raw
        self._problems = problems
        self.offset = 0
        head = raw.read(6)
        if head.startswith(b"\x28\xb5\x2f\xfd"):
            raise ValueError("the shard is zstd-compressed, which this reader does not support; decompress it "
                             "(zstd -d) or recompress it with gzip (.tar.gz)")
        self.codec = next((name for name, magic in _CODECS if head.startswith(magic)), None)
        self._pending = head  # compressed input not yet given to the decompressor, or plain bytes not yet returned
        self._dec = _new_decompressor(self.codec) if self.codec else None
        self._out = bytearray()
        self._ended = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the tar data."""
        if n <= 0:
            return b""
        if self._dec is None:
            head, self._pending = self._pending[:n], self._pending[n:]
            data = head + (self._raw.read(n - len(head)) if len(head) < n else b"")
        else:
            while len(self._out) < n and not self._ended:
                self._out += self._step(n - len(self._out))
            data = bytes(self._out[:n])
            del self._out[:n]
        self.offset += len(data)
        return data

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes without holding them in memory; returns how many were actually skipped."""
        return skip_by_reading(self.read, n)

    def _step(self, limit: int) -> bytes:
        """Some decompressed bytes (maybe none), at most ``limit``; sets ``_ended`` at the clean end of the data."""
        dec = self._dec
        if dec.eof:
            rest = dec.unused_data + self._pending
            self._pending = b""
            if not rest:
                rest = self._raw.read(_CHUNK)
            if not rest:
                self._ended = True
                return b""
            magic = dict(_CODECS)[self.codec]
            if not rest.startswith(magic[:len(rest)]):
                tail = len(rest) + self._raw.skip(1 << 62)
                self._problems.append(f"{tail} bytes of non-{self.codec} data after the end of the {self.codec} "
                                      "stream; ignored")
                self._ended = True
                return b""
            self._dec = dec = _new_decompressor(self.codec)
            self._pending = rest
        if self._pending:
            data, self._pending = self._pending, b""
        else:
            if self.codec != "gzip" and not dec.needs_input:
                return self._decompress(b"", limit)
            data = self._raw.read(_CHUNK)
            if not data:
                if self.codec == "gzip":
                    out = self._decompress(b"", limit)
                    if out:
                        return out
                raise TruncatedData(f"{self.codec} stream ends before its end marker, after {self._raw.offset} "
                                    f"compressed bytes ({self.offset} tar bytes): the shard is truncated")
        out = self._decompress(data, limit)
        if self.codec == "gzip" and not dec.eof:
            # At the end of a gzip member zlib reports the rest of the input as unused_data, and (under a
            # max_length) as unconsumed_tail too: taking both would read the next member twice.
            self._pending = dec.unconsumed_tail
        return out

    def _decompress(self, data: bytes, limit: int) -> bytes:
        try:
            return self._dec.decompress(data, limit)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise ValueError(f"corrupt {self.codec} data near compressed byte {self._raw.offset}: "
                             f"{type(exc).__name__}: {exc}") from exc
