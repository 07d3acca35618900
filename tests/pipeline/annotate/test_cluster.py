"""The annotation job on a multi-node ``ray.cluster_utils.Cluster``: GPU actors spread over the worker nodes, and
removing a node mid-run still commits every sample exactly once, equal to an uninterrupted run.

Cluster: a head node (1 CPU, no GPU) and three worker nodes with one logical GPU and one CPU each. torch has no
CUDA here, so the GPU actors run the model on the CPU (``pipeline.annotate.worker.resolve_device``). The file takes about
a minute on 2 cores (cluster start ~10 s, two job runs ~15 s each).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.annotate import AnnotateConfig, run_annotate
from pipeline.annotate.run import ClusterPlan, plan_cluster, plan_workers, run_shards
from pipeline.inputs.sources import expand_shards
from pipeline.annotate.stages import ModelStageConfig
from pipeline.annotate.worker import WorkerConfig

from tests.pipeline.corpus import CorpusCase, good_jpeg, good_png, sidecar, tar_bytes

NUM_WORKER_NODES = 3
NUM_SHARDS = 12
SAMPLES_PER_SHARD = 4


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(NUM_WORKER_NODES)]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """``NUM_SHARDS`` shards of good samples whose boxes differ per shard, so rows of different shards differ."""
    root = tmp_path_factory.mktemp("cluster-corpus")
    for s in range(NUM_SHARDS):
        cases = []
        for i in range(SAMPLES_PER_SHARD):
            box = sidecar(boxes=[[2 + s, 2 + i, 30 + s, 26 + i], [20, 10, 60 - s, 44 - i]])
            image = {"jpg": good_jpeg(64 + 4 * s, 48)} if i % 2 == 0 else {"png": good_png(48, 40 + 4 * s)}
            cases.append(CorpusCase(f"sample-{i:04d}", {**image, "json": box}, "ok"))
        (root / f"shard-{s:06d}.tar").write_bytes(tar_bytes(cases))
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    return root, vocab


def _config(corpus, out: Path, address: str) -> AnnotateConfig:
    root, vocab = corpus
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), top_k=3)
    # Default worker planning: no workers / GPUs / CPUs given.
    return AnnotateConfig(inputs=(f"{root}/*.tar",), output=str(out), stage=stage, batch_size=2,
                          ray_address=address)


def _rows(out: Path, kind: str) -> list[tuple]:
    """All committed rows of one table kind as sorted tuples (floats exactly as stored)."""
    rows = []
    for path in sorted((out / kind).glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            rows.append(tuple(json.dumps(r[k], sort_keys=True) for k in sorted(r)))
    return sorted(rows)


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory):
    """An uninterrupted run on the full cluster."""
    c, _ = cluster
    out = tmp_path_factory.mktemp("cluster-ref") / "out"
    summary = run_annotate(_config(corpus, out, c.address))
    return out, summary


def test_plan_cluster_takes_one_gpu_per_worker(cluster):
    plan = plan_cluster(None, None, None)
    assert plan == ClusterPlan(workers=NUM_WORKER_NODES, num_gpus=1.0, num_cpus=1.0)
    with pytest.raises(ValueError, match="--num-gpus-per-worker 2 but no node has that many GPUs"):
        plan_cluster(None, 2, None)
    with pytest.raises(ValueError, match="cluster total: 3"):
        plan_cluster(None, 4, None)


def test_plan_workers_sizes_from_each_node():
    head = {"CPU": 16.0}
    # CPU-only cluster: CPU actors, one per CPU (or per --cpus-per-worker), counted node by node.
    assert plan_workers([{"CPU": 2.0}], None, None, None) == ClusterPlan(workers=2, num_gpus=0.0, num_cpus=1.0)
    assert plan_workers([head, {"CPU": 3.0}], None, None, 2) == ClusterPlan(workers=9, num_gpus=0.0, num_cpus=2.0)
    # GPUs: one worker per GPU; the CPU share comes from the GPU nodes, not from the head's CPUs, else the actors
    # would ask for more CPUs than their node has and never start.
    gpu_nodes = [head, {"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0}]
    assert plan_workers(gpu_nodes, None, None, None) == ClusterPlan(workers=4, num_gpus=1.0, num_cpus=1.0)
    assert plan_workers([head, {"CPU": 32.0, "GPU": 2.0}], None, None, None).num_cpus == 4.0
    assert plan_workers(gpu_nodes, None, 0.5, None) == ClusterPlan(workers=8, num_gpus=0.5, num_cpus=0.5)
    assert plan_workers(gpu_nodes, 2, None, None).workers == 2
    with pytest.raises(ValueError, match="largest node: 2"):
        plan_workers(gpu_nodes, None, 3, None)
    with pytest.raises(ValueError, match="lower --cpus-per-worker"):
        plan_workers(gpu_nodes, None, 1, 4)
    with pytest.raises(ValueError, match="lower --cpus-per-worker"):
        plan_workers([{"CPU": 2.0}], None, None, 3)


def test_job_spreads_over_gpu_nodes(cluster, reference):
    c, workers = cluster
    out, summary = reference
    assert not summary.failed and len(summary.per_shard) == NUM_SHARDS
    # the model ran on every sample (the GPU actors fell back to the CPU)
    assert summary.statuses() == {"ok": NUM_SHARDS * SAMPLES_PER_SHARD}
    assert summary.instances == 2 * NUM_SHARDS * SAMPLES_PER_SHARD
    nodes = {s["node_id"] for s in summary.per_shard}
    worker_ids = {w.node_id for w in workers}
    assert c.head_node.node_id not in nodes
    assert nodes <= worker_ids
    assert len(nodes) >= 2, f"all shards ran on one node: {nodes}"


def test_unplaceable_workers_fail_shards_instead_of_hanging(cluster, corpus, tmp_path):
    root, vocab = corpus
    shards = expand_shards([f"{root}/shard-00000[01].tar"], {})
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), device="cuda")
    cfg = WorkerConfig(output=str(tmp_path / "out"), stage=stage, config_hash="x")
    # every GPU node has 1 CPU, so an actor asking for a GPU and 2 CPUs can never be placed
    t0 = time.perf_counter()
    summary = run_shards(shards, cfg, ClusterPlan(workers=1, num_gpus=1.0, num_cpus=2.0), start_timeout_s=3.0)
    assert time.perf_counter() - t0 < 30
    assert set(summary.failed) == {s.name for s in shards} and summary.per_shard == []
    assert all("no worker became ready" in reason and "2 CPUs" in reason for reason in summary.failed.values())
    assert not (tmp_path / "out" / "_manifest").exists()


def test_workers_that_cannot_start_fail_shards_with_the_reason(cluster, corpus, tmp_path):
    root, _ = corpus
    shards = expand_shards([f"{root}/shard-000000.tar"], {})
    stage = ModelStageConfig(model="no-such-model", device="cuda")
    cfg = WorkerConfig(output=str(tmp_path / "out"), stage=stage, config_hash="x")
    summary = run_shards(shards, cfg, ClusterPlan(workers=2, num_gpus=1.0, num_cpus=1.0), start_timeout_s=60.0)
    assert list(summary.failed) == [shards[0].name] and summary.per_shard == []
    reason = summary.failed[shards[0].name]
    assert "no worker left" in reason and "no-such-model" in reason


def _alive_worker_nodes() -> set[str]:
    """Node ids hosting a live ShardWorker actor (GCS actor table; the state API would need the dashboard)."""
    import ray._private.state

    return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "ShardWorker" and a["State"] == "ALIVE"}


def test_node_removed_mid_run_commits_exactly_once(cluster, corpus, reference, tmp_path, caplog):
    c, workers = cluster
    ref_out, _ = reference
    out = tmp_path / "out"
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = run_annotate(_config(corpus, out, c.address))
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    removed = None
    manifests_at_removal = 0
    try:
        # Remove (from the main thread, as cluster_utils requires) a worker node whose actor is working, once the
        # first shards are committed.
        deadline = time.monotonic() + 120
        while removed is None and thread.is_alive() and time.monotonic() < deadline:
            manifests_at_removal = len(list((out / "_manifest").glob("*.json"))) if out.exists() else 0
            busy = _alive_worker_nodes() if manifests_at_removal else set()
            victims = [w for w in workers if w.node_id in busy]
            if victims:
                removed = victims[0]
                c.remove_node(removed)
            else:
                time.sleep(0.02)
        assert removed is not None, f"no node was removed (job alive: {thread.is_alive()}, {result})"
        assert 0 < manifests_at_removal < NUM_SHARDS
        thread.join(timeout=120)
        assert not thread.is_alive(), "the job did not finish after a node was removed"
    finally:
        if removed is not None:  # give the next tests a full cluster again
            workers[workers.index(removed)] = c.add_node(num_cpus=1, num_gpus=1)
            c.wait_for_nodes()
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.failed == {}
    # the removed node had work: a shard was lost with its worker and redone elsewhere
    assert any("lost with its worker" in r.getMessage() for r in caplog.records)
    assert summary.shards_skipped + len(summary.per_shard) == NUM_SHARDS
    # exactly once and equal to the uninterrupted run
    keys = [(r["shard"], r["image_key"]) for p in (out / "images").glob("*.parquet")
            for r in pq.read_table(p).to_pylist()]
    assert len(keys) == len(set(keys)) == NUM_SHARDS * SAMPLES_PER_SHARD
    assert _rows(out, "images") == _rows(ref_out, "images")
    assert _rows(out, "instances") == _rows(ref_out, "instances")
    run = json.loads((out / "run.json").read_text())
    assert run["config_hash"] == json.loads((ref_out / "run.json").read_text())["config_hash"]
    manifests = [json.loads(p.read_text()) for p in (out / "_manifest").glob("*.json")]
    assert len(manifests) == NUM_SHARDS
    assert all(m["config_hash"] == run["config_hash"] for m in manifests)
    assert sorted(m["shard"] for m in manifests) == sorted(f"shard-{s:06d}" for s in range(NUM_SHARDS))
