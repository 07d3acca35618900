"""Streaming tar reader: one WebDataset shard as a stream of ``Sample``s.

``iter_samples`` reads one shard as a stream of 512-byte tar blocks (``tarfile.TarInfo.frombuf``), plain or
gzip/bzip2/xz-compressed (recognised from the content, decompressed as it streams); member names are only ever
used as dictionary keys, never as filesystem paths. After the iterator is exhausted its ``report``
(``ShardReadReport``) says how many samples were read and whether the shard was truncated (a cut inside a member,
a cut at a member boundary without the end-of-archive blocks, or a count that disagrees with the shard index); its
``error`` also names damage the reader worked around (a corrupt header it skipped past) or could not (a file that
is not a tar, members after an end-of-archive marker). A failed read mid-stream re-opens the file and seeks back to
the exact byte offset (logged), or fails the shard with an error naming the offset. Nothing is skipped silently.

No Ray, no torch.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from typing import Any

from pipeline.inputs.shard_bytes import TarBytes, describe_hint
from pipeline.inputs.shard_bytes import TruncatedData as _Truncated
from pipeline.inputs.shard_io import (
    BLOCK,
    DEFAULT_MAX_MEMBER_BYTES,
    Sample,
    ShardReadReport,
    _ResumableStream,
    _shard_name,
    open_with_retry,
    read_expected_count,
)
from pipeline.inputs.tar_format import BadExtension, Damaged, MAX_EXTENSION_BYTES, MEMBER_KINDS, Member, Problems, ZERO_BLOCK, capped, clean_name, header_problem, padded, parse_header, parse_pax, short_repr, split_member_name

logger = logging.getLogger(__name__)




























class ShardReader:
    """Iterator over the ``Sample``s of one tar shard; ``report`` is set once iteration ends (or ``close``).

    Iteration never raises, whatever the bytes: truncation, corrupt compressed data, read failures and even
    reader bugs end iteration and are described in ``report``. A header that fails its checksum does not end the
    shard: the reader searches block by block for the next valid header and goes on, and the samples on both sides
    of the gap carry an error (members between them are lost). Members larger than ``max_member_bytes`` are
    skipped without being buffered, and their sample carries an error. Links, devices and other non-regular
    members are never read; one named like a sample member still gives that sample (with a note), so it gets a
    status row. A key that reappears after other keys (non-contiguous sample) is not merged into the earlier
    sample: the later members are dropped and listed in ``report.problems``. Keys are unique within a shard.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        shard: str | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        expected: int | None = None,
        use_index: bool = True,
        open_retries: int = 3,
        backoff_s: float = 0.5,
    ):
        self.url = url
        self.shard = shard if shard is not None else _shard_name(url)
        self.storage_options = dict(storage_options or {})
        self.max_member_bytes = max_member_bytes
        self._expected = expected
        self._use_index = use_index
        self._open_retries = open_retries
        self._backoff_s = backoff_s
        self.report: ShardReadReport | None = None
        self._damage: list[str] = []
        self._extensions: tuple[str | None, dict[str, str]] = (None, {})
        self._codec: str | None = None
        self._gen = self._run()

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> Sample:
        return next(self._gen)

    def close(self) -> None:
        """Stop early; ``report`` then describes what was read so far (not marked truncated)."""
        self._gen.close()

    def _run(self) -> Iterator[Sample]:
        problems = Problems()
        count = 0
        truncated = False
        read_failed = False
        error: str | None = None
        stream: _ResumableStream | None = None
        finished = False
        expected = self._expected
        try:
            if expected is None and self._use_index:
                expected = read_expected_count(self.url, self.storage_options)
            try:
                stream = _ResumableStream(
                    lambda: open_with_retry(self.url, self.storage_options,
                                            retries=self._open_retries, backoff_s=self._backoff_s),
                    self.url, self._open_retries, self._backoff_s)
            except Exception as exc:
                error = f"could not open shard: {type(exc).__name__}: {exc}"
                read_failed = finished = True
                return
            try:
                for sample in self._samples(stream, problems):
                    count += 1
                    yield sample
                finished = True
            except _Truncated as exc:
                truncated, error, finished = True, str(exc), True
            except Damaged as exc:
                error, finished = str(exc), True
            except (OSError, ValueError) as exc:
                error, finished = f"{type(exc).__name__}: {exc}", True
                read_failed = isinstance(exc, OSError)
            except Exception as exc:  # a reader bug must not take the job down: the shard reports it instead
                logger.exception("unexpected error reading shard %s", self.url)
                error, finished = f"unexpected {type(exc).__name__} while reading the shard: {exc}", True
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception as exc:  # everything was read already; a failing close changes nothing
                    logger.debug("closing %s: %s", self.url, exc)
            if self._damage:
                damage = "; ".join(self._damage)
                error = f"{damage}; {error}" if error else damage
            if finished and expected is not None and count != expected:
                truncated = True
                msg = f"shard index expects {expected} samples, read {count}"
                error = f"{error}; {msg}" if error else msg
            if error:
                logger.warning("shard %s: %s", self.url, error)
            if problems:
                logger.warning("shard %s: %d problem(s) while reading: %s", self.url,
                               len(problems) + problems.more, "; ".join(problems[:5]))
            self.report = ShardReadReport(
                samples_read=count, truncated=truncated, error=error,
                expected=expected,
                url=self.url, bytes_read=stream.offset if stream is not None else 0,
                problems=capped(problems), read_failed=read_failed)

    def _samples(self, raw: _ResumableStream, problems: list[str]) -> Iterator[Sample]:
        """Group members into samples. When the shard ends early (truncation, corrupt data, failed read) the
        sample in progress is still yielded (with an error when the cut went through one of its members, or when
        the shard is damaged right after it) before the exception propagates, so it gets a status row."""
        state: dict[str, Any] = {"current": None}
        try:
            stream = TarBytes(raw, problems)
            self._codec = stream.codec
            if stream.codec:
                logger.debug("shard %s is %s-compressed; decompressing while reading", self.url, stream.codec)
            yield from self._group(stream, problems, state)
        except Exception as exc:
            current: Sample | None = state["current"]
            if current is not None:
                if state.get("cut_member"):
                    current.errors.append(f"member {state['cut_member']!r} cut by shard truncation or a read "
                                          f"failure: {exc}")
                elif not isinstance(exc, _Truncated):
                    # A cut at a member boundary leaves whole members; anything else (a corrupt header with no
                    # valid one after it, corrupt compressed data) may have eaten this sample's last members.
                    current.errors.append(f"the tar is damaged right after this sample's members ({exc}); "
                                          "the sample may be incomplete")
                yield current
            raise

    def _group(self, stream: TarBytes, problems: list[str], state: dict[str, Any]) -> Iterator[Sample]:
        finished_keys: set[str] = set()
        dropped_keys: set[str] = set()
        damage: str | None = None
        for member in self._members(stream, problems):
            name, size, offset = member.name, member.size, member.offset
            current: Sample | None = state["current"]
            if member.damage:
                # Members between the corrupt header and the next valid one are lost: the samples on either
                # side of the gap may be missing some of theirs, so both carry an error.
                damage = member.damage
                if current is not None:
                    current.errors.append(f"the tar is damaged right after this sample's members ({damage}); "
                                          "the sample may be incomplete")
            split = split_member_name(name)
            if split is None or member.kind == "dir":
                if split is None and member.kind == "file":
                    problems.append(f"member {name!r} at byte {offset} has no extension; skipped")
                self._consume(stream, size, name)
                continue
            key, ext = split
            if current is not None and key != current.key:
                finished_keys.add(current.key)
                state["current"] = None
                yield current
                current = None
            if current is None:
                if key in finished_keys:
                    if key not in dropped_keys:
                        problems.append(f"non-contiguous sample key {key!r}: members reappear at byte {offset} "
                                        "after other samples; later members dropped")
                        dropped_keys.add(key)
                    logger.warning("shard %s: dropping non-contiguous member %r", self.url, name)
                    self._consume(stream, size, name)
                    continue
                current = Sample(key=key, files={}, shard=self.shard)
                state["current"] = current
                if damage is not None:
                    current.errors.append(f"the tar is damaged right before this sample's members ({damage}); "
                                          "the sample may be incomplete")
            damage = None
            if member.suspect:
                current.errors.append(f"member {name!r}: {member.suspect}")
            if member.kind != "file":
                current.notes.append(f"member {name!r} is {member.kind}, not a regular file; skipped")
                continue
            if ext in current.files:
                problems.append(f"duplicate member {name!r} in sample {key!r}; kept the first")
                current.notes.append(f"duplicate member {name!r}; kept the first")
                self._consume(stream, size, name)
                continue
            state["cut_member"] = name
            if size > self.max_member_bytes:
                current.errors.append(f"member {name!r} is {size} bytes, over the limit of "
                                      f"{self.max_member_bytes} bytes; refused")
                self._consume(stream, size, name)
            else:
                current.files[ext] = self._read_data(stream, size, name)
            state["cut_member"] = None
        if state["current"] is not None:
            current, state["current"] = state["current"], None
            yield current

    def _read_data(self, stream: TarBytes, size: int, name: str) -> bytes:
        data = stream.read(size)
        if len(data) < size:
            raise _Truncated(f"tar truncated inside member {name!r}: expected {size} bytes, got {len(data)}")
        pad = padded(size) - size
        if pad and len(stream.read(pad)) < pad:
            raise _Truncated(f"tar truncated in the padding after member {name!r}")
        return data

    def _consume(self, stream: TarBytes, size: int, name: str) -> None:
        total = padded(size)
        if stream.skip(total) < total:
            raise _Truncated(f"tar truncated inside member {name!r} ({size} bytes declared)")

    def _members(self, stream: TarBytes, problems: list[str]) -> Iterator[Member]:
        """Yield the members of the tar in order. For ``kind == "file"`` the caller must consume exactly the
        padded ``size`` bytes of data; other kinds have had their data (if any) skipped already.

        Follows ``tarfile``'s reading rules (data follows regular files and unknown types only; the archive ends
        at the first zero block) and, where the standard reader gives up, goes on: a header that fails its
        checksum starts a block-by-block search for the next valid header, and the first member found after it
        carries ``damage`` (what was skipped). Nothing after the end-of-archive marker is read, but a valid header
        there is reported, because concatenated tars would otherwise lose members without a word."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        pax_global: dict[str, str] = {}
        damaged_at: int | None = None  # offset of the corrupt header whose successor is being searched for
        damage_reason = ""
        pending_damage: str | None = None  # what the search for the next valid header skipped
        pending_suspect: str | None = None  # a problem with the extended headers of the next member
        while True:
            offset = stream.offset
            buf = stream.read(BLOCK)
            if damaged_at is not None:
                if len(buf) < BLOCK:
                    raise Damaged(self._gap_message(damaged_at, damage_reason, stream.offset, found=False))
                info = parse_header(buf)
                if info is None:
                    continue
                pending_damage = self._gap_message(damaged_at, damage_reason, offset, found=True)
                self._damage.append(pending_damage)
                damaged_at, long_name, pax = None, None, {}
            elif len(buf) == 0:
                if offset == 0:
                    raise _Truncated("shard is an empty file (0 bytes), not a tar archive")
                raise _Truncated(f"tar ends at byte {offset} without the end-of-archive blocks "
                                 "(cut at a member boundary)")
            elif len(buf) < BLOCK:
                if offset == 0 and buf[257:262] != b"ustar":
                    what = f"shard's {self._codec}-decompressed content" if self._codec else "shard"
                    raise ValueError(f"not a tar archive: the {what} is {len(buf)} bytes, less than one tar "
                                     f"header{describe_hint(buf)}")
                raise _Truncated(f"tar truncated inside a header at byte {offset}")
            elif buf == ZERO_BLOCK:
                self._after_end(stream, offset, problems)
                return
            else:
                info = parse_header(buf)
                if info is None:
                    damaged_at = offset
                    damage_reason = header_problem(buf)
                    if offset == 0:
                        damage_reason += describe_hint(buf)
                    continue
            try:
                member = self._member(stream, info, offset, long_name, pax, pax_global, problems)
            except BadExtension as exc:
                # The extended header was read whole, so the stream is still aligned: only the next member's
                # name or size may be wrong.
                pending_suspect = str(exc)
                self._damage.append(pending_suspect)
                long_name, pax = None, {}
                continue
            if member is None:  # an extended header: it applies to the next member
                long_name, pax = self._extensions
                continue
            long_name, pax = None, {}
            if pending_damage is not None:
                member.damage, pending_damage = pending_damage, None
            if pending_suspect is not None:
                member.suspect = "; ".join(filter(None, (pending_suspect, member.suspect)))
                pending_suspect = None
            yield member

    def _member(self, stream: TarBytes, info: tarfile.TarInfo, offset: int, long_name: str | None,
                pax: dict[str, str], pax_global: dict[str, str], problems: list[str]) -> Member | None:
        """The member described by ``info`` (None for an extended header, whose content is left in
        ``self._extensions``). Skips the data of members that are not regular files."""
        size = info.size
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE):
            if size > MAX_EXTENSION_BYTES:
                self._consume(stream, size, f"<extended header at byte {offset}>")
                raise BadExtension(f"extended tar header at byte {offset} declares {size} bytes (more than "
                                    f"{MAX_EXTENSION_BYTES}); ignored")
            data = self._read_data(stream, size, f"<extended header at byte {offset}>")
            try:
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = clean_name(data.split(b"\0", 1)[0].decode("utf-8", "backslashreplace"))
                elif info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    pax = {**pax, **parse_pax(data)}
                elif info.type == tarfile.XGLTYPE:
                    pax_global.update(parse_pax(data))
            except ValueError as exc:
                raise BadExtension(f"malformed pax header at byte {offset}: {exc}; ignored") from exc
            self._extensions = (long_name, pax)
            return None
        name = clean_name(info.name)
        headers = {**pax_global, **pax}
        if "path" in headers:
            name = clean_name(headers["path"])
        if long_name is not None:
            name = long_name
        suspect = None
        if "size" in headers:
            try:
                size = int(headers["size"])
            except ValueError:
                size = -1
            if size < 0:
                # tarfile would read 0 bytes here and lose alignment; the ustar size field is the better guess.
                size = info.size
                suspect = (f"pax header of member {name!r} at byte {offset} has an invalid size "
                           f"{short_repr(headers['size'])}; used the ustar header's {size}")
                self._damage.append(suspect)
        sparse = info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in headers)
        if info.type in tarfile.REGULAR_TYPES and not sparse:
            return Member(name, size, offset, "file", suspect=suspect)
        if info.type == tarfile.GNUTYPE_SPARSE:
            self._skip_sparse_extensions(stream, info, name)
        kind = MEMBER_KINDS.get(info.type, f"of unknown type {info.type!r}")
        if sparse:
            kind = "a sparse file"
        if info.type != tarfile.DIRTYPE:
            problems.append(f"member {name!r} at byte {offset} is {kind}, not a regular file; skipped")
        if info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES:
            self._consume(stream, size, name)
        return Member(name, 0, offset, "dir" if info.type == tarfile.DIRTYPE else kind)

    def _skip_sparse_extensions(self, stream: TarBytes, info: tarfile.TarInfo, name: str) -> None:
        """Old GNU sparse members may be followed by extra 512-byte sparse maps before their data."""
        extended = bool(getattr(info, "_sparse_structs", ((), False, 0))[1])
        while extended:
            block = stream.read(BLOCK)
            if len(block) < BLOCK:
                raise _Truncated(f"tar truncated inside the sparse map of member {name!r}")
            extended = bool(block[504])

    def _after_end(self, stream: TarBytes, offset: int, problems: list[str]) -> None:
        """Past the end-of-archive marker at ``offset``: read the rest of the shard (normally zero padding) and
        report anything else in it. A valid tar header there means more members follow (e.g. tars concatenated
        with ``cat``); they are not read, as by ``tar`` and ``tarfile``, but the shard's error says so."""
        zero_blocks = 1
        junk_from: int | None = None
        while True:
            at = stream.offset
            buf = stream.read(BLOCK)
            if not buf:
                break
            if buf == ZERO_BLOCK[:len(buf)]:
                zero_blocks += 1
                continue
            if len(buf) == BLOCK and parse_header(buf) is not None:
                self._damage.append(f"the archive continues after its end-of-archive marker at byte {offset}: "
                                    f"a valid member header at byte {at} (concatenated tars?); members after "
                                    "the marker were not read")
                return
            if junk_from is None:
                junk_from = at
        if zero_blocks == 1 and junk_from == offset + BLOCK:
            problems.append(f"end-of-archive marker at byte {offset} is a single zero block")
        if junk_from is not None:
            problems.append(f"{stream.offset - junk_from} bytes of data that is not tar headers after the "
                            f"end-of-archive marker at byte {offset}, from byte {junk_from}; ignored")

    def _gap_message(self, damaged_at: int, reason: str, resumed_at: int, *, found: bool) -> str:
        if found:
            return (f"corrupt tar header at byte {damaged_at} ({reason}); skipped {resumed_at - damaged_at} bytes "
                    f"to the next valid header at byte {resumed_at}")
        if damaged_at == 0:
            what = f"{self._codec}-decompressed content" if self._codec else "bytes"
            return f"not a tar archive: no valid tar header in the shard's {resumed_at} {what} ({reason})"
        return (f"corrupt tar header at byte {damaged_at} ({reason}); no valid header in the remaining "
                f"{resumed_at - damaged_at} bytes")
