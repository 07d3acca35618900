"""Exactly once under kills: the annotation job killed (driver and workers, at random points, several times) and
rerun commits the same output as an uninterrupted run, and a rerun of a finished job processes nothing.

The reference is an uninterrupted run on a Ray instance this module starts. Every run, killed or not, gives each
model actor one CPU, so torch runs on one thread (Ray sets ``OMP_NUM_THREADS`` to the actor's ``num_cpus``), and
each shard is annotated whole by one actor in the same batches of 4: results are bit-identical on CPU. Rows are
therefore compared exactly (floats included, no tolerance), and so are the Parquet files' sha256: two attempts at
a shard must write the same bytes, which is what makes a commit that interleaves with a zombie attempt harmless.

Kills use SIGKILL. Driver kills run ``python -m jobs.annotate`` in its own session with its own local Ray
(``--ray-address local``, so a Ray address recorded by another cluster on this machine is never joined). Ray puts
each worker process in its own process group inside the driver's session, so killing the driver's group leaves the
workers alive for a moment (they commit whatever they are writing, then exit): the rounds kill either the whole
session or only the driver's group, and every round ends by killing whatever is left of the session.

What the kills cannot force, a worker of a killed driver committing a shard while the rerun cleans ``_tmp`` or
commits the same shard, is forced without Ray by a filesystem wrapper that runs the rerun's steps in the middle of
the zombie's commit.

Run time on the 2-core dev box, shared with other jobs (load ~8): about 155 s for the file, of which ~105 s the
driver kills (four job processes, each starting its own Ray), ~28 s the worker kills and ~22 s the reference; the
commit-race tests take about 1 s.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest

from jobs.annotate import AnnotateConfig, add_arguments, config_from_args, run_annotate
from pipeline.annotate.stages import ModelStageConfig

from tests.pipeline.corpus import CorpusCase, corrupt_jpeg, cut_mid_member, good_jpeg, sidecar, tar_bytes, write_index

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")

REPO = Path(__file__).resolve().parents[3]
NUM_SHARDS, PER_SHARD = 8, 16  # ~0.5-1 s of annotation per shard: the worker-kill test needs a job that outlasts its kills
SEED = 1234
TIMEOUT_S = 240.0


# ----------------------------------------------------------------------------------------------------------------
# Corpus, Ray, reference


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Any]:
    """8 shards x 16 samples: JPEGs of varying sizes with two sidecar boxes each; one corrupt JPEG (shard 2), one
    malformed sidecar (shard 6), shard 5 cut inside its last member (its index says 16 samples)."""
    root = tmp_path_factory.mktemp("eo-corpus")
    expected: dict[tuple[str, str], str] = {}
    for s in range(NUM_SHARDS):
        name = f"shard-{s:06d}"
        cases = []
        for i in range(PER_SHARD):
            w, h = 48 + 8 * ((s + i) % 5), 40 + 6 * ((3 * s + i) % 4)
            members = {"jpg": good_jpeg(w, h), "json": sidecar(boxes=[[2 + i, 2 + s, 20 + 2 * i, 24 + s],
                                                                      [1, 1, w - 2, h - 2]])}
            status = "ok"
            if (s, i) == (2, 3):
                members["jpg"], status = corrupt_jpeg(), "decode_error"
            if (s, i) == (6, 1):
                members["json"], status = b'{"boxes": [[1, 2', "bad_prompt"
            cases.append(CorpusCase(f"s{s}/{i:06d}", members, status))
            expected[(name, cases[-1].key)] = status
        data = tar_bytes(cases)
        if s == 5:
            data = cut_mid_member(data)  # cuts the last sample's json: that sample becomes a decode_error row
            write_index(root, name, PER_SHARD)
            expected[(name, cases[-1].key)] = "decode_error"
        (root / f"{name}.tar").write_bytes(data)
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    return {"pattern": f"{root}/shard-{{000000..{NUM_SHARDS - 1:06d}}}.tar", "vocab": str(vocab),
            "expected": expected, "shards": sorted({s for s, _ in expected})}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(corpus: dict[str, Any], out: Path, workers: int) -> AnnotateConfig:
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=corpus["vocab"])
    return AnnotateConfig(inputs=(corpus["pattern"],), output=str(out), stage=stage, batch_size=4, workers=workers,
                          cpus_per_worker=1)


def _argv(corpus: dict[str, Any], out: Path, workers: int) -> list[str]:
    return ["--input", corpus["pattern"], "--output", str(out), "--vocabulary", corpus["vocab"], "--batch-size", "4",
            "--workers", str(workers), "--cpus-per-worker", "1", "--ray-address", "local"]


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tmp_path_factory) -> dict[str, Any]:
    """An uninterrupted run (one actor, one CPU), checked against the corpus' expected statuses."""
    out = tmp_path_factory.mktemp("eo-ref") / "out"
    summary = run_annotate(_config(corpus, out, workers=1))
    assert not summary.failed and len(summary.per_shard) == NUM_SHARDS
    ref = committed_output(out)
    assert {(r["shard"], r["image_key"]): r["status"] for r in ref["images"]} == corpus["expected"]
    assert len(ref["instances"]) > 0 and ref["manifests"]["shard-000005"]["truncated"]
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking an output directory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sort_key(row: dict[str, Any]) -> tuple:
    return row["shard"], row["image_key"], row.get("instance_index", -1)


