"""The tar format as the shard reader needs it: 512-byte headers, pax extended records, member names made
safe, and WebDataset's key / extension split. Damage is described in words, never raised past the reader.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from dataclasses import dataclass

from pipeline.inputs.shard_io import (
    BLOCK,
)

logger = logging.getLogger(__name__)


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension split: key = directory + basename up to its first dot, extension = the rest,
    lowercased. None for names without an extension (not part of any sample)."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    if not stem or not ext:
        return None
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"``; raises ValueError on a malformed record."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\x00":
            break
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0 or pos + length > len(data):
            raise ValueError(f"pax record length {length} at {pos} does not fit the {len(data)}-byte header")
        record = data[space + 1: pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"malformed pax record at {pos}")
        k, v = record[:-1].split(b"=", 1)
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "backslashreplace")
        pos += length
    return out


MAX_REPORTED_PROBLEMS = 100


MAX_EXTENSION_BYTES = 1 << 20


ZERO_BLOCK = b"\0" * BLOCK


MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO", tarfile.DIRTYPE: "a directory"}


class Problems(list):
    """A list of problem messages that stops growing at ``MAX_REPORTED_PROBLEMS`` and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def append(self, message: str) -> None:
        if len(self) < MAX_REPORTED_PROBLEMS:
            super().append(message)
        else:
            self.more += 1


def capped(problems: list[str]) -> tuple[str, ...]:
    extra = max(len(problems) - MAX_REPORTED_PROBLEMS, 0) + getattr(problems, "more", 0)
    if not extra:
        return tuple(problems)
    return (*problems[:MAX_REPORTED_PROBLEMS], f"... and {extra} more problems")


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def parse_header(buf: bytes) -> tarfile.TarInfo | None:
    """The header in a 512-byte block, or None when the block is not a valid header (zero, bad checksum, ...)."""
    if len(buf) != BLOCK or buf == ZERO_BLOCK:
        return None
    try:
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "backslashreplace")
    except Exception:  # any parse failure means "not a header here"; header_problem says which
        return None
    return info if info.size >= 0 else None


def header_problem(buf: bytes) -> str:
    try:
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "backslashreplace")
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return f"negative member size {info.size}"


def short_repr(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_name(name: str) -> str:
    """Member names are dictionary keys only; NUL would survive into the output's key strings, so escape it."""
    return name.replace("\0", "\\x00")


@dataclass
class Member:
    """One tar member as the grouping step sees it. ``kind`` is ``"file"``, ``"dir"`` or a description of another
    type (``"a symbolic link"``); ``damage`` says what was lost right before this member, if anything; ``suspect``
    what is wrong with this member's own extended headers (its name or size may not be the writer's)."""

    name: str
    size: int
    offset: int
    kind: str
    damage: str | None = None
    suspect: str | None = None


class Damaged(ValueError):
    """The tar is corrupt and the reader could not find a valid header after the damage."""


class BadExtension(ValueError):
    """An extended header (pax, GNU long name) was unusable; the stream is still aligned on the next header."""


