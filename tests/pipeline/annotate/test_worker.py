"""ShardWorker outside Ray: a shard that cannot be read whole is not committed; logical GPUs fall back to CPU."""

from __future__ import annotations

import os

import pytest

from pipeline.annotate.ledger import Ledger
from pipeline.inputs.sources import ShardRef
from pipeline.annotate.stages import ModelStageConfig
from pipeline.annotate.worker import ShardReadFailed, ShardWorker, WorkerConfig, resolve_device

from tests.pipeline.corpus import write_corpus


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\n")
    out = root / "out"
    cfg = WorkerConfig(output=str(out), stage=ModelStageConfig(vocabulary=str(vocab), device="cuda"),
                       config_hash="h", batch_size=2, decode_threads=1)
    return ShardWorker(cfg), root, out


def test_cuda_without_cuda_runs_on_cpu(worker):
    w, _, _ = worker
    assert resolve_device("cpu") == "cpu"
    assert str(next(w.annotator.model.parameters()).device) == "cpu"


def test_unreadable_shard_is_retried_not_committed(worker):
    w, root, out = worker
    missing = ShardRef(url=str(root / "gone-000000.tar"), name="gone-000000")
    with pytest.raises(ShardReadFailed, match="not read whole"):
        w.process(missing)
    assert not (out / "_manifest" / "gone-000000.json").exists()
    assert not (out / "images" / "gone-000000.parquet").exists()


def test_truncated_shard_is_committed_with_its_flag(worker):
    w, root, out = worker
    corpus = root / "corpus"
    expectations = write_corpus(corpus)
    stem = next(s for s, e in expectations.items() if e.truncated)
    summary = w.process(ShardRef(url=str(corpus / f"{stem}.tar"), name=stem))
    assert summary["truncated"] and summary["pid"] == os.getpid()
    assert stem in Ledger(__import__("fsspec").filesystem("file"), str(out)).committed_shards("h")


def test_warm_up_runs_at_start_and_leaves_nothing_behind(worker):
    w, root, out = worker
    assert w.warm_up_s is not None and w.warm_up_s > 0
    # nothing of the warm-up pass reaches the output
    import pyarrow.parquet as pq

    files = list(out.rglob("*")) if out.exists() else []
    assert not any("_warm_up" in p.name for p in files)
    for p in files:
        if p.suffix == ".parquet":
            assert "_warm_up" not in pq.read_table(p, columns=["image_key"]).column(0).to_pylist()
    results = w.annotator.warm_up(width=96, height=64)
    assert [r.image_row["status"] for r in results] == ["ok"]
    assert results[0].image_row["num_prompts"] == 1 and len(results[0].instance_rows) == 1
    assert results[0].instance_rows[0]["image_key"] == "_warm_up"


def test_failing_warm_up_is_logged_and_the_worker_still_starts(tmp_path, monkeypatch, caplog):
    from pipeline.annotate.stages import Annotator

    def boom(self, *args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(Annotator, "warm_up", boom)
    vocab = tmp_path / "classes.txt"
    vocab.write_text("red square\n")
    cfg = WorkerConfig(output=str(tmp_path / "out"), stage=ModelStageConfig(vocabulary=str(vocab)),
                       config_hash="h", batch_size=2, decode_threads=1)
    with caplog.at_level("ERROR", logger="pipeline.annotate.worker"):
        w = ShardWorker(cfg)
    assert w.warm_up_s is None
    assert "warm-up pass failed" in caplog.text and "no kernel for this device" in caplog.text
    skipped = ShardWorker(WorkerConfig(output=str(tmp_path / "out2"), stage=cfg.stage, config_hash="h",
                                       warm_up=False))
    assert skipped.warm_up_s is None