def committed_output(out: Path) -> dict[str, Any]:
    """The committed shards' rows, checked on the way: each manifest's config hash is run.json's, its files exist
    with the recorded size and sha256, and no (shard, image_key) appears twice."""
    chash = json.loads((out / "run.json").read_text())["config_hash"]
    manifests, images, instances = {}, [], []
    for path in sorted((out / "_manifest").glob("*.json")):
        m = json.loads(path.read_text())
        assert m["config_hash"] == chash, f"{path.name}: config hash {m['config_hash']} != run.json's {chash}"
        for kind, f in m["files"].items():
            data = (out / f["path"]).read_bytes()
            assert (len(data), _sha256(data)) == (f["bytes"], f["sha256"]), f"{f['path']} differs from {path.name}"
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
            assert len(rows) == f["rows"]
            (images if kind == "images" else instances).extend(rows)
        manifests[m["shard"]] = m
    keys = [(r["shard"], r["image_key"]) for r in images]
    assert len(keys) == len(set(keys)), "an image appears twice in the committed output"
    return {"config_hash": chash, "manifests": manifests, "images": sorted(images, key=_sort_key),
            "instances": sorted(instances, key=_sort_key)}


def check_visible(out: Path) -> int:
    """What a reader may see while a job runs or dies: every manifest parses and its files exist with the recorded
    size and sha256, every Parquet file under instances/ and images/ is complete. Returns the manifest count."""
    if not (out / "_manifest").exists():
        return 0
    chash = json.loads((out / "run.json").read_text())["config_hash"]
    manifests = list((out / "_manifest").glob("*.json"))
    for path in manifests:
        m = json.loads(path.read_text())
        assert m["config_hash"] == chash
        for f in m["files"].values():
            data = (out / f["path"]).read_bytes()
            assert (len(data), _sha256(data)) == (f["bytes"], f["sha256"]), f"{f['path']} differs from {path.name}"
    for kind in ("instances", "images"):
        for path in (out / kind).glob("*"):
            assert path.suffix == ".parquet", f"unexpected file {path}"
            pq.read_table(path)
    return len(manifests)


def assert_equals_reference(out: Path, ref: dict[str, Any]) -> dict[str, Any]:
    got = committed_output(out)
    assert sorted(got["manifests"]) == sorted(ref["manifests"])
    assert got["config_hash"] == ref["config_hash"]
    assert got["images"] == ref["images"]
    assert len(got["instances"]) == len(ref["instances"])
    assert got["instances"] == ref["instances"]
    for shard, m in got["manifests"].items():
        assert m["files"] == ref["manifests"][shard]["files"], f"{shard}: files are not byte-identical"
        assert m["statuses"] == ref["manifests"][shard]["statuses"]
    tmp = out / "_tmp"  # a finished run removes its empty _tmp/
    assert not tmp.exists() or not list(tmp.iterdir()), f"files left in _tmp: {sorted(os.listdir(tmp))}"
    return got


# ----------------------------------------------------------------------------------------------------------------
# Processes


