"""``ovsam eval coco --label-source``: OV-SAM's labels (``label_name``/``label_score``) or the detector's
(``detector_label``/``detector_score``) scored on the same masks.

The predictions are the ground-truth masks themselves, so the AP depends on the labels alone: an output whose
detector labels are right and OV-SAM's wrong scores 1 with ``detector`` and 0 with ``ovsam``, and the other way
round.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from jobs.cli import main
from pipeline.annotate.ledger import write_run_json
from pipeline.annotate.sinks import commit_shard
from pipeline.evaluation.coco import NoDetectorLabels, eval_coco
from pipeline.inputs.shard_io import ShardReadReport

from tests.pipeline.evaluation.test_coco import CLASSES, GT_CATEGORIES, _box, _rle, _shapes

CAT_OF_CLASS = {0: 7, 1: 3, 2: 11}  # red square, blue circle (a synonym of 'circle'), green triangle


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory) -> dict:
    """4 images with 3 instances each (classes 0..2), as GT masks and classes."""
    root = tmp_path_factory.mktemp("labelsource")
    rng = np.random.default_rng(1)
    gt = {"images": [], "annotations": [], "categories": GT_CATEGORIES}
    images = []
    for i in range(4):
        h, w = 50 + 10 * i, 70
        key = f"im{i}"
        gt["images"].append({"id": i + 1, "file_name": f"{key}.jpg", "width": w, "height": h})
        masks = _shapes(rng, h, w, 3)
        classes = [int(c) for c in rng.integers(0, 3, size=3)]
        for m, c in zip(masks, classes):
            x0, y0, x1, y1 = _box(m)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": CAT_OF_CLASS[c], "segmentation": _rle(m),
                                      "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        images.append((key, h, w, masks, classes))
    path = root / "gt.json"
    path.write_text(json.dumps(gt))
    return {"path": path, "images": images, "root": root}


def _commit(out, images, instance_fields) -> str:
    """An output of one shard: each GT mask as an instance, with ``instance_fields(c, j, rng)`` (c its GT class,
    j the mask's index in its image) giving its labels and scores, or a list of several instances of that mask."""
    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(2)
    image_rows, instance_rows = [], []
    for key, h, w, masks, classes in images:
        rows = []
        for j, (m, c) in enumerate(zip(masks, classes)):
            made = instance_fields(c, j, rng)
            for fields in made if isinstance(made, list) else [made]:
                label = fields["label"]
                rows.append({
                    "image_key": key, "shard": "s-000000", "instance_index": len(rows), "prompt_type": "box",
                    "prompt_box_xyxy": _box(m), "prompt_points": None, "prompt_point_labels": None,
                    "box_xyxy": _box(m), "mask_rle": _rle(m), "area": int(m.sum()), "mask_quality": 0.9,
                    "label": label, "label_name": CLASSES[label], "label_score": fields["label_score"],
                    "background_score": 0.01, "topk_labels": [label], "topk_scores": [fields["label_score"]],
                    "detector_score": fields.get("detector_score"), "detector_label": fields.get("detector_label"),
                    "head_embedding": None, "clip_embedding": None, "clip_valid": None})
        instance_rows += rows
        image_rows.append({"image_key": key, "shard": "s-000000", "status": "ok", "error": None, "width": w,
                           "height": h, "num_instances": len(rows), "num_prompts": len(rows),
                           "num_prompts_dropped": 0, "source_format": "jpeg", "source_name": f"{key}.jpg"})
    report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
    commit_shard(fs, str(out), "s-000000", instance_rows, image_rows, input_url="x.tar", config_hash="h",
                 read_report=report, attempt_id="a")
    write_run_json(fs, str(out), {"config_hash": "h", "config": {"prompts": "detector:owlv2"},
                                  "vocabulary": {"names": CLASSES, "synonyms": [[c] for c in CLASSES]}})
    return str(out)


def _wrong(c: int) -> int:
    return (c + 1) % 3


def _ap(report: dict) -> tuple[float, float]:
    return report["segm"]["stats"]["AP"], report["bbox"]["stats"]["AP"]


def test_detector_labels_right_ovsam_labels_wrong(ground_truth, tmp_path, capsys) -> None:
    def fields(c, j, rng):
        right = {"label": _wrong(c), "label_score": float(rng.uniform(0.5, 0.9)),
                 # the detector's label as a display name written another way: matched case-blind, '_' as space
                 "detector_label": CLASSES[c].upper().replace(" ", "_") if j == 0 else CLASSES[c],
                 "detector_score": None if j == 1 else float(rng.uniform(0.3, 0.9))}
        no_detector = {"label": _wrong(c), "label_score": 0.99}  # e.g. a prompt the detector did not make
        unknown = {"label": _wrong(c), "label_score": 0.95, "detector_label": "zebra", "detector_score": 0.99}
        return [right, no_detector, unknown]

    out = _commit(tmp_path / "det_right", ground_truth["images"], fields)
    gt = str(ground_truth["path"])
    ovsam = eval_coco(out, gt)
    assert ovsam["label_source"] == "ovsam" and _ap(ovsam) == (0.0, 0.0)
    assert "skipped_no_detector_label" not in ovsam["matching"]

    json_path = tmp_path / "det.json"
    capsys.readouterr()
    assert main(["eval", "coco", "--gt", gt, "--pred", out, "--label-source", "detector",
                 "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(json_path.read_text())
    assert report["label_source"] == "detector"
    assert _ap(report) == pytest.approx((1.0, 1.0))
    m = report["matching"]
    assert m["instances"] == 36 and m["skipped_no_detector_label"] == 12
    assert m["unknown_detector_labels"] == {"zebra": 12} and m["detector_labels_without_score"] == 4
    assert "detector_label" in printed and "12 instances without a detector label skipped" in printed


def test_ovsam_labels_right_detector_labels_wrong(ground_truth, tmp_path) -> None:
    def fields(c, j, rng):
        return {"label": c, "label_score": float(rng.uniform(0.3, 0.9)), "detector_label": CLASSES[_wrong(c)],
                "detector_score": float(rng.uniform(0.5, 0.99))}

    out = _commit(tmp_path / "ovsam_right", ground_truth["images"], fields)
    gt = str(ground_truth["path"])
    ovsam = eval_coco(out, gt)
    detector = eval_coco(out, gt, label_source="detector")
    assert _ap(ovsam) == pytest.approx((1.0, 1.0)) and _ap(detector) == (0.0, 0.0)
    assert detector["matching"]["skipped_no_detector_label"] == 0
    assert detector["matching"]["instances"] == ovsam["matching"]["instances"] == 12


def test_no_detector_labels_is_a_usage_error(ground_truth, tmp_path, capsys) -> None:
    out = _commit(tmp_path / "none", ground_truth["images"],
                  lambda c, j, rng: {"label": c, "label_score": 0.8})
    gt = str(ground_truth["path"])
    with pytest.raises(NoDetectorLabels, match="detector_label"):
        eval_coco(out, gt, label_source="detector")
    capsys.readouterr()
    assert main(["eval", "coco", "--gt", gt, "--pred", out, "--label-source", "detector"]) == 2
    err = capsys.readouterr().err
    assert "--label-source detector" in err and "none of the 12 instances" in err and "--label-source ovsam" in err
    assert main(["eval", "coco", "--gt", gt, "--pred", out]) == 0  # the default source needs no detector


def test_label_source_choices_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "coco", "--gt", "g.json", "--pred", "out", "--label-source", "clip"])
    assert e.value.code == 2 and "--label-source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "coco", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--label-source {ovsam,detector}" in text and "detector_label" in text and "label_score" in text
