"""The annotation job end to end on local Ray: every sample once with the right status; reruns do nothing."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.annotate import main as annotate_main
from jobs.annotate import AnnotateConfig, run_annotate

from pipeline.annotate.stages import ModelStageConfig

from tests.pipeline.corpus import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expectations = write_corpus(root)
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    return root, expectations, vocab


def _config(root, vocab, out, top_k=5, precision="auto", compile=False, **kw) -> AnnotateConfig:
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), top_k=top_k, precision=precision,
                             compile=compile)
    return AnnotateConfig(inputs=(f"{root}/*.tar",), output=str(out), stage=stage, batch_size=4, workers=1,
                          cpus_per_worker=1, **kw)


def test_job_annotates_every_sample_once(ray_local, corpus, tmp_path):
    root, expectations, vocab = corpus
    out = tmp_path / "out"
    summary = run_annotate(_config(root, vocab, out))
    assert not summary.failed and len(summary.per_shard) == len(expectations)
    for stem, exp in expectations.items():
        images = pq.read_table(out / "images" / f"{stem}.parquet").to_pylist()
        keys = [r["image_key"] for r in images]
        assert len(keys) == len(set(keys)) == exp.samples_read, stem
        for row in images:
            case = exp.samples[row["image_key"]]
            want = case.status_prompts_required or case.status
            assert row["status"] == want, (stem, row["image_key"], row["error"])
        instances = pq.read_table(out / "instances" / f"{stem}.parquet").to_pylist()
        ok = {r["image_key"] for r in images if r["status"] == "ok"}
        assert {r["image_key"] for r in instances} <= ok
        assert all(r["num_instances"] > 0 for r in images if r["status"] == "ok")
        manifest = json.loads((out / "_manifest" / f"{stem}.json").read_text())
        assert manifest["config_hash"] == json.loads((out / "run.json").read_text())["config_hash"]
    # a rerun with the same arguments processes nothing
    again = run_annotate(_config(root, vocab, out))
    assert again.per_shard == [] and again.shards_skipped == len(expectations)


def test_changed_config_is_refused(ray_local, corpus, tmp_path):
    root, _, vocab = corpus
    out = tmp_path / "out"
    run_annotate(_config(root, vocab, out, limit=1))
    with pytest.raises(ValueError, match="top_k"):
        run_annotate(_config(root, vocab, out, top_k=2))
    assert annotate_main(["--input", f"{root}/*.tar", "--output", str(out), "--top-k", "2",
                          "--vocabulary", str(vocab), "--dry-run"]) == 1


def test_dry_run_writes_nothing(corpus, tmp_path, capsys):
    root, expectations, vocab = corpus
    out = tmp_path / "dry"
    assert annotate_main(["--input", f"{root}/*.tar", "--output", str(out), "--vocabulary", str(vocab),
                          "--dry-run"]) == 0
    out_text = capsys.readouterr().out
    assert f"{len(expectations)} to process" in out_text
    indexed = [e for e in expectations.values() if e.expected is not None]
    assert f"{sum(e.expected for e in indexed):,} samples in the {len(indexed)} shards with an index" in out_text
    assert not out.exists() or not any(out.iterdir())


def test_export_coco_loads_in_pycocotools(ray_local, corpus, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from jobs.cli import main as cli_main

    root, _, vocab = corpus
    out = tmp_path / "out"
    assert cli_main(["annotate", "--input", f"{root}/good-*.tar", "--output", str(out), "--vocabulary", str(vocab),
                     "--workers", "1", "--cpus-per-worker", "1"]) == 0
    coco_path = tmp_path / "coco.json"
    assert cli_main(["export-coco", "--input", str(out), "-o", str(coco_path)]) == 0
    coco = COCO(str(coco_path))
    assert len(coco.getImgIds()) > 0 and len(coco.getAnnIds()) > 0
    rows = {}
    for stem in ("good-000000", "good-000001"):
        for r in pq.read_table(out / "instances" / f"{stem}.parquet").to_pylist():
            rows[(stem, r["image_key"], r["instance_index"])] = r
    images = {img["id"]: img for img in coco.dataset["images"]}
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann).astype(bool)
        image = images[ann["image_id"]]
        shard, key = image["ovsam_shard"], image["ovsam_key"]
        assert image["file_name"].startswith(f"{shard}/{key}.")  # the tar member's name, extension included
        match = [r for (s, k, _), r in rows.items() if s == shard and k == key
                 and r["mask_rle"]["counts"] == ann["segmentation"]["counts"]]
        assert match
        rle = {"size": match[0]["mask_rle"]["size"], "counts": match[0]["mask_rle"]["counts"].encode()}
        assert (mask == mask_utils.decode(rle).astype(bool)).all()


def test_precision_is_resolved_recorded_and_hashed(ray_local, corpus, tmp_path, capsys):
    """--precision auto is resolved on the driver for the CPU workers; run.json records requested and resolved, the
    workers ran the resolved one, and a rerun with another precision into the same output is refused."""
    from ovsam.precision import resolve_precision

    root, _, vocab = corpus
    out = tmp_path / "out"
    summary = run_annotate(_config(root, vocab, out, limit=2))
    resolved = resolve_precision("auto", "cpu")
    record = json.loads((out / "run.json").read_text())
    assert record["precision"] == {"requested": "auto", "resolved": resolved, "device": "cpu", "compile": False}
    assert record["hashed"]["precision"] == resolved and record["hashed"]["compile"] is False
    assert record["config"]["stage"]["precision"] == "auto"
    assert summary.precisions() == [resolved] and all(s["precision"] == resolved for s in summary.per_shard)
    # model-busy %, per shard and for the job
    assert 0 < summary.model_busy_pct <= 100
    assert summary.model_busy_pct == pytest.approx(100 * summary.model_seconds / summary.actor_seconds)
    for s in summary.per_shard:
        assert 0 < s["model_busy_pct"] <= 100 and s["model_seconds"] > 0
    printed = capsys.readouterr().out
    assert f"model busy {summary.model_busy_pct:.0f}%" in printed and f"precision {resolved}" in printed
    # the same precision named explicitly is the same config: not refused, and the committed shards count as done
    assert run_annotate(_config(root, vocab, out, precision=resolved, dry_run=True)) is None
    assert "2 committed" in capsys.readouterr().out
    other = "fp32" if resolved != "fp32" else "bf16"
    with pytest.raises(ValueError, match=f"precision: '{resolved}' -> '{other}'"):
        run_annotate(_config(root, vocab, out, precision=other))
    with pytest.raises(ValueError, match="compile: False -> True"):
        run_annotate(_config(root, vocab, out, compile=True))
    assert annotate_main(["--input", f"{root}/*.tar", "--output", str(out), "--vocabulary", str(vocab),
                          "--precision", other, "--dry-run"]) == 1
    assert annotate_main(["--input", f"{root}/*.tar", "--output", str(out), "--vocabulary", str(vocab),
                          "--precision", resolved, "--dry-run"]) == 0


def test_precision_follows_the_workers_device(monkeypatch):
    """The device "auto" is resolved for: --num-gpus-per-worker when given, else the cluster's GPUs."""
    import ray

    from jobs.annotate import resolve_job_precision, workers_device

    cfg = AnnotateConfig(inputs=("x",), output="y")
    with_gpu = AnnotateConfig(inputs=("x",), output="y", num_gpus_per_worker=1.0)
    assert workers_device(with_gpu) == "cuda"
    assert workers_device(AnnotateConfig(inputs=("x",), output="y", num_gpus_per_worker=0.0)) == "cpu"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert workers_device(cfg) == "cuda"
    import torch

    if not torch.cuda.is_available():
        assert resolve_job_precision(cfg) == ("cuda", "fp32")  # no CUDA here to tell what the GPU computes
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert workers_device(cfg) == "cpu"
    fp16 = AnnotateConfig(inputs=("x",), output="y", stage=ModelStageConfig(precision="fp16"))
    assert resolve_job_precision(fp16) == ("cpu", "fp16")