def proc_table() -> dict[int, dict[str, Any]]:
    """Live processes: pid -> ppid, pgid, sid, title (zombies awaiting their reaper are left out)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            title = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in "ZX":
            continue
        out[int(name)] = {"ppid": int(fields[1]), "pgid": int(fields[2]), "sid": int(fields[3]), "title": title}
    return out


class JobProcess:
    """``python -m jobs.annotate`` in a session of its own; ``kill`` and ``reap`` act on that session only, and
    leaving the ``with`` block SIGKILLs whatever is left of it."""

    def __init__(self, argv: list[str], log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *argv], cwd=REPO, env=env,
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid

    def __enter__(self) -> JobProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
        self.reap(0.0)

    def members(self) -> dict[int, dict[str, Any]]:
        return {pid: p for pid, p in proc_table().items() if p["sid"] == self.sid}

    def kill(self, driver_group_only: bool = False) -> None:
        """SIGKILL the driver's process group (driver, GCS, raylet, agents), or every group of the session."""
        groups = {self.sid} if driver_group_only else {p["pgid"] for p in self.members().values()} | {self.sid}
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self, grace_s: float, during: Callable[[], Any] = lambda: None) -> int:
        """Wait ``grace_s`` for the session to empty (calling ``during`` meanwhile), then SIGKILL what is left, by
        process group, until nothing is. Returns how many processes were left after the grace period."""
        deadline = time.monotonic() + grace_s
        while self.members() and time.monotonic() < deadline:
            during()
            time.sleep(0.1)
        left = len(self.members())
        deadline = time.monotonic() + 30
        while self.members():
            assert time.monotonic() < deadline, f"processes of session {self.sid} survive SIGKILL: {self.members()}"
            self.kill()
            time.sleep(0.1)
        self.proc.wait(timeout=10)
        return left

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Observer:
    """``check_visible(out)`` at most every ``every_s`` seconds (reading every file costs CPU the job needs)."""

    def __init__(self, out: Path, every_s: float = 0.3) -> None:
        self.out, self.every_s, self.last, self.count = out, every_s, 0.0, 0

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            check_visible(self.out)
            self.last, self.count = time.monotonic(), self.count + 1


def manifest_count(out: Path) -> int:
    return len(list((out / "_manifest").glob("*.json"))) if (out / "_manifest").exists() else 0


def shard_worker_pids(busy_only: bool) -> list[int]:
    """ShardWorker actor processes of this test's Ray instance (descendants of this process), by process title."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p["ppid"], []).append(pid)
    found, stack = [], [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            title = table[pid]["title"]
            if title.startswith("ray::ShardWorker.process" if busy_only else "ray::ShardWorker"):
                found.append(pid)
    return sorted(found)


def _rerun_processes_nothing(corpus: dict[str, Any], out: Path, workers: int, capsys) -> None:
    """The same job again, in this process (its Ray is up): zero images, nothing rewritten."""
    before = {p.name: p.read_bytes() for p in (out / "_manifest").iterdir()}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    capsys.readouterr()
    summary = run_annotate(config_from_args(parser.parse_args(_argv(corpus, out, workers))))
    assert f"{NUM_SHARDS} committed, 0 to process" in capsys.readouterr().out
    assert summary.images == 0 and summary.per_shard == [] and summary.shards_skipped == NUM_SHARDS
    assert {p.name: p.read_bytes() for p in (out / "_manifest").iterdir()} == before


# ----------------------------------------------------------------------------------------------------------------
# Commits racing with a zombie attempt (no Ray: the interleavings are forced through a filesystem wrapper)

SHARD, CHASH = "shard-000000", "c" * 64


class InterleavingFS:
    """The local filesystem, except that moving a file into ``before_move_into`` (``instances``, ``images`` or
    ``_manifest``) first runs ``hook`` once, and ``ls`` runs ``after_ls`` once before returning its listing: what
    another process does between two steps of a commit or of a cleanup."""

    def __init__(self, fs: Any, before_move_into: str | None = None, hook: Callable[[], Any] | None = None,
                 after_ls: Callable[[], Any] | None = None) -> None:
        self._fs, self._into, self._hook, self._after_ls = fs, before_move_into, hook, after_ls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def mv(self, src: str, dst: str, **kwargs: Any) -> Any:
        if self._hook is not None and Path(dst).parent.name == self._into:
            hook, self._hook = self._hook, None
            hook()
        return self._fs.mv(src, dst, **kwargs)

    def ls(self, path: str, *args: Any, **kwargs: Any) -> Any:
        listing = self._fs.ls(path, *args, **kwargs)
        if self._after_ls is not None:
            after, self._after_ls = self._after_ls, None
            after()
        return listing


def _commit(fs: Any, root: str, attempt_id: str, shard: str = SHARD) -> dict[str, Any]:
    """Commit ``shard`` with the same rows every time (as every attempt at a shard computes them)."""
    from pipeline.annotate.sinks import commit_shard
    from schemas.annotation import IMAGES_SCHEMA, INSTANCES_SCHEMA

    images = [{**dict.fromkeys(IMAGES_SCHEMA.names), "image_key": f"k{i}", "shard": shard, "status": "ok",
               "width": 8, "height": 6, "num_instances": 1} for i in range(3)]
    instances = [{**dict.fromkeys(INSTANCES_SCHEMA.names), "image_key": f"k{i}", "shard": shard,
                  "instance_index": 0, "label": i, "label_score": 1 / (i + 3)} for i in range(3)]
    return commit_shard(fs, root, shard, instances, images, input_url=f"/data/{shard}.tar", config_hash=CHASH,
                        read_report=None, attempt_id=attempt_id)


@pytest.fixture
def local_out(tmp_path) -> tuple[Any, str]:
    import fsspec

    from pipeline.annotate.ledger import write_run_json

    fs, root = fsspec.filesystem("file"), str(tmp_path / "out")
    write_run_json(fs, root, {"config_hash": CHASH})
    return fs, root


@pytest.mark.parametrize("paused_before", ["instances", "images", "_manifest"])
@pytest.mark.parametrize("rerun_does", ["commit", "cleanup_then_commit"])
def test_zombie_commit_interleaved_with_a_rerun_leaves_a_consistent_shard(local_out, paused_before, rerun_does):
    """A worker of a killed driver is paused in the middle of committing a shard; meanwhile the rerun cleans _tmp
    and/or commits the same shard; then the zombie goes on (or fails at its next move because its temporary file
    is gone). Whatever wins, the shard's manifest matches the files on disk and the rows are the shard's, once."""
    from pipeline.annotate.ledger import Ledger

    fs, root = local_out
    ledger = Ledger(fs, root)

    def rerun() -> None:
        if rerun_does == "cleanup_then_commit":
            ledger.cleanup_tmp()
        _commit(fs, root, "b" * 12)

    try:
        _commit(InterleavingFS(fs, paused_before, rerun), root, "a" * 12)
    except FileNotFoundError:
        pass  # the zombie's temporary file was removed under it: it commits nothing more
    got = committed_output(Path(root))
    assert ledger.committed_shards(CHASH) == {SHARD}
    assert [(r["image_key"], r["label"]) for r in got["instances"]] == [("k0", 0), ("k1", 1), ("k2", 2)]
    assert [r["image_key"] for r in got["images"]] == ["k0", "k1", "k2"]
    assert not os.listdir(f"{root}/_tmp")


def test_commit_removes_what_killed_attempts_at_the_same_shard_left_in_tmp(local_out):
    """An attempt killed between writing a temporary file and moving it leaves the file in _tmp; the shard's next
    commit removes it (so a run that finishes leaves _tmp empty) and leaves other shards' files alone."""
    fs, root = local_out
    fs.makedirs(f"{root}/_tmp", exist_ok=True)
    stale = [f"{SHARD}.{'0' * 12}.instances.parquet", f"{SHARD}.{'1' * 12}.manifest.json"]
    others = [f"{SHARD}.x.{'2' * 12}.images.parquet", f"shard-000001.{'3' * 12}.instances.parquet", "run.json"]
    for name in stale + others:
        Path(f"{root}/_tmp/{name}").write_bytes(b"partial")
    _commit(fs, root, "a" * 12)
    assert sorted(os.listdir(f"{root}/_tmp")) == sorted(others)
    committed_output(Path(root))


