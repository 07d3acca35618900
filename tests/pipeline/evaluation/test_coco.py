"""``ovsam eval coco``: an annotation output's mask and box AP against COCO ground truth equals pycocotools'
``COCOeval`` run directly on the output's COCO export, and its base/novel rows equal ``COCOeval`` restricted to
those categories.

Two outputs are scored: one committed by hand (predicted masks are the ground-truth masks shifted by a few pixels,
some with the wrong label, a duplicate and a class the ground truth lacks, so the AP is far from 0 and from 1), and
one written by a real ``ShardWorker`` (``ovsam-tiny``, random weights) from sidecar boxes on a folder of images.
"""

from __future__ import annotations

import contextlib
import io
import json

import fsspec
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.cli import main
from pipeline.evaluation.coco import STAT_NAMES, eval_coco, match_categories, ClassInfo, normalise_name
from pipeline.annotate.ledger import write_run_json
from pipeline.inputs.shard_io import ShardReadReport
from pipeline.annotate.sinks import commit_shard

from tests.pipeline.corpus import good_png, sidecar

CLASSES = ["red square", "blue circle", "green triangle", "unicorn"]
SPLIT = [1, 2, 1, 0]  # base, novel, base, excluded
GT_CATEGORIES = [{"id": 7, "name": "Red_Square"}, {"id": 3, "name": "circle", "synonyms": ["blue circle"]},
                 {"id": 11, "name": "green triangle"}, {"id": 5, "name": "tree"}]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _shapes(rng, h, w, n):
    out = []
    for _ in range(n):
        y0, x0 = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
        y1, x1 = int(rng.integers(y0 + 6, min(h, y0 + 30) + 1)), int(rng.integers(x0 + 6, min(w, x0 + 30) + 1))
        m = np.zeros((h, w), dtype=bool)
        m[y0:y1, x0:x1] = True
        out.append(m)
    return out


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> dict:
    """Ground truth for 6 images (two shards), and an output whose predictions are near-misses of it."""
    root = tmp_path_factory.mktemp("evalcoco")
    rng = np.random.default_rng(0)
    fs = fsspec.filesystem("file")
    out = root / "out"
    gt = {"images": [], "annotations": [], "categories": GT_CATEGORIES}
    cat_of_class = {0: 7, 1: 3, 2: 11}
    for s, shard in enumerate(["part-000000", "part-000001"]):
        image_rows, instance_rows = [], []
        for i in range(3):
            key = f"{s}{i}"
            h, w = 60 + 10 * i, 80
            image_id = 100 + 10 * s + i
            gt["images"].append({"id": image_id, "file_name": f"{key}.jpg", "width": w, "height": h})
            masks = _shapes(rng, h, w, 4)
            gt_classes = rng.integers(0, 3, size=len(masks))
            preds = []
            for m, c in zip(masks, gt_classes):
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                          "category_id": cat_of_class[int(c)], "segmentation": _rle(m),
                                          "area": int(m.sum()), "bbox": [*_box(m)[:2], _box(m)[2] - _box(m)[0],
                                                                          _box(m)[3] - _box(m)[1]], "iscrowd": 0})
                shifted = np.roll(m, int(rng.integers(0, 4)), axis=1)
                label = int(c) if rng.random() > 0.2 else int((c + 1) % 3)
                preds.append((shifted, label, float(rng.uniform(0.3, 0.99))))
            preds.append((masks[0], 3, 0.9))  # an excluded class: never scored
            preds.append((np.roll(masks[1], 3, axis=0), int(gt_classes[1]), 0.2))  # a duplicate
            for j, (m, label, score) in enumerate(preds):
                instance_rows.append({
                    "image_key": key, "shard": shard, "instance_index": j, "prompt_type": "box",
                    "prompt_box_xyxy": _box(m), "prompt_points": None, "prompt_point_labels": None,
                    "box_xyxy": _box(m), "mask_rle": _rle(m), "area": int(m.sum()), "mask_quality": 0.9,
                    "label": label, "label_name": CLASSES[label], "label_score": score,
                    "background_score": 0.01, "topk_labels": [label], "topk_scores": [score],
                    "detector_score": None, "detector_label": None, "head_embedding": None,
                    "clip_embedding": None, "clip_valid": None})
            image_rows.append({"image_key": key, "shard": shard, "status": "ok", "error": None, "width": w,
                               "height": h, "num_instances": len(preds), "num_prompts": len(preds),
                               "num_prompts_dropped": 0, "source_format": "jpeg", "source_name": f"{key}.jpg"})
        if s == 1:  # an image that failed to decode is evaluated with no detections
            gt["images"].append({"id": 999, "file_name": "broken.jpg", "width": 40, "height": 30})
            m = np.zeros((30, 40), dtype=bool)
            m[5:20, 5:25] = True
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 999, "category_id": 7,
                                      "segmentation": _rle(m), "area": int(m.sum()), "bbox": [5, 5, 20, 15],
                                      "iscrowd": 0})
            image_rows.append({"image_key": "broken", "shard": shard, "status": "decode_error", "error": "bad",
                               "width": None, "height": None, "num_instances": 0, "num_prompts": 0,
                               "num_prompts_dropped": 0, "source_format": None, "source_name": "broken.jpg"})
        report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
        commit_shard(fs, str(out), shard, instance_rows, image_rows, input_url=str(root / f"{shard}.tar"),
                     config_hash="handmade", read_report=report, attempt_id="a")
    gt["images"].append({"id": 5000, "file_name": "not-annotated.jpg", "width": 10, "height": 10})
    write_run_json(fs, str(out), {"config_hash": "handmade", "config": {},
                                  "vocabulary": {"names": CLASSES, "synonyms": [[c] for c in CLASSES],
                                                 "split": SPLIT}})
    gt_path = root / "gt.json"
    gt_path.write_text(json.dumps(gt))
    return {"out": out, "gt": gt_path, "root": root}


