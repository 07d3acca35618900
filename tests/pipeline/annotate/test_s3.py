"""The annotation job against a real S3 endpoint on loopback (moto's server mode), read back without project code.

Shards live in one bucket, output goes to another, everything through s3fs with an endpoint URL passed in
``--storage-options``. The output is read back with plain pyarrow (``pyarrow.fs.S3FileSystem``) and with DuckDB
(on a local copy: DuckDB's httpfs extension cannot be downloaded here), and is checked against the corpus's
expected statuses and the schemas in ``schemas/``. The secret key must not appear in anything the job writes,
prints or logs (DEBUG included, Ray worker logs included). A run stopped after some shards is finished by a second
run, and a third run into the same bucket processes nothing, all in one driver process (s3fs's listing cache must
not hide commits made by the workers).

Run time: about 55 s on 2 cores (four job runs on one CPU worker; most of it is actor start-up and model build).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from schemas import IMAGES_SCHEMA, INSTANCES_SCHEMA, SCHEMA_VERSION

from tests.s3server import moto_s3

from tests.pipeline.corpus import ShardExpectation, write_corpus

ACCESS_KEY = "ovsam-test-access-key"
# Unique per test session so a match in the output cannot come from anywhere but this run's credentials.
SECRET_KEY = f"ovsam-test-secret-{uuid.uuid4().hex}"
REGION = "us-east-1"
IN_BUCKET = "ovsam-corpus"
OUT_BUCKET = "ovsam-annotations"
CLASSES = ["red square", "blue circle", "green triangle"]


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    host: str
    port: int

    def storage_options(self) -> dict:
        """fsspec/s3fs options as a user passes them to ``--storage-options``."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY,
                "client_kwargs": {"endpoint_url": self.url, "region_name": REGION}}

    def pyarrow_fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=f"{self.host}:{self.port}", scheme="http", access_key=ACCESS_KEY,
                                 secret_key=SECRET_KEY, region=REGION)