def test_cleanup_of_tmp_tolerates_a_file_a_zombie_moves_meanwhile(local_out):
    """The rerun lists _tmp while a zombie worker of the killed driver moves one of the listed files into place:
    the cleanup must not fail on the vanished file (the rerun would crash at start)."""
    from pipeline.annotate.ledger import Ledger

    fs, root = local_out
    fs.makedirs(f"{root}/_tmp", exist_ok=True)
    for kind in ("instances", "images"):
        fs.makedirs(f"{root}/{kind}", exist_ok=True)
    tmp = f"{root}/_tmp/{SHARD}.{'a' * 12}.instances.parquet"
    Path(tmp).write_bytes(b"zombie's bytes")
    Ledger(InterleavingFS(fs, after_ls=lambda: fs.mv(tmp, f"{root}/instances/{SHARD}.parquet")), root).cleanup_tmp()
    assert not os.listdir(f"{root}/_tmp")


# ----------------------------------------------------------------------------------------------------------------
# Tests under kills


def test_driver_killed_and_rerun_commits_reference_output(ray_local, corpus, reference, tmp_path, capsys):
    """Three SIGKILLs of the driver at seeded random points, then a rerun to completion: the output equals the
    reference. Round 1 kills the whole session after a random delay (during start-up); round 2 the whole session as
    soon as k new manifests exist; round 3 only the driver's process group, a random moment after k new manifests,
    leaving its workers to finish what they were committing (watched until they are gone)."""
    rng = random.Random(SEED)
    out = tmp_path / "out"
    observe = Observer(out)
    rounds = [("delay", rng.uniform(2.0, 8.0), False),
              ("manifests", rng.randint(1, 2), False),
              ("manifests", rng.randint(1, 2), True)]
    kills = []
    for i, (trigger, value, driver_only) in enumerate(rounds):
        before = check_visible(out)
        with JobProcess(_argv(corpus, out, workers=2), tmp_path / f"round{i}.log") as job:
            t0 = time.monotonic()
            while not (trigger == "delay" and time.monotonic() - t0 >= value
                       or trigger == "manifests" and manifest_count(out) >= before + value):
                assert job.proc.poll() is None, f"round {i} ended before its kill point:\n{job.output()}"
                assert time.monotonic() - t0 < TIMEOUT_S, f"round {i}: no kill point in {TIMEOUT_S}s:\n{job.output()}"
                observe()
                time.sleep(0.05)
            if driver_only:
                time.sleep(rng.uniform(0.0, 0.5))
            at_kill = manifest_count(out)
            job.kill(driver_group_only=driver_only)
            orphans = len([p for p in job.members().values() if p["pgid"] != job.sid]) if driver_only else 0
            job.reap(grace_s=10.0 if driver_only else 0.0, during=observe)
        assert job.proc.returncode == -signal.SIGKILL, f"round {i}: the driver was not killed:\n{job.output()}"
        kills.append({"trigger": trigger, "value": round(value, 2), "driver_only": driver_only,
                      "seconds": round(time.monotonic() - t0, 1), "orphans": orphans,
                      "manifests before/at kill/after": (before, at_kill, check_visible(out))})
    committed = check_visible(out)
    assert len(kills) == 3 and committed < NUM_SHARDS

    with JobProcess(_argv(corpus, out, workers=2), tmp_path / "final.log") as job:
        t0 = time.monotonic()
        while job.proc.poll() is None:
            assert time.monotonic() - t0 < TIMEOUT_S, f"the final run did not finish:\n{job.output()}"
            observe()
            time.sleep(0.1)
        left = job.reap(grace_s=10.0)
    text = job.output()
    with capsys.disabled():
        print(f"\ndriver kills: {kills}\nfinal run {time.monotonic() - t0:.1f}s, {left} processes left after it; "
              f"{observe.count} observations of the output while jobs ran or died")
    assert job.proc.returncode == 0, text
    assert f"{committed} committed, {NUM_SHARDS - committed} to process" in text, text
    assert_equals_reference(out, reference)
    _rerun_processes_nothing(corpus, out, workers=2, capsys=capsys)


