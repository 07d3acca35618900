"""ShardWorker outside Ray: a shard that cannot be read whole is not committed; logical GPUs fall back to CPU."""

from __future__ import annotations

import os

import pytest

from pipeline.ledger import Ledger
from pipeline.sources import ShardRef
from pipeline.stages import ModelStageConfig
from pipeline.worker import ShardReadFailed, ShardWorker, WorkerConfig, resolve_device

from .corpus import write_corpus


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
