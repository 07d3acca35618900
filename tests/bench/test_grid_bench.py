"""bench/grid.py end to end on a stand-in for ``make demo``'s output: a random-init ovsam-tiny checkpoint, its
vocabulary and three packed held-out scenes. The numbers mean nothing; the columns and the JSON must be there."""

from __future__ import annotations

import json

from bench.grid import main


def test_grid_bench_reports_recall_per_setting(tmp_path):
    import ovsam
    from ovsam.checkpoint import save_checkpoint
    from pipeline.training.packers.synthetic import pack_synthetic
    from pipeline.training.synthetic import CLASS_NAMES

    model_dir = tmp_path / "demo" / "model"
    pack_synthetic(str(model_dir / "data" / "synthetic"), kind="mask", num_train=1, num_heldout=3)
    model = ovsam.build_ovsam("ovsam-tiny")
    save_checkpoint(model, model_dir / "ovsam-tiny-synthetic.safetensors")
    ovsam.Vocabulary.from_names(list(CLASS_NAMES), model).save(model_dir / "x.synthetic.vocab.safetensors")
    out = tmp_path / "grid.json"
    assert main(["--demo", str(tmp_path / "demo"), "--points", "4", "--stability", "0.0,0.9", "--json",
                 str(out), "--threads", "1"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["points_per_side"], r["stability_score_thresh"]) for r in rows] == [(4, 0.0), (4, 0.9)]
    for r in rows:
        assert r["images"] == 3 and r["objects"] > 0 and 0.0 <= r["recall"] <= 1.0 and r["seconds_per_image"] > 0
    assert rows[0]["masks_per_image"] >= rows[1]["masks_per_image"]  # a stricter filter keeps no more masks