@dataclass
class JobRun:
    """One CLI invocation: its exit code and everything it printed or logged."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    log_text: str


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with dummy credentials in the environment for this module only."""
    import boto3

    with moto_s3(ACCESS_KEY, SECRET_KEY, REGION) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        endpoint = S3Endpoint(url, host, int(port))
        client = boto3.client("s3", endpoint_url=endpoint.url, region_name=REGION,
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        for bucket in (IN_BUCKET, OUT_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield endpoint


@pytest.fixture(scope="module")
def ray_session(s3):
    """A local Ray instance started after the S3 environment is set, so its workers see the same environment.

    Yields the session directory (where worker logs are written)."""
    import ray

    ray.shutdown()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield Path(ctx.address_info["session_dir"])
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """The test corpus uploaded to s3://<in>/corpus/ (tars and index files) and a class list on local disk."""
    import boto3

    root = tmp_path_factory.mktemp("s3corpus")
    expectations = write_corpus(root)
    client = boto3.client("s3", endpoint_url=s3.url, region_name=REGION,
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    uploaded = []
    for path in sorted(root.iterdir()):
        if path.suffix == ".tar" or path.name.endswith(".idx.json"):
            client.put_object(Bucket=IN_BUCKET, Key=f"corpus/{path.name}", Body=path.read_bytes())
            uploaded.append(path.name)
    assert sum(n.endswith(".tar") for n in uploaded) == len(expectations)
    vocab = root / "classes.txt"
    vocab.write_text("\n".join(CLASSES) + "\n")
    return expectations, vocab


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()} {record.args!r}")


def run_cli(s3: S3Endpoint, inputs: list[str], output: str, vocab: Path, *extra: str) -> JobRun:
    """``ovsam annotate`` through ``jobs.cli.main``, with stdout, stderr and every log record (DEBUG and up,
    boto and s3fs included) captured."""
    from jobs.cli import main as cli_main

    argv = ["annotate"]
    for spec in inputs:
        argv += ["--input", spec]
    argv += ["--output", output, "--storage-options", json.dumps(s3.storage_options()),
             "--workers", "1", "--cpus-per-worker", "1", "--batch-size", "4", "--vocabulary", str(vocab), *extra]
    out, err, handler = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return JobRun(argv, code, out.getvalue(), err.getvalue(), "\n".join(handler.lines))


@dataclass
class GlobRuns:
    """Three runs of the same command in one driver process: the first stopped after ``PARTIAL`` shards
    (``--limit``), the second finishing the rest, the third a rerun; manifests are snapshotted after each."""

    partial: JobRun
    rest: JobRun
    rerun: JobRun
    manifests: list[dict[str, bytes]]


PARTIAL = 3


@pytest.fixture(scope="module")
def glob_run(s3, ray_session, corpus) -> GlobRuns:
    """The job over ``s3://<in>/corpus/*.tar`` into ``s3://<out>/ann/``: a partial run, the rest, a rerun."""
    _, vocab = corpus
    inputs, output = [f"s3://{IN_BUCKET}/corpus/*.tar"], f"s3://{OUT_BUCKET}/ann/"
    fs = s3.pyarrow_fs()
    runs, manifests = [], []
    for extra in (["--limit", str(PARTIAL)], [], []):
        run = run_cli(s3, inputs, output, vocab, *extra)
        assert run.exit_code == 0, run.stderr + run.log_text[-5000:]
        runs.append(run)
        manifests.append(_read_objects(fs, f"{OUT_BUCKET}/ann/_manifest"))
    return GlobRuns(*runs, manifests=manifests)


def _read_objects(fs: pafs.FileSystem, prefix: str) -> dict[str, bytes]:
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


def _fields(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


def _check_output(fs: pafs.S3FileSystem, prefix: str, expectations: dict[str, ShardExpectation]) -> None:
    """Every expected shard committed; every input sample exactly once in images with the expected status."""
    root = f"{OUT_BUCKET}/{prefix}"
    manifests = _read_objects(fs, f"{root}/_manifest")
    assert sorted(manifests) == sorted(f"{root}/_manifest/{stem}.json" for stem in expectations)
    with fs.open_input_stream(f"{root}/run.json") as f:
        run = json.loads(f.read())
    assert run["vocabulary"]["names"] == CLASSES
    for stem, exp in expectations.items():
        manifest = json.loads(manifests[f"{root}/_manifest/{stem}.json"])
        assert manifest["config_hash"] == run["config_hash"] and manifest["shard"] == stem
        assert manifest["truncated"] == exp.truncated, stem
        images = pq.read_table(f"{root}/images/{stem}.parquet", filesystem=fs)
        instances = pq.read_table(f"{root}/instances/{stem}.parquet", filesystem=fs)
        for table, schema in ((images, IMAGES_SCHEMA), (instances, INSTANCES_SCHEMA)):
            assert _fields(table.schema) == _fields(schema), stem
            assert table.schema.metadata[b"ovsam.schema_version"] == SCHEMA_VERSION.encode()
        assert manifest["files"]["images"]["rows"] == images.num_rows
        assert manifest["files"]["instances"]["rows"] == instances.num_rows
        rows = images.to_pylist()
        keys = [r["image_key"] for r in rows]
        assert len(keys) == len(set(keys)) == exp.samples_read, stem
        assert set(keys) <= set(exp.samples), stem
        for row in rows:
            assert row["shard"] == stem
            assert row["status"] == exp.samples[row["image_key"]].required_status, (stem, row["image_key"],
                                                                                   row["error"])
        ok = {r["image_key"] for r in rows if r["status"] == "ok"}
        assert set(instances.column("image_key").to_pylist()) <= ok, stem


def test_glob_input_round_trips_through_s3(s3, corpus, glob_run):
    expectations, _ = corpus
    n = len(expectations)
    assert f"{n} shards: 0 committed, {PARTIAL} to process" in glob_run.partial.stdout
    assert len(glob_run.manifests[0]) == PARTIAL
    assert f"{n} shards: {PARTIAL} committed, {n - PARTIAL} to process" in glob_run.rest.stdout
    # the second run left the first run's commits alone
    assert {p: glob_run.manifests[1][p] for p in glob_run.manifests[0]} == glob_run.manifests[0]
    fs = s3.pyarrow_fs()
    _check_output(fs, "ann", expectations)
    # the same output as datasets over each directory: one row per input sample, no duplicates across shards
    images = pads.dataset(f"{OUT_BUCKET}/ann/images", filesystem=fs, format="parquet").to_table()
    instances = pads.dataset(f"{OUT_BUCKET}/ann/instances", filesystem=fs, format="parquet").to_table()
    assert _fields(images.schema) == _fields(IMAGES_SCHEMA)
    assert _fields(instances.schema) == _fields(INSTANCES_SCHEMA)
    pairs = list(zip(images.column("shard").to_pylist(), images.column("image_key").to_pylist()))
    assert len(pairs) == len(set(pairs)) == sum(e.samples_read for e in expectations.values())
    assert instances.num_rows > 0
    # nothing is left under the temporary prefix once the run has ended
    assert _read_objects(fs, f"{OUT_BUCKET}/ann/_tmp") == {}


def test_rerun_into_same_bucket_processes_nothing(s3, corpus, glob_run):
    n = len(corpus[0])
    assert f"{n} shards: {n} committed, 0 to process" in glob_run.rerun.stdout
    # the commit points are untouched: same bytes (attempt ids, commit times) as before the rerun
    assert glob_run.manifests[2] == glob_run.manifests[1]
    assert _read_objects(s3.pyarrow_fs(), f"{OUT_BUCKET}/ann/_manifest") == glob_run.manifests[1]


def test_secret_key_never_written_printed_or_logged(s3, ray_session, glob_run):
    runs = (glob_run.partial, glob_run.rest, glob_run.rerun)
    assert SECRET_KEY in " ".join(runs[0].argv)  # the job was given it...
    for run in runs:  # ...and printed or logged it nowhere
        assert run.log_text, "expected log records from the job (the capture is broken otherwise)"
        for text in (run.stdout, run.stderr, run.log_text):
            assert SECRET_KEY not in text
    written = _read_objects(s3.pyarrow_fs(), f"{OUT_BUCKET}/ann")
    assert f"{OUT_BUCKET}/ann/run.json" in written and any("/_manifest/" in p for p in written)
    for path, data in written.items():
        assert SECRET_KEY.encode() not in data, path
    worker_logs = [p for p in (ray_session / "logs").rglob("*") if p.is_file()]
    assert worker_logs
    for path in worker_logs:
        assert SECRET_KEY.encode() not in path.read_bytes(), path


def test_duckdb_reads_a_local_copy(s3, corpus, glob_run, tmp_path):
    duckdb = pytest.importorskip("duckdb", reason="pip install duckdb (in the test extra)")
    from pycocotools import mask as mask_utils

    local = tmp_path / "ann"
    pafs.copy_files(f"{OUT_BUCKET}/ann", str(local), source_filesystem=s3.pyarrow_fs(),
                    destination_filesystem=pafs.LocalFileSystem())
    inst, imgs = f"{local}/instances/*.parquet", f"{local}/images/*.parquet"
    con = duckdb.connect()
    types = dict(con.sql(f"select column_name, column_type from (describe select * from read_parquet('{inst}'))")
                 .fetchall())
    assert types["mask_rle"] == "STRUCT(size INTEGER[], counts VARCHAR)"
    assert types["box_xyxy"] == "FLOAT[]" and types["label"] == "INTEGER"
    # instance rows per image equal images.num_instances, for every image (zero for the ones that failed)
    mismatched = con.sql(f"""
        with n as (select shard, image_key, count(*) as n from read_parquet('{inst}') group by shard, image_key)
        select i.shard, i.image_key, i.num_instances, coalesce(n.n, 0) as counted
        from read_parquet('{imgs}') i left join n using (shard, image_key)
        where i.num_instances != coalesce(n.n, 0)""").fetchall()
    assert mismatched == []
    orphans = con.sql(f"""select count(*) from read_parquet('{inst}') x
                          anti join read_parquet('{imgs}') i using (shard, image_key)""").fetchall()[0][0]
    assert orphans == 0
    total = con.sql(f"select count(*) from read_parquet('{inst}')").fetchall()[0][0]
    assert total == con.sql(f"select sum(num_instances) from read_parquet('{imgs}')").fetchall()[0][0] > 0
    rows = con.sql(f"""
        select x.shard, x.image_key, x.instance_index, x.mask_rle.size, x.mask_rle.counts, x.area, x.label,
               x.label_name, i.height, i.width
        from read_parquet('{inst}') x join read_parquet('{imgs}') i using (shard, image_key)
        order by all""").fetchall()
    assert len(rows) == total
    by_arrow = {}
    for path in sorted((local / "instances").glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            by_arrow[(r["shard"], r["image_key"], r["instance_index"])] = r
    for shard, key, index, size, counts, area, label, label_name, height, width in rows:
        assert list(size) == [height, width]
        mask = mask_utils.decode({"size": list(size), "counts": counts.encode()})
        assert mask.shape == (height, width) and int(mask.sum()) == area
        assert 0 <= label < len(CLASSES) and label_name == CLASSES[label]
        arrow = by_arrow[(shard, key, index)]
        assert (arrow["label"], arrow["label_name"], arrow["mask_rle"]["counts"]) == (label, label_name, counts)


def test_export_coco_reads_the_bucket(s3, glob_run, tmp_path):
    """``ovsam export-coco`` on the S3 output, in the process that just ran the job: every committed instance."""
    from jobs.cli import main as cli_main

    out = tmp_path / "coco.json"
    assert cli_main(["export-coco", "--input", f"s3://{OUT_BUCKET}/ann/", "-o", str(out),
                     "--storage-options", json.dumps(s3.storage_options())]) == 0
    coco = json.loads(out.read_text())
    fs = s3.pyarrow_fs()
    images = pads.dataset(f"{OUT_BUCKET}/ann/images", filesystem=fs, format="parquet").to_table().to_pylist()
    assert len(coco["images"]) == sum(r["status"] == "ok" for r in images)
    assert len(coco["annotations"]) == sum(r["num_instances"] for r in images) > 0
    assert [c["name"] for c in coco["categories"]] == CLASSES


def test_brace_range_and_list_file_in_bucket(s3, ray_session, corpus):
    """A brace range and a list file that itself lives in the bucket (entries: a URL and a glob)."""
    import boto3

    expectations, vocab = corpus
    listed = ["bad-000000", "trunc-mid-000000", "trunc-edge-000000"]
    body = (f"# shards for the list-file test\ns3://{IN_BUCKET}/corpus/bad-000000.tar\n"
            f"s3://{IN_BUCKET}/corpus/trunc-*.tar\n")
    boto3.client("s3", endpoint_url=s3.url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).put_object(Bucket=IN_BUCKET, Key="lists/shards.txt",
                                                                 Body=body.encode())
    inputs = [f"s3://{IN_BUCKET}/corpus/good-{{000000..000001}}.tar", f"s3://{IN_BUCKET}/lists/shards.txt"]
    run = run_cli(s3, inputs, f"s3://{OUT_BUCKET}/listed/", vocab)
    assert run.exit_code == 0, run.stderr + run.log_text[-5000:]
    wanted = {stem: expectations[stem] for stem in ["good-000000", "good-000001", *listed]}
    assert f"{len(wanted)} shards: 0 committed, {len(wanted)} to process" in run.stdout
    _check_output(s3.pyarrow_fs(), "listed", wanted)
    assert SECRET_KEY not in run.stdout + run.stderr + run.log_text


def test_duckdb_reads_float16_lists(tmp_path):
    """pyarrow writes ``list<halffloat>`` as Parquet FLOAT16; DuckDB reads it as ``FLOAT[]`` with the same values
    (the reason float16 embeddings are readable without project code)."""
    duckdb = pytest.importorskip("duckdb", reason="pip install duckdb (in the test extra)")
    values = [np.array([1.5, -2.25, 65504.0], dtype=np.float16), None, np.array([0.1], dtype=np.float16)]
    path = tmp_path / "f16.parquet"
    pq.write_table(pa.table({"e": pa.array(values, type=pa.list_(pa.float16()))}), path)
    con = duckdb.connect()
    (column_type,) = con.sql(f"select column_type from (describe select e from read_parquet('{path}'))").fetchall()[0]
    assert column_type == "FLOAT[]"
    got = [r[0] for r in con.sql(f"select e from read_parquet('{path}')").fetchall()]
    assert got[1] is None
    for want, have in ((values[0], got[0]), (values[2], got[2])):
        assert have == [float(v) for v in want.astype(np.float32)]


def test_image_folder_and_url_list_in_bucket(s3, ray_session, corpus, tmp_path):
    """A prefix of image files (nested, with a sidecar and a file that is not an image) and a Parquet list of
    relative paths beside them, read through s3fs: one row per file, in virtual shards of 2."""
    import boto3

    from tests.pipeline.corpus import good_jpeg, good_png, sidecar

    _, vocab = corpus
    client = boto3.client("s3", endpoint_url=s3.url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
    files = {"photos/a/1.jpg": good_jpeg(40, 32), "photos/a/1.json": sidecar(boxes=[[2, 2, 30, 30]]),
             "photos/a/b/2.png": good_png(36, 30), "photos/3.jpg": good_jpeg(50, 40), "photos/readme.md": b"# hi"}
    for key, body in files.items():
        client.put_object(Bucket=IN_BUCKET, Key=key, Body=body)
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": ["a/1.jpg", "3.jpg"]}), buf)
    client.put_object(Bucket=IN_BUCKET, Key="photos/list.parquet", Body=buf.getvalue())
    from pipeline.inputs.sources import expand_shards

    refs = expand_shards(f"s3://{IN_BUCKET}/photos/", s3.storage_options(), images_per_shard=2)
    assert [r.keys for r in refs] == [("3.jpg", "a/1.jpg"), ("a/b/2.png", "list.parquet"), ("readme.md",)]
    run = run_cli(s3, [f"s3://{IN_BUCKET}/photos/a/", f"s3://{IN_BUCKET}/photos/list.parquet"],
                  f"s3://{OUT_BUCKET}/photos/", vocab, "--prompts", "whole-image", "--images-per-shard", "2")
    assert run.exit_code == 0, run.stderr + run.log_text[-5000:]
    fs = s3.pyarrow_fs()
    rows = []
    for path, data in _read_objects(fs, f"{OUT_BUCKET}/photos/images/").items():
        rows += pq.read_table(pa.BufferReader(data)).to_pylist()
    assert sorted((r["shard"], r["image_key"], r["status"]) for r in rows) == [
        ("a-img-000000", "1.jpg", "ok"), ("a-img-000000", "b/2.png", "ok"),
        ("list-img-000000", "3.jpg", "ok"), ("list-img-000000", "a/1.jpg", "ok")]
    assert SECRET_KEY not in run.stdout + run.stderr + run.log_text
