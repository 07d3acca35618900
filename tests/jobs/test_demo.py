"""The demo end to end: shards -> annotation job on local Ray -> Parquet, COCO JSON and overlays; a rerun skips."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from pycocotools.coco import COCO

from jobs.cli import main


def test_demo_annotates_generated_shards(tmp_path, capsys):
    args = ["demo", "--output", str(tmp_path), "--shards", "2", "--samples-per-shard", "2", "--overlays", "3",
            "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
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
