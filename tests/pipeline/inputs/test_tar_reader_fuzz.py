"""The tar reader against mangled shards: every prefix of a valid shard, and seeded random byte flips, cuts,
insertions, deletions and block copies of plain, gzip and pax/GNU-long-name shards. Whatever the bytes, iteration
ends, nothing is raised, every sample yielded is counted in the report and keys stay unique; decoding what comes
out never raises either. Runs in about 10 s."""

from __future__ import annotations

import gzip
import io
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from pipeline.inputs import tar_reader
from pipeline.inputs.decode import STATUSES, decode_sample
from pipeline.inputs.sources import Sample, ShardReadReport, iter_samples
from tests.pipeline import corpus


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: a reader that loops forever is a bug this file exists to catch."""

    def expired(signum, frame):
        raise TimeoutError(f"reader did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cases() -> list[corpus.CorpusCase]:
    jpg = corpus.good_jpeg(16, 12)
    return [corpus.CorpusCase(f"s/{i:03d}", {"jpg": jpg, "json": corpus.sidecar(boxes=[[1, 1, 5, 5]])}, "ok")
            for i in range(3)]


def _shards() -> dict[str, bytes]:
    cases = _cases()
    plain = corpus.tar_bytes(cases)
    long = corpus.tar_bytes([corpus.CorpusCase("d/" + "x" * 150 + "/k", cases[0].members, "ok"), *cases[1:]])
    pax = corpus.tar_bytes([corpus.CorpusCase("é/ü", cases[0].members, "ok"), *cases[1:]], fmt=tarfile.PAX_FORMAT)
    return {"plain": plain, "gnu-long": long, "pax": pax, "gzip": gzip.compress(plain, mtime=0)}


def _read(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Sample], ShardReadReport]:
    monkeypatch.setattr(tar_reader, "open_with_retry", lambda *a, **k: io.BytesIO(data))
    reader = iter_samples("mem://fuzz.tar", use_index=False)
    samples = list(reader)
    report = reader.report
    assert report is not None
    assert report.samples_read == len(samples)
    assert len({s.key for s in samples}) == len(samples)
    assert not report.read_failed  # in-memory bytes never fail to read: every problem is the content's
    assert report.error is not None or not report.truncated
    for s in samples:
        assert isinstance(s.key, str) and s.key.encode("utf-8")
        assert all(isinstance(v, bytes) for v in s.files.values())
    return samples, report


def test_every_prefix_of_a_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cuts inside headers, data, padding, between members and inside the end-of-archive blocks."""
    cases = _cases()
    plain = corpus.tar_bytes(cases)
    spans = corpus.member_spans(plain)
    end_marker = spans[-1][1] + (spans[-1][2] + 511) // 512 * 512
    cuts = sorted({c for b in range(0, end_marker + 1024, 512) for c in (b, b + 1, b + 100, b + 511)})
    with _deadline(60):
        for cut in cuts:
            samples, report = _read(plain[:cut], monkeypatch)
            if 0 < cut < 257:  # no ustar magic yet: as good a "not a tar archive" as a truncated one
                assert report.truncated or "not a tar archive" in report.error, cut
            elif cut <= end_marker:
                assert report.truncated, cut
            keys = [s.key for s in samples]
            assert keys == [c.key for c in cases][: len(keys)], cut
            for s, case in zip(samples[:-1], cases):
                assert s.files == case.members and not s.errors, cut  # all but the last are complete
            if samples and not samples[-1].errors:
                # the sample at the cut is either flagged or a faithful subset (cut between its members)
                last, original = samples[-1], cases[len(samples) - 1].members
                assert all(original[ext] == data for ext, data in last.files.items()), cut
        packed = gzip.compress(plain, mtime=0)
        for cut in range(0, len(packed), 37):
            samples, report = _read(packed[:cut], monkeypatch)
            assert report.truncated, cut
            assert [s.key for s in samples] == [c.key for c in cases][: len(samples)], cut


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    if not out:  # an earlier mutation cut everything: start again from noise
        return rng.integers(0, 256, int(rng.integers(1, 1500)), dtype=np.uint8).tobytes()
    kind = int(rng.integers(0, 7))
    at = int(rng.integers(0, len(out)))
    if kind == 0:  # byte flips
        for _ in range(int(rng.integers(1, 9))):
            out[int(rng.integers(0, len(out)))] ^= int(rng.integers(1, 256))
    elif kind == 1:  # cut
        del out[at:]
    elif kind == 2:  # insertion
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 700)), dtype=np.uint8).tobytes()
    elif kind == 3:  # deletion
        del out[at:at + int(rng.integers(1, 700))]
    elif kind == 4:  # a zeroed block
        block = at // 512 * 512
        out[block:block + 512] = b"\0" * len(out[block:block + 512])
    elif kind == 5:  # a copied range (duplicate headers and members)
        length = int(rng.integers(1, 2048))
        out[at:at] = out[max(0, at - length):at]
    else:  # a header's size field rewritten with other octal digits
        block = at // 512 * 512
        out[block + 124:block + 135] = b"".join(b"%o" % int(d) for d in rng.integers(0, 8, 11))
    return bytes(out)


@pytest.mark.parametrize("name", ["plain", "gnu-long", "pax", "gzip"])
def test_random_mutations_never_escape_the_reader(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original = _shards()[name]
    rng = np.random.default_rng(20240607)
    outcomes: dict[str, int] = {"clean": 0, "error": 0}
    with _deadline(60):
        reference, _ = _read(original, monkeypatch)
        assert len(reference) == 3
        for i in range(400):
            data = _mutate(original, rng)
            if i % 3 == 0:
                data = _mutate(data, rng)
            samples, report = _read(data, monkeypatch)
            outcomes["error" if report.error else "clean"] += 1
            if i % 8 == 0:
                for s in samples:
                    decoded = decode_sample(s, require_prompts=True)
                    assert decoded.status in STATUSES
                    assert (decoded.status == "ok") == (decoded.error is None)
    assert outcomes["error"] > 100  # the mutations do reach the error paths