def test_workers_killed_while_running_commit_reference_output(ray_local, corpus, reference, tmp_path, capsys):
    """Two or three SIGKILLs of ShardWorker actor processes while they annotate or commit a shard (a seeded random
    delay after one is busy): the job finishes without failures and its output equals the reference. (At most
    three, so that even if every kill hits the same shard it stays within the driver's four attempts per shard; at
    least two, as the restarted workers can finish the last shards before a third one is seen busy.)"""
    rng = random.Random(SEED + 1)
    out = tmp_path / "out"
    observe = Observer(out)
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["summary"] = run_annotate(_config(corpus, out, workers=2))
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    t0 = time.monotonic()
    thread.start()
    kills: list[tuple[float, int]] = []
    while thread.is_alive() and len(kills) < 3:
        assert time.monotonic() - t0 < TIMEOUT_S, "no busy ShardWorker to kill"
        observe()
        if shard_worker_pids(busy_only=True):
            time.sleep(rng.uniform(0.0, 0.8))
            busy = shard_worker_pids(busy_only=True)
            if busy:
                pid = rng.choice(busy)
                os.kill(pid, signal.SIGKILL)
                kills.append((round(time.monotonic() - t0, 1), pid))
        time.sleep(0.05)
    while thread.is_alive() and time.monotonic() - t0 < TIMEOUT_S:
        observe()
        thread.join(0.1)
    assert not thread.is_alive(), "the job did not finish after its workers were killed"
    if "error" in result:
        raise result["error"]
    summary = result["summary"]
    with capsys.disabled():
        print(f"\nworker kills (s, pid): {kills}; shards committed by pids "
              f"{sorted({s['pid'] for s in summary.per_shard})}; {time.monotonic() - t0:.1f}s; "
              f"{observe.count} observations of the output")
    assert len(kills) >= 2, f"only {len(kills)} kills before the job finished"
    assert not summary.failed
    assert sorted(s["shard"] for s in summary.per_shard) == corpus["shards"]
    assert_equals_reference(out, reference)
    _rerun_processes_nothing(corpus, out, workers=2, capsys=capsys)