def _direct_cocoeval(gt_path, export_path, iou_type: str, cat_ids=None, img_ids=None) -> np.ndarray:
    """COCOeval on the COCO export, with its images and categories mapped to the ground truth's by hand."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    exported = json.loads(export_path.read_text())
    image_by_name = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
    # a tar sample is exported as <shard>/<key>.<ext>; the ground truth names it by its member name <key>.<ext>
    image_of = {im["id"]: image_by_name.get(im["file_name"].removeprefix(im["ovsam_shard"] + "/"))
                for im in exported["images"]}
    by_name = {"red square": 7, "blue circle": 3, "green triangle": 11}
    cat_of = {c["id"]: by_name.get(c["name"]) for c in exported["categories"]}
    results = []
    for ann in exported["annotations"]:
        image_id, cat = image_of[ann["image_id"]], cat_of[ann["category_id"]]
        if image_id is None or cat is None:
            continue
        r = {"image_id": image_id, "category_id": cat, "score": ann["score"]}
        r["segmentation" if iou_type == "segm" else "bbox"] = ann["segmentation" if iou_type == "segm" else "bbox"]
        results.append(r)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.params.imgIds = sorted(img_ids if img_ids is not None else
                                  [i for i in image_of.values() if i is not None] + [999])
        ev.params.catIds = cat_ids or [3, 7, 11]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_eval_coco_equals_cocoeval_on_the_export(handmade, tmp_path, capsys) -> None:
    export = tmp_path / "export.json"
    assert main(["export", "--input", str(handmade["out"]), "-o", str(export)]) == 0
    report_path = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["eval", "coco", "--gt", str(handmade["gt"]), "--pred", str(handmade["out"]),
                 "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    for iou_type in ("segm", "bbox"):
        want = _direct_cocoeval(handmade["gt"], export, iou_type)
        got = [report[iou_type]["stats"][k] for k in STAT_NAMES]
        np.testing.assert_array_equal(got, want)
        assert 0.2 < want[0] < 0.95  # a real spread of matches and misses, not a degenerate 0 or 1
        assert report[iou_type]["all"]["AP"] == pytest.approx(want[0], abs=1e-12)
        assert report[iou_type]["all"]["AP50"] == pytest.approx(want[1], abs=1e-12)
        # base (red square, green triangle) and novel (blue circle): COCOeval restricted to them
        base = _direct_cocoeval(handmade["gt"], export, iou_type, cat_ids=[7, 11])
        novel = _direct_cocoeval(handmade["gt"], export, iou_type, cat_ids=[3])
        for name, stats in (("base", base), ("novel", novel)):
            for key, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("APs", 3), ("APm", 4), ("APl", 5),
                               ("AR100", 8)):
                assert report[iou_type][name][key] == pytest.approx(stats[index], abs=1e-12), (iou_type, name, key)
    m = report["matching"]
    assert m["images_evaluated"] == 7 and m["images_not_ok"] == 1 and m["categories_evaluated"] == 3
    assert m["unmatched_categories"] == ["tree"] and m["unmatched_classes"] == ["unicorn"]
    assert m["instances_of_unmatched_classes"] == 6  # the excluded 'unicorn' predictions
    per_class = {r["name"]: r for r in report["segm"]["per_class"]}
    assert set(per_class) == {"Red_Square", "circle", "green triangle"}
    assert per_class["circle"]["split"] == "novel" and per_class["Red_Square"]["split"] == "base"
    assert "novel" in printed and "tree" in printed and "per class" in printed


def test_perfect_predictions_score_one(handmade, tmp_path) -> None:
    """The ground truth itself, committed as predictions, has AP 1 (segm and bbox)."""
    gt = json.loads(handmade["gt"].read_text())
    names = {7: "red square", 3: "blue circle", 11: "green triangle"}
    fs = fsspec.filesystem("file")
    out = tmp_path / "perfect"
    image_rows, instance_rows = [], []
    for im in gt["images"]:
        if im["id"] in (999, 5000):
            continue
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        key = im["file_name"].rsplit(".", 1)[0]
        for j, a in enumerate(anns):
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            label = CLASSES.index(names[a["category_id"]])
            instance_rows.append({
                "image_key": key, "shard": "p-000000", "instance_index": j, "prompt_type": "box",
                "prompt_box_xyxy": None, "prompt_points": None, "prompt_point_labels": None, "box_xyxy": _box(m),
                "mask_rle": a["segmentation"], "area": int(m.sum()), "mask_quality": 1.0, "label": label,
                "label_name": CLASSES[label], "label_score": 0.5 + 0.01 * j, "background_score": 0.0,
                "topk_labels": [label], "topk_scores": [0.5], "detector_score": None, "detector_label": None,
                "head_embedding": None, "clip_embedding": None, "clip_valid": None})
        image_rows.append({"image_key": key, "shard": "p-000000", "status": "ok", "error": None,
                           "width": im["width"], "height": im["height"], "num_instances": len(anns),
                           "num_prompts": len(anns), "num_prompts_dropped": 0, "source_format": "jpeg",
                           "source_name": im["file_name"]})
    report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
    commit_shard(fs, str(out), "p-000000", instance_rows, image_rows, input_url="x.tar", config_hash="h",
                 read_report=report, attempt_id="a")
    write_run_json(fs, str(out), {"config_hash": "h", "config": {}, "vocabulary": {"names": CLASSES}})
    result = eval_coco(str(out), str(handmade["gt"]))
    for iou_type in ("segm", "bbox"):
        assert result[iou_type]["stats"]["AP"] == pytest.approx(1.0)
        assert result[iou_type]["all"]["AP50"] == pytest.approx(1.0)
        assert "base" not in result[iou_type]  # the run recorded no split: every class counts as novel
        assert result[iou_type]["novel"]["AP"] == pytest.approx(1.0)
    # the split can come from a vocabulary given on the command line
    vocab = tmp_path / "classes.txt"
    vocab.write_text("red square | base\nblue circle | novel\ngreen triangle | excluded\nunicorn | base\n")
    result = eval_coco(str(out), str(handmade["gt"]), vocabulary=str(vocab), iou_types=("segm",))
    assert result["matching"]["excluded_categories"] == ["green triangle"] and "bbox" not in result
    assert [r["name"] for r in result["segm"]["per_class"]] == ["circle", "Red_Square"]


def test_real_annotation_output_from_sidecar_boxes(tmp_path, capsys) -> None:
    """A ShardWorker's output of a nested image folder, prompted by sidecar boxes, scores against ground truth
    whose file names are the images' relative paths, equal to COCOeval on its export."""
    from pipeline.inputs.sources import expand_shards
    from pipeline.annotate.stages import ModelStageConfig
    from pipeline.annotate.worker import ShardWorker, WorkerConfig

    folder = tmp_path / "photos"
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "red square"},
                                                          {"id": 2, "name": "blue circle"}]}
    for i, rel in enumerate(["a/1.png", "a/b/2.png", "3.png"]):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good_png(64, 48))
        boxes = [[4, 4, 30, 30], [20, 10, 60, 44]]
        path.with_suffix(".json").write_bytes(sidecar(boxes=boxes))
        gt["images"].append({"id": i + 1, "file_name": rel, "width": 64, "height": 48})
        for j, b in enumerate(boxes):
            m = np.zeros((48, 64), dtype=bool)
            m[b[1]:b[3], b[0]:b[2]] = True
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": 1 + j,
                                      "segmentation": _rle(m), "area": int(m.sum()),
                                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0})
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    vocab = tmp_path / "classes.txt"
    vocab.write_text("red square\nblue circle\n")
    out = tmp_path / "out"
    worker = ShardWorker(WorkerConfig(output=str(out), stage=ModelStageConfig(model="ovsam-tiny",
                                                                              vocabulary=str(vocab)),
                                      config_hash="h", batch_size=2, warm_up=False))
    for ref in expand_shards([str(folder)]):
        worker.process(ref)
    write_run_json(fsspec.filesystem("file"), str(out), {"config_hash": "h", "config": {"inputs": [str(folder)]},
                                                         "vocabulary": {"names": ["red square", "blue circle"]}})
    export = tmp_path / "export.json"
    assert main(["export", "--input", str(out), "-o", str(export)]) == 0
    result = eval_coco(str(out), str(gt_path))
    assert result["matching"]["images_evaluated"] == 3
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    exported = json.loads(export.read_text())
    ids = {im["id"]: next(g["id"] for g in gt["images"] if g["file_name"] == im["file_name"])
           for im in exported["images"]}
    for iou_type in ("segm", "bbox"):
        results = [{"image_id": ids[a["image_id"]], "category_id": a["category_id"], "score": a["score"],
                    ("segmentation" if iou_type == "segm" else "bbox"): a["segmentation" if iou_type == "segm"
                                                                          else "bbox"]}
                   for a in exported["annotations"]]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        np.testing.assert_array_equal([result[iou_type]["stats"][k] for k in STAT_NAMES], ev.stats)
    # the report draws the 6 ground-truth instances, lowest best IoU first, on the annotated images
    worst = result["worst"]["iou"]
    assert len(worst) == 6 and [w["iou"] for w in worst] == sorted(w["iou"] for w in worst)
    assert main(["eval", "coco", "--gt", str(gt_path), "--pred", str(out), "--report", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count('<img class="case"') == 6 + len(result["worst"]["label"])
    assert page.count('alt="per-class bars') == 2


def test_matching_by_name_and_synonyms() -> None:
    cats = [{"id": 1, "name": "couch", "synonyms": ["sofa"]}, {"id": 2, "name": "Traffic_Light"},
            {"id": 3, "name": "mouse"}, {"id": 4, "name": "computer mouse"}]
    classes = ClassInfo(names=["sofa", "traffic light", "mouse", "zebra"],
                        synonyms=[["sofa", "couch"], ["traffic light"], ["mouse", "computer mouse"], ["zebra"]])
    match = match_categories(cats, classes)
    assert match.class_to_cat == {0: 1, 1: 2, 2: 3}  # the display name decides before the synonyms
    assert match.unmatched_classes == ["zebra"] and match.unmatched_categories == ["computer mouse"]
    assert normalise_name("  Traffic_Light ") == "traffic light"


@pytest.mark.parametrize("argv, flag", [
    (["--iou-types", "mask"], "--iou-types"),
    (["--per-class", "0"], "--per-class"),
])
def test_usage_errors_exit_2(handmade, argv, flag, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        rc = main(["eval", "coco", "--gt", str(handmade["gt"]), "--pred", str(handmade["out"]), *argv])
        raise SystemExit(rc)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_failures_name_the_problem(handmade, tmp_path, capsys) -> None:
    assert main(["eval", "coco", "--gt", str(tmp_path / "missing.json"), "--pred", str(handmade["out"])]) == 1
    assert "missing.json" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "zzz.jpg", "width": 5, "height": 5}],
                                 "annotations": [], "categories": [{"id": 1, "name": "red square"}]}))
    assert main(["eval", "coco", "--gt", str(other), "--pred", str(handmade["out"])]) == 1
    assert "file_name" in capsys.readouterr().err
    assert main(["eval", "coco", "--gt", str(handmade["gt"]), "--pred", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err
