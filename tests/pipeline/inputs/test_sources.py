"""Shard listing and streaming tar reading: expansion rules, truncation detection, index checks, safety, retries,
locally and against a real S3 endpoint (moto server on loopback, through s3fs)."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.inputs import shard_io, sources, tar_format, tar_reader
from pipeline.inputs.shard_bytes import TarBytes, describe_bytes
from pipeline.inputs.sources import ShardRef, expand_braces, expand_shards, iter_samples, read_expected_count
from pipeline.inputs.tar_format import split_member_name
from tests.pipeline import corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, corpus.ShardExpectation]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, corpus.write_corpus(directory)


def _touch_shards(directory: Path, names: list[str]) -> None:
    for n in names:
        (directory / n).write_bytes(corpus.tar_bytes([]))


# ----------------------------------------------------------------------------------------------------------------
# Expansion


def test_expand_braces_ranges_lists_and_padding() -> None:
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert len(expand_braces("shard-{000000..000999}.tar")) == 1000
    assert expand_braces("shard-{000000..000999}.tar")[-1] == "shard-000999.tar"
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="neither a range"):
        expand_braces("s-{abc}.tar")


def test_split_member_name_follows_webdataset_rules() -> None:
    assert split_member_name("dir/sub/000001.JPG") == ("dir/sub/000001", "jpg")
    assert split_member_name("a.b.seg.png") == ("a", "b.seg.png")
    assert split_member_name("x.y/000001.json") == ("x.y/000001", "json")
    assert split_member_name("README") is None
    assert split_member_name("dir/.hidden") is None


def test_expand_brace_glob_and_list_locally(tmp_path: Path) -> None:
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    _touch_shards(tmp_path, names)
    by_brace = expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    by_glob = expand_shards(str(tmp_path / "shard-*.tar"))
    assert [r.url for r in by_brace] == [str(tmp_path / n) for n in names]
    assert by_glob == by_brace
    assert [r.name for r in by_brace] == [n[:-4] for n in names]

    listing = tmp_path / "urls.txt"
    listing.write_text("# corpus\n\n" + "\n".join(str(tmp_path / n) for n in reversed(names)) + "\n")
    assert expand_shards(str(listing)) == by_brace
    other = tmp_path / "urls.lst"
    other.write_text(str(tmp_path / names[0]) + "\n")
    assert expand_shards("@" + str(other)) == by_brace[:1]
    # A list of specs overlapping each other: sorted, de-duplicated.
    mixed = expand_shards([str(tmp_path / names[3]), str(tmp_path / "shard-00000{0,1}.tar"), str(listing)])
    assert mixed == by_brace


def test_missing_shards_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch_shards(tmp_path, ["shard-000000.tar", "shard-000002.tar"])
    spec = str(tmp_path / "shard-{000000..000003}.tar")
    with pytest.raises(ValueError, match=r"2 shard\(s\) do not exist: .*shard-000001\.tar.*shard-000003\.tar"):
        expand_shards(spec)
    with caplog.at_level(logging.WARNING, logger="pipeline.inputs.sources"):
        refs = expand_shards(spec, allow_missing=True)
    assert [r.name for r in refs] == ["shard-000000", "shard-000002"]
    assert "missing" in caplog.text
    with pytest.raises(ValueError, match="matched no shards"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="empty spec"):
        expand_shards([])


def test_clashing_basenames_get_deterministic_unique_safe_names(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _touch_shards(tmp_path / sub, ["shard 0 (copy).tar"])
    refs = expand_shards(str(tmp_path / "*" / "*.tar"))
    assert len(refs) == 2 and refs[0].name != refs[1].name
    assert all(r.name.startswith("shard_0_copy-") and len(r.name) == len("shard_0_copy-") + 8 for r in refs)
    assert all(set(r.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for r in refs)
    assert expand_shards(str(tmp_path / "*" / "*.tar")) == refs
    assert sources.shard_names(["s3://b/../..tar"]) == ["_."]


# ----------------------------------------------------------------------------------------------------------------
# Reading


def test_corpus_shards_report_as_expected(corpus_dir) -> None:
    _, expectations = corpus_dir
    for stem, exp in expectations.items():
        reader = iter_samples(exp.path)
        samples = list(reader)
        report = reader.report
        assert report is not None
        assert [s.key for s in samples] == list(exp.samples), stem
        assert report.samples_read == exp.samples_read, stem
        assert report.truncated == exp.truncated, (stem, report)
        assert report.expected == exp.expected, stem
        assert (report.error is not None) == (exp.truncated or exp.error is not None), (stem, report.error)
        assert exp.error_matches(report.error), (stem, report.error)
        assert not report.read_failed, stem
        assert len({s.key for s in samples}) == len(samples), stem
        for s in samples:
            assert s.shard == stem
            assert s.files or s.errors or s.notes, (stem, s.key)


def test_truncation_detected_both_ways(corpus_dir) -> None:
    _, exp = corpus_dir
    mid = iter_samples(exp["trunc-mid-000000"].path, use_index=False)
    samples = list(mid)
    assert mid.report.truncated and "inside member" in mid.report.error
    assert samples[-1].errors and "cut by shard truncation" in samples[-1].errors[0]
    assert not samples[0].errors

    edge = iter_samples(exp["trunc-edge-000000"].path)
    samples = list(edge)
    assert edge.report.expected is None  # detected from the tar itself, not from an index
    assert edge.report.truncated and "end-of-archive" in edge.report.error
    assert len(samples) == 3 and not any(s.errors for s in samples)


def test_index_mismatch_and_index_formats(tmp_path: Path) -> None:
    cases = corpus.good_cases()[:2]
    (tmp_path / "a.tar").write_bytes(corpus.tar_bytes(cases))
    (tmp_path / "b.tar").write_bytes(corpus.tar_bytes(cases))
    (tmp_path / "_index.json").write_text(json.dumps({"a": 2, "b.tar": 5}))
    assert read_expected_count(str(tmp_path / "a.tar")) == 2
    ok = iter_samples(str(tmp_path / "a.tar"))
    list(ok)
    assert ok.report.expected == 2 and not ok.report.truncated and ok.report.error is None
    bad = iter_samples(str(tmp_path / "b.tar"))
    list(bad)
    assert bad.report.truncated and bad.report.error == "shard index expects 5 samples, read 2"
    # A per-shard index wins over _index.json.
    corpus.write_index(tmp_path, "b", 2)
    again = iter_samples(str(tmp_path / "b.tar"))
    list(again)
    assert again.report.expected == 2 and not again.report.truncated
    assert read_expected_count(str(tmp_path / "missing.tar")) is None


def test_empty_tar_and_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(corpus.tar_bytes([]))
    (tmp_path / "zero.tar").write_bytes(b"")
    r = iter_samples(str(tmp_path / "empty.tar"))
    assert list(r) == [] and r.report.samples_read == 0 and not r.report.truncated and r.report.error is None
    z = iter_samples(str(tmp_path / "zero.tar"))
    assert list(z) == [] and z.report.truncated and "0 bytes" in z.report.error


def test_long_names_pax_directories_and_unsafe_names_stay_in_memory(corpus_dir, tmp_path: Path) -> None:
    _, exp = corpus_dir
    keys = [s.key for s in iter_samples(exp["good-000000"].path)]
    assert any(len(k) > 100 for k in keys)  # GNU ././@LongLink name restored
    assert "good" not in keys  # the directory entry is skipped
    pax_keys = [s.key for s in iter_samples(exp["good-000001"].path)]
    assert pax_keys[0] == "pax/échantillon-000000"

    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        evil = corpus.tar_bytes([], extra=[("../../escape/x.jpg", b"1"), ("/abs/y.jpg", b"2"), ("../z.json", b"{}")])
        (tmp_path / "evil.tar").write_bytes(evil)
        samples = list(iter_samples("evil.tar"))
    finally:
        os.chdir(cwd)
    assert [s.key for s in samples] == ["../../escape/x", "/abs/y", "../z"]
    assert set(os.listdir(tmp_path)) == before | {"evil.tar"}
    assert not (tmp_path.parent / "escape").exists() and not Path("/abs").exists()


def test_non_contiguous_keys_and_duplicates_are_reported_not_merged(tmp_path: Path) -> None:
    members = [("a.jpg", b"1"), ("a.jpg", b"0"), ("b.jpg", b"2"), ("a.json", b"{}"), ("noext", b"x")]
    (tmp_path / "nc.tar").write_bytes(corpus.tar_bytes([], extra=members))
    reader = iter_samples(str(tmp_path / "nc.tar"))
    samples = list(reader)
    assert [(s.key, sorted(s.files)) for s in samples] == [("a", ["jpg"]), ("b", ["jpg"])]
    assert samples[0].files["jpg"] == b"1" and samples[1].files["jpg"] == b"2"
    problems = " | ".join(reader.report.problems)
    assert "non-contiguous sample key 'a'" in problems and "duplicate member 'a.jpg'" in problems
    assert "'noext'" in problems
    assert not reader.report.truncated


def test_oversized_member_is_refused_per_sample(tmp_path: Path) -> None:
    members = [("a.jpg", b"x" * 5000), ("a.json", b"{}"), ("b.jpg", b"y" * 100)]
    (tmp_path / "big.tar").write_bytes(corpus.tar_bytes([], extra=members))
    reader = iter_samples(str(tmp_path / "big.tar"), max_member_bytes=1000)
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "b"]
    assert "jpg" not in samples[0].files and "over the limit of 1000 bytes" in samples[0].errors[0]
    assert samples[0].files["json"] == b"{}"
    assert samples[1].files == {"jpg": b"y" * 100} and not samples[1].errors
    assert reader.report.error is None


def test_corrupt_header_resyncs_and_flags_the_samples_beside_the_gap(tmp_path: Path) -> None:
    cases = corpus.good_cases()
    data = bytearray(corpus.tar_bytes(cases))
    spans = corpus.member_spans(bytes(data))
    header_of_third = spans[2][1] - 512
    data[header_of_third:header_of_third + 512] = b"\x7f" * 512
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    reader = iter_samples(str(tmp_path / "bad.tar"))
    samples = list(reader)
    assert [s.key for s in samples] == [c.key for c in cases]
    assert "damaged right after" in samples[0].errors[0] and "damaged right before" in samples[1].errors[0]
    assert sorted(samples[1].files) == ["png"]  # its json member's header was the one destroyed
    assert not samples[2].errors and not samples[3].errors
    assert samples[3].files == cases[3].members
    assert f"corrupt tar header at byte {header_of_third}" in reader.report.error
    assert f"next valid header at byte {header_of_third + 1024}" in reader.report.error
    assert not reader.report.truncated and reader.report.samples_read == 4


class _Flaky(io.BytesIO):
    """Raises ConnectionError on reads that start at or past ``fail_at`` while ``budget["n"]`` lasts."""

    budget: ClassVar[dict[str, int]] = {"n": 0}

    def __init__(self, data: bytes, fail_at: int):
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n: int = -1) -> bytes:
        if self.tell() >= self.fail_at and self.budget["n"] > 0:
            self.budget["n"] -= 1
            raise ConnectionError("connection reset by peer")
        return super().read(n)


def test_transient_errors_retry_at_open_and_resume_at_offset(tmp_path: Path, monkeypatch, caplog) -> None:
    data = corpus.tar_bytes(corpus.good_cases())
    third_sample_header = corpus.member_spans(data)[4][1] - 512
    opens = {"n": 0}

    def fake_open(url, storage_options=None, *, retries=3, backoff_s=0.5):
        opens["n"] += 1
        return _Flaky(data, fail_at=third_sample_header + 100)

    monkeypatch.setattr(tar_reader, "open_with_retry", fake_open)
    _Flaky.budget["n"] = 2
    with caplog.at_level(logging.WARNING, logger="pipeline.inputs.shard_io"):
        reader = iter_samples("mem://x.tar", use_index=False, backoff_s=0.0)
        samples = list(reader)
    assert len(samples) == 4 and reader.report.error is None and not reader.report.truncated
    assert opens["n"] == 3  # first open + two re-opens that seek back to the failed offset
    assert "seeking back" in caplog.text
    reference = list(iter_samples(str(_write(tmp_path, data)), use_index=False))
    assert [s.files for s in samples] == [s.files for s in reference]

    _Flaky.budget["n"] = 100
    reader = iter_samples("mem://x.tar", use_index=False, backoff_s=0.0, open_retries=2)
    samples = list(reader)
    assert reader.report.error is not None and "failed at byte offset" in reader.report.error
    assert [s.key for s in samples] == ["good/000000", "good/000001", "good/000002"]
    assert samples[-1].errors and "cut by shard truncation or a read failure" in samples[-1].errors[0]


def test_open_with_retry_retries_transient_but_not_missing(monkeypatch) -> None:
    calls = {"n": 0}

    class FS:
        def open(self, path, mode):
            calls["n"] += 1
            if calls["n"] < 3:
                raise ConnectionError("temporary")
            return io.BytesIO(b"ok")

    monkeypatch.setattr(shard_io.fsspec.core, "url_to_fs", lambda url, **kw: (FS(), url))
    assert shard_io.open_with_retry("s3://b/x.tar", backoff_s=0.0).read() == b"ok" and calls["n"] == 3

    class Missing:
        def open(self, path, mode):
            calls["n"] += 1
            raise FileNotFoundError(path)

    calls["n"] = 0
    monkeypatch.setattr(shard_io.fsspec.core, "url_to_fs", lambda url, **kw: (Missing(), url))
    with pytest.raises(FileNotFoundError):
        shard_io.open_with_retry("s3://b/x.tar", backoff_s=0.0)
    assert calls["n"] == 1


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "ref.tar"
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------------------
# S3 on loopback


@pytest.fixture(scope="module")
def s3_corpus(tmp_path_factory: pytest.TempPathFactory):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"}}
    try:
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("corpus-bucket")
        directory = tmp_path_factory.mktemp("s3corpus")
        expectations = corpus.write_corpus(directory)
        for path in sorted(directory.iterdir()):
            fs.put_file(str(path), f"corpus-bucket/corpus/{path.name}")
        fs.pipe_file("corpus-bucket/lists/urls.txt",
                     b"# two shards\ns3://corpus-bucket/corpus/good-{000000..000001}.tar\n")
        yield options, expectations
    finally:
        server.stop()


def test_s3_expansion_and_reading(s3_corpus) -> None:
    options, expectations = s3_corpus
    globbed = expand_shards("s3://corpus-bucket/corpus/*.tar", options)
    assert [r.name for r in globbed] == sorted(expectations)
    assert all(r.url.startswith("s3://corpus-bucket/corpus/") for r in globbed)
    braced = expand_shards("s3://corpus-bucket/corpus/good-{000000..000001}.tar", options)
    listed = expand_shards("s3://corpus-bucket/lists/urls.txt", options)
    assert braced == listed == [ShardRef("s3://corpus-bucket/corpus/good-000000.tar", "good-000000"),
                                ShardRef("s3://corpus-bucket/corpus/good-000001.tar", "good-000001")]
    with pytest.raises(ValueError, match="good-000002.tar"):
        expand_shards("s3://corpus-bucket/corpus/good-{000000..000002}.tar", options)

    for ref in globbed:
        exp = expectations[ref.name]
        reader = iter_samples(ref.url, options, shard=ref.name)
        keys = [s.key for s in reader]
        assert keys == list(exp.samples), ref.name
        assert reader.report.truncated == exp.truncated, ref.name
        assert reader.report.expected == exp.expected, ref.name


def test_relative_and_absolute_spellings_are_one_shard(tmp_path: Path, monkeypatch) -> None:
    _touch_shards(tmp_path, ["s-000000.tar"])
    monkeypatch.chdir(tmp_path)
    refs = expand_shards(["s-000000.tar", str(tmp_path / "s-000000.tar"), "./s-*.tar"])
    assert refs == [ShardRef(str(tmp_path / "s-000000.tar"), "s-000000")]
    (tmp_path / "nested.txt").write_text("other.list\n")
    with pytest.raises(ValueError, match="names other list files"):
        expand_shards("@nested.txt")


def test_early_close_and_open_failure_reports(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(corpus.tar_bytes(corpus.good_cases()))
    reader = iter_samples(str(tmp_path / "a.tar"))
    next(reader)
    assert reader.report is None
    reader.close()
    assert reader.report.samples_read == 1 and not reader.report.truncated and reader.report.error is None
    gone = iter_samples(str(tmp_path / "gone.tar"), backoff_s=0.0)
    assert list(gone) == [] and "could not open shard: FileNotFoundError" in gone.report.error


def test_reader_modules_do_not_import_ray_or_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, pipeline.inputs.sources, pipeline.inputs.decode; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_non_utf8_member_names_become_printable_distinct_keys(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ("caf\xe9.jpg", "cafe.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "latin.tar").write_bytes(buf.getvalue())
    keys = [s.key for s in iter_samples(str(tmp_path / "latin.tar"))]
    assert keys == ["caf\\xe9", "cafe"]
    assert all(k.encode("utf-8") for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Compressed shards, damaged tars, odd members


def test_compressed_shard_names_and_indexes(tmp_path: Path) -> None:
    import gzip

    cases = corpus.good_cases()
    data = gzip.compress(corpus.tar_bytes(cases), mtime=0)
    for name in ("a.tar.gz", "b.tgz", "c.TAR.GZ"):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a.idx.json").write_text(json.dumps({"num_samples": 4}))
    (tmp_path / "_index.json").write_text(json.dumps({"b": 5}))
    refs = expand_shards(str(tmp_path / "*[zZ]"))
    assert [r.name for r in refs] == ["a", "b", "c"]
    assert read_expected_count(str(tmp_path / "a.tar.gz")) == 4
    assert read_expected_count(str(tmp_path / "b.tgz")) == 5
    for ref in refs:
        reader = iter_samples(ref.url, shard=ref.name)
        samples = list(reader)
        assert [s.files for s in samples] == [c.members for c in cases]
        assert reader.report.bytes_read == len(data)  # counts shard (compressed) bytes
    assert sources.shard_names(["x/s.tar", "y/s.tar.gz"])[0].startswith("s-")  # same stem: disambiguated


def test_compression_formats_and_bombs_stream_in_bounded_pieces(monkeypatch) -> None:
    import bz2
    import gzip
    import lzma

    plain = corpus.tar_bytes(corpus.good_cases())
    for packed in (gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)):
        monkeypatch.setattr(tar_reader, "open_with_retry", lambda *a, **k: io.BytesIO(packed))
        reader = iter_samples("mem://x.tar", use_index=False)
        assert len(list(reader)) == 4 and reader.report.error is None
    # 64 MiB of zeros gzip to ~64 KiB; the reader stops at the first zero block and never holds more than a
    # bounded piece of the output.
    stream = TarBytes(_Stream(gzip.compress(b"\0" * (64 << 20))), [])
    assert stream.read(1 << 20) == b"\0" * (1 << 20)
    assert len(stream._out) == 0 and len(stream._pending) <= 1 << 16


class _Stream(io.BytesIO):
    """A BytesIO with the ``offset``/``skip`` of the reader's raw stream."""

    @property
    def offset(self) -> int:
        return self.tell()

    def skip(self, n: int) -> int:
        return len(self.read(n))


