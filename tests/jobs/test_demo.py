"""The demo end to end: (training ovsam-tiny on the synthetic world ->) shards -> annotation job on local Ray ->
Parquet, COCO JSON and overlays; a rerun skips what is done. The demo says first what it will do and about how long
that takes here, shows the training's progress lines and ends with where the outputs are."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from pycocotools.coco import COCO

from jobs.cli import main


def test_demo_annotates_generated_shards(tmp_path, capsys):
    args = ["demo", "--output", str(tmp_path), "--shards", "2", "--samples-per-shard", "2", "--overlays", "3",
            "--workers", "1", "--no-train"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("ovsam demo: annotates 4 scenes (about 1 min) with ovsam-tiny, on ")
    assert "2 shards: 0 committed, 2 to process" in out and "statuses:" in out
    ann = tmp_path / "annotations"
    images = pq.read_table(ann / "images").to_pylist()
    status = {r["image_key"]: r["status"] for r in images}
    assert len(status) == len(images) == 6
    assert status.pop("000001/truncated-jpeg") == "decode_error"
    assert status.pop("000001/broken-sidecar") == "bad_prompt"
    assert set(status.values()) == {"ok"}
    instances = pq.read_table(ann / "instances").to_pylist()
    for shard in ("shard-000000", "shard-000001"):
        assert json.loads((ann / "_manifest" / f"{shard}.json").read_text())["shard"] == shard
    classes = (tmp_path / "classes.txt").read_text().split("\n")
    assert instances and all(r["label_name"] == classes[r["label"]] for r in instances)
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == len(instances)
    pngs = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)
    # the same demo again: every shard is committed already
    assert main(args) == 0
    assert "2 shards: 2 committed, 0 to process" in capsys.readouterr().out


def test_demo_trains_its_model_and_annotates_with_it(tmp_path, capsys):
    args = ["demo", "--output", str(tmp_path), "--shards", "1", "--samples-per-shard", "2", "--overlays", "1",
            "--workers", "1", "--train-steps", "3", "--trunk-warmup", "2", "--train-workers", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("ovsam demo: trains ovsam-tiny (5 steps on 2 Ray Train workers: about 1 min on this "
                          "machine, ")
    assert "training ovsam-tiny for 2 trunk warm-up steps and 3 steps on 2 Ray Train workers" in out
    # the training's progress lines (every 30 s by default, and at the first and the last step) and evaluations
    assert "[train] step 1/5 (20%)  loss " in out and "[train] step 5/5 (100%)  loss " in out
    assert "[train] after training (step 5): synthetic/box mIoU " in out
    assert "box prompts: mask IoU" in out and "top-1 label" in out
    model = tmp_path / "model" / "ovsam-tiny-synthetic.safetensors"
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["step"] == 5 and summary["world_size"] == 2 and "eval/synthetic/box/miou" in summary
    assert sorted(p.name for p in (tmp_path / "model" / "data" / "synthetic").iterdir()) == ["heldout", "train"]
    run = json.dumps(json.loads((tmp_path / "annotations" / "run.json").read_text()))
    # the annotation job ran on the trained model, with the vocabulary it was trained against
    vocabulary_file = tmp_path / "model" / "ovsam-tiny-synthetic.synthetic.vocab.safetensors"
    assert str(model) in run and str(vocabulary_file) in run
    from ovsam import Vocabulary
    from pipeline.training.synthetic import CLASS_NAMES

    vocabulary = Vocabulary.load(vocabulary_file)
    assert vocabulary.names == list(CLASS_NAMES) and vocabulary.templates == ("{}",)
    assert vocabulary.split is not None and set(vocabulary.split.tolist()) == {1}  # all trained (base) classes
    assert "randomly initialised" not in out
    assert f"  model        {model} (vocabulary {vocabulary_file.name}, " in out  # where the outputs are
    assert f"  coco         {tmp_path / 'coco.json'}" in out
    # a second demo reuses the trained model
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and out.startswith("ovsam demo: reuses the model trained by an earlier demo")
