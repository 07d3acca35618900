"""The annotation job end to end on local Ray: every sample once with the right status; reruns do nothing."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.annotate import main as annotate_main
from jobs.annotate import AnnotateConfig, run_annotate

from pipeline.stages import ModelStageConfig

from .corpus import write_corpus


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expectations = write_corpus(root)
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    return root, expectations, vocab


def _config(root, vocab, out, top_k=5, **kw) -> AnnotateConfig:
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), top_k=top_k)
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
        shard, key = images[ann["image_id"]]["file_name"].split("/", 1)
        match = [r for (s, k, _), r in rows.items() if s == shard and k == key
                 and r["mask_rle"]["counts"] == ann["segmentation"]["counts"]]
        assert match
        rle = {"size": match[0]["mask_rle"]["size"], "counts": match[0]["mask_rle"]["counts"].encode()}
        assert (mask == mask_utils.decode(rle).astype(bool)).all()