def test_corrupt_cut_and_padded_compressed_streams(monkeypatch, caplog) -> None:
    import gzip

    plain = corpus.tar_bytes(corpus.good_cases())
    packed = gzip.compress(plain, mtime=0)
    corrupt = bytearray(packed)
    corrupt[len(packed) // 2: len(packed) // 2 + 64] = b"\xff" * 64
    padded = packed + b"\0" * 1000  # tape-style zero padding after the gzip stream
    results = {}
    for name, data in (("corrupt", bytes(corrupt)), ("cut", packed[:30]), ("padded", padded)):
        monkeypatch.setattr(tar_reader, "open_with_retry", lambda *a, d=data, **k: io.BytesIO(d))
        reader = iter_samples("mem://x.tar", use_index=False)
        results[name] = (list(reader), reader.report)
    samples, report = results["corrupt"]
    assert "corrupt gzip data" in report.error and not report.read_failed and not report.truncated
    samples, report = results["cut"]
    assert samples == [] and report.truncated and "gzip stream ends before its end marker" in report.error
    samples, report = results["padded"]
    assert len(samples) == 4 and report.error is None
    assert any("1000 bytes of non-gzip data" in p for p in report.problems)


def test_read_failure_inside_a_compressed_shard_is_a_read_failure(monkeypatch) -> None:
    import gzip

    packed = gzip.compress(corpus.tar_bytes(corpus.good_cases()), mtime=0)
    monkeypatch.setattr(tar_reader, "open_with_retry", lambda *a, **k: _Flaky(packed, fail_at=len(packed) // 2))
    _Flaky.budget["n"] = 100
    reader = iter_samples("mem://x.tar.gz", use_index=False, backoff_s=0.0, open_retries=1)
    list(reader)
    assert reader.report.read_failed and "failed at byte offset" in reader.report.error


def _raw_member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, size: int | None = None) -> bytes:
    """One ustar header (with ``size`` forced if given) plus padded data, written by hand."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size is not None:
        header[124:136] = b"%011o\0" % size
        header[148:156] = b" " * 8
        header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + data + b"\0" * ((512 - len(data) % 512) % 512)


def test_link_members_with_a_declared_size_have_no_data_as_in_tarfile(tmp_path: Path) -> None:
    jpg = corpus.good_jpeg()
    data = (_raw_member("a.jpg", jpg) + _raw_member("a.json", b"", tarfile.SYMTYPE, size=1000)
            + _raw_member("b.jpg", jpg) + b"\0" * 1024)
    (tmp_path / "l.tar").write_bytes(data)
    with tarfile.open(tmp_path / "l.tar") as tar:  # the reference reader agrees
        assert [m.name for m in tar.getmembers()] == ["a.jpg", "a.json", "b.jpg"]
    reader = iter_samples(str(tmp_path / "l.tar"))
    samples = list(reader)
    assert [(s.key, sorted(s.files)) for s in samples] == [("a", ["jpg"]), ("b", ["jpg"])]
    assert "symbolic link" in samples[0].notes[0] and reader.report.error is None


def test_bad_pax_headers_flag_the_member_and_resync(tmp_path: Path) -> None:
    jpg = corpus.good_jpeg()
    bad_record = _raw_member("pax", b"99 path=x\n", tarfile.XHDTYPE)
    bad_size = _raw_member("pax", b"15 size=-12345\n", tarfile.XHDTYPE)
    data = (_raw_member("a.jpg", jpg) + bad_record + _raw_member("b.jpg", jpg) + _raw_member("c.jpg", jpg)
            + bad_size + _raw_member("d.jpg", jpg) + _raw_member("e.jpg", jpg) + b"\0" * 1024)
    (tmp_path / "p.tar").write_bytes(data)
    reader = iter_samples(str(tmp_path / "p.tar"))
    samples = {s.key: s for s in reader}
    assert list(samples) == ["a", "b", "c", "d", "e"]
    assert all(s.files["jpg"] == jpg for s in samples.values())  # alignment kept throughout
    assert "malformed pax header" in samples["b"].errors[0] and "invalid size" in samples["d"].errors[0]
    assert not samples["a"].errors and not samples["c"].errors and not samples["e"].errors
    assert "malformed pax header" in reader.report.error and "invalid size" in reader.report.error


def test_sparse_and_unknown_type_members_are_skipped(tmp_path: Path) -> None:
    jpg = corpus.good_jpeg()
    data = (_raw_member("a.jpg", jpg) + _raw_member("v.jpg", b"volume", b"V") + _raw_member("s.jpg", jpg, b"S")
            + _raw_member("b.jpg", jpg) + b"\0" * 1024)
    (tmp_path / "s.tar").write_bytes(data)
    reader = iter_samples(str(tmp_path / "s.tar"))
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "v", "s", "b"] and samples[3].files["jpg"] == jpg
    assert "unknown type" in samples[1].notes[0] and "sparse file" in samples[2].notes[0]
    assert reader.report.error is None


def test_problems_are_capped_and_counted(tmp_path: Path) -> None:
    extra = [(f"noext{i}", b"x") for i in range(250)]
    (tmp_path / "n.tar").write_bytes(corpus.tar_bytes([], extra=extra))
    reader = iter_samples(str(tmp_path / "n.tar"))
    assert list(reader) == []
    assert len(reader.report.problems) == tar_format.MAX_REPORTED_PROBLEMS + 1
    assert reader.report.problems[-1] == "... and 150 more problems"


def test_a_reader_bug_becomes_a_report_not_an_exception(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.tar").write_bytes(corpus.tar_bytes(corpus.good_cases()))

    def broken(name: str):
        raise RuntimeError("boom")

    monkeypatch.setattr(tar_reader, "split_member_name", broken)
    reader = iter_samples(str(tmp_path / "a.tar"))
    assert list(reader) == []
    assert reader.report.error == "unexpected RuntimeError while reading the shard: boom"
    assert not reader.report.read_failed


def test_describe_bytes_names_common_impostors() -> None:
    assert describe_bytes(b"PK\x03\x04rest") == "a zip archive"
    assert describe_bytes(b"  <!DOCTYPE html><html>") == "HTML text"
    assert describe_bytes(b"\x00\x00\x00\x1cftypavif") == "an AVIF image"
    assert describe_bytes(corpus.tar_bytes(corpus.good_cases()[:1])) == "a tar archive"
    assert describe_bytes(bytes(range(256))) is None