def _one_shard(root, n: int) -> str:
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    path = root / "single-000000.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
            for name, data in ((f"{i:06d}.jpg", buf.getvalue()),
                               (f"{i:06d}.json", json.dumps({"boxes": [[8, 8, 60, 50], [40, 30, 120, 90]]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_progress_moves_during_a_single_shard(ray_local, corpus, tmp_path, capsys):
    _, _, vocab = corpus
    shard = _one_shard(tmp_path, 96)
    cfg = AnnotateConfig(inputs=(shard,), output=str(tmp_path / "out"),
                         stage=ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), precision="fp32"),
                         batch_size=2, workers=1, cpus_per_worker=1, progress_every_s=0.2)
    summary = run_annotate(cfg)
    assert not summary.failed and summary.images == 96
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[annotate] shards 0/1")]
    moving = [line for line in lines if "images 0 " not in line]
    assert len(moving) >= 2, lines  # images counted inside the shard, before it commits
    counts = [int(line.split("images ")[1].split(" ")[0].replace(",", "")) for line in moving]
    assert counts == sorted(counts) and 0 < counts[0] < 96


def test_quiet_prints_no_progress(ray_local, corpus, tmp_path, capsys):
    _, _, vocab = corpus
    shard = _one_shard(tmp_path, 4)
    cfg = AnnotateConfig(inputs=(shard,), output=str(tmp_path / "out"),
                         stage=ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab)), batch_size=2,
                         workers=1, cpus_per_worker=1, quiet=True, progress_every_s=0.1)
    run_annotate(cfg)
    out = capsys.readouterr().out
    assert "[annotate] shards" not in out and "[annotate] done" in out
