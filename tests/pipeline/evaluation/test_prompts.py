"""``ovsam eval prompts``: the paper's box/point protocol over a COCO-format set.

The expected values are computed here without the evaluation code: per image, ``OvsamPredictor`` answers each
ground-truth instance's box (or its centre point, found by brute force: the mask pixel farthest from any
background pixel, first in row-major order), and IoU / top-1 accuracy are added up by hand. The Ray run (units on
two actors) and a run killed with SIGKILL and resumed must give the same numbers as the in-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.evaluation.prompts import EvalPromptsConfig, format_summary, run_eval_prompts
from tests.browser import ARTEFACTS, console_errors, headless_chrome

ROOT = Path(__file__).resolve().parents[3]
CLASSES = "red square | base\nblue circle | novel\ngreen triangle | base\n"
CATEGORIES = [{"id": 1, "name": "red square"}, {"id": 2, "name": "blue circle"}, {"id": 3, "name": "green triangle"},
              {"id": 9, "name": "tree"}]


def _rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalprompts")
    rng = np.random.default_rng(3)
    images = root / "images"
    images.mkdir()
    gt = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(5):
        h, w = 56 + 8 * i, 72
        pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for j in range(3 + i % 2):
            y0, x0 = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
            y1, x1 = y0 + int(rng.integers(6, 16)), x0 + int(rng.integers(6, 16))
            m = np.zeros((h, w), dtype=bool)
            m[y0:y1, x0:x1] = True
            cat = [1, 2, 3, 9][(i + j) % 4]
            pixels[m] = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (120, 120, 120)][[1, 2, 3, 9].index(cat)]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 10 + i, "category_id": cat,
                                      "segmentation": _rle(m), "area": int(m.sum()),
                                      "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        crowd = np.zeros((h, w), dtype=bool)
        crowd[:4, :4] = True
        gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 10 + i, "category_id": 1,
                                  "segmentation": _rle(crowd), "area": 16, "bbox": [0, 0, 4, 4], "iscrowd": 1})
        name = f"sub/{i}.png"
        (images / name).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(images / name)
        gt["images"].append({"id": 10 + i, "file_name": name, "width": w, "height": h})
    gt_path = root / "gt.json"
    gt_path.write_text(json.dumps(gt))
    vocab = root / "classes.txt"
    vocab.write_text(CLASSES)
    return {"root": root, "gt": gt_path, "images": images, "vocab": vocab, "data": gt}


def _config(coco_set, out: Path, **kw) -> EvalPromptsConfig:
    return EvalPromptsConfig(output=str(out), model="ovsam-tiny", vocabulary=str(coco_set["vocab"]),
                             gt=str(coco_set["gt"]), images=str(coco_set["images"]), images_per_unit=2,
                             batch_size=2, **kw)


def _centre(m: np.ndarray) -> tuple[float, float]:
    """The published centre point (OVSAM_SPEC §1.10), restated on the whole frame of ovsam-tiny's input."""
    from ovsam.transforms import preprocess_shape

    from tests.ovsam.test_evaluation import published_centre

    return published_centre(m, preprocess_shape(*m.shape, 256))


def _by_hand(coco_set, published_point_boxes: bool = False) -> dict:
    import ovsam

    model = ovsam.build_ovsam("ovsam-tiny").eval()
    vocab = ovsam.Vocabulary.from_file(coco_set["vocab"], model, progress=False)
    class_of = {1: 0, 2: 1, 3: 2}
    split = {0: "base", 1: "novel", 2: "base"}
    sums = {p: {} for p in ("box", "point")}

    def add(prompt, group, key, value):
        sums[prompt][group + key] = sums[prompt].get(group + key, 0.0) + value

    gt = coco_set["data"]
    for img in gt["images"]:
        image = np.asarray(Image.open(coco_set["images"] / img["file_name"]).convert("RGB"))
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]
                and a["category_id"] in class_of]
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        predictor = ovsam.OvsamPredictor(model, vocab)
        predictor.set_image(image)
        for prompt in ("box", "point"):
            if prompt == "box":
                boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                     a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32)
                pred = predictor.predict(box=boxes)
            elif published_point_boxes:  # the frozen CLIP pools the GT boxes, unscaled
                pts = np.asarray([_centre(m) for m in masks], dtype=np.float32)[:, None, :]
                raw = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                   a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32)
                [pred] = ovsam.predict_batch(model, [image], [{"point_coords": pts, "clip_boxes": raw,
                                                               "point_labels": np.ones((len(anns), 1))}], vocab)
            else:
                pts = np.asarray([_centre(m) for m in masks], dtype=np.float32)[:, None, :]
                pred = predictor.predict(point_coords=pts, point_labels=np.ones((len(anns), 1)))
            for a, m, pm, label in zip(anns, masks, pred.masks, pred.labels):
                c = class_of[a["category_id"]]
                iou = np.logical_and(pm, m).sum() / (np.logical_or(pm, m).sum() + 1e-8)
                for group in ("", split[c] + "_"):
                    add(prompt, group, "count", 1)
                    add(prompt, group, "correct", float(int(label) == c))
                    add(prompt, group, "iou", float(iou))
    out = {}
    for prompt, s in sums.items():
        out[prompt] = {}
        for group in ("", "base_", "novel_"):
            out[prompt][group + "miou"] = s[group + "iou"] / s[group + "count"]
            out[prompt][group + "acc"] = s[group + "correct"] / s[group + "count"]
            out[prompt][group + "count"] = s[group + "count"]
    return out


@pytest.fixture(scope="module")
def local_run(coco_set) -> dict:
    out = coco_set["root"] / "local"
    return run_eval_prompts(_config(coco_set, out, workers=0), progress=lambda *_: None)


def test_in_process_run_equals_the_values_computed_by_hand(coco_set, local_run) -> None:
    want = _by_hand(coco_set)
    for prompt in ("box", "point"):
        got = {**local_run["prompts"][prompt]["sums"], **local_run["prompts"][prompt]["summary"]}
        for key, value in want[prompt].items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (prompt, key)
        assert 0 < got["novel_count"] < got["count"]
    # 'tree' instances (no class) and crowd regions are not prompts; units are 2 images each
    assert local_run["units"] == 3 and local_run["instances_of_unmatched_categories"] > 0
    table = format_summary(local_run)
    assert "novel" in table and "point" in table


def test_published_point_boxes_equal_the_values_computed_by_hand(coco_set, local_run, tmp_path) -> None:
    summary = run_eval_prompts(_config(coco_set, tmp_path / "published", workers=0, prompts=("point",),
                                       published_point_boxes=True), progress=lambda *_: None)
    want = _by_hand(coco_set, published_point_boxes=True)["point"]
    got = {**summary["prompts"]["point"]["sums"], **summary["prompts"]["point"]["summary"]}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert summary["config"]["published_point_boxes"] is True


def test_ray_actors_give_the_in_process_numbers(coco_set, local_run, tmp_path) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        summary = run_eval_prompts(_config(coco_set, tmp_path / "ray", workers=2, cpus_per_worker=1),
                                   progress=lambda *_: None)
    finally:
        ray.shutdown()
    for prompt in ("box", "point"):
        a, b = local_run["prompts"][prompt]["sums"], summary["prompts"][prompt]["sums"]
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-9), (prompt, k)
    assert len(list((tmp_path / "ray" / "units").glob("*.json"))) == 3


def test_killed_evaluation_resumes_to_the_same_result(coco_set, local_run, tmp_path) -> None:
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "jobs.cli", "eval", "prompts", "--gt", str(coco_set["gt"]), "--images",
            str(coco_set["images"]), "--vocabulary", str(coco_set["vocab"]), "--output", str(out),
            "--images-per-unit", "2", "--batch-size", "2", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "units").glob("*.json")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "units").glob("*.json")))
    assert 1 <= done < 3, done  # killed with a unit done and units left
    rerun = subprocess.run(argv + ["--json", str(tmp_path / "s.json")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {done} of 3 units done" in rerun.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    for prompt in ("box", "point"):
        assert summary["prompts"][prompt]["sums"] == pytest.approx(local_run["prompts"][prompt]["sums"],
                                                                   rel=1e-9, abs=1e-9)


def test_the_ground_truth_is_read_once(coco_set, tmp_path, monkeypatch) -> None:
    """An in-process run reads the ground-truth JSON once: for the units, the evaluator and the known-set check
    (``known_set``) alike; a resumed run with nothing left to do reads it once too."""
    import pipeline.evaluation.coco as coco

    loads = []
    load = coco.load_gt

    def counted(url, storage_options=None):
        loads.append(url)
        return load(url, storage_options)

    monkeypatch.setattr(coco, "load_gt", counted)
    cfg = _config(coco_set, tmp_path / "once", workers=0, prompts=("box",), limit=2)
    summary = run_eval_prompts(cfg, progress=lambda *_: None)
    assert loads == [str(coco_set["gt"])] and summary["units"] == 1
    run_eval_prompts(cfg, progress=lambda *_: None)
    assert len(loads) == 2


def test_another_configuration_in_the_same_output_is_refused(coco_set, local_run) -> None:
    out = coco_set["root"] / "local"
    with pytest.raises(ValueError, match="another configuration.*prompts"):
        run_eval_prompts(_config(coco_set, out, workers=0, prompts=("box",)), progress=lambda *_: None)


@pytest.mark.parametrize("argv, flag", [
    (["--prompt", "clicks"], "--prompt"),
    (["--images", "x"], "--vocabulary"),
    ([], "--images"),
])
def test_usage_errors_exit_2(coco_set, tmp_path, argv, flag, capsys) -> None:
    from jobs.cli import main

    base = ["eval", "prompts", "--gt", str(coco_set["gt"]), "--output", str(tmp_path / "o")]
    if flag != "--vocabulary":
        base += ["--vocabulary", str(coco_set["vocab"])]
    if "--images" not in argv and flag != "--images":
        base += ["--images", str(coco_set["images"])]
    assert main(base + argv) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# the HTML report


def test_report_shows_the_worst_instances_of_the_run(coco_set, local_run, tmp_path) -> None:
    from pipeline.evaluation.prompts import WORST
    from pipeline.evaluation.report import write_report

    page = write_report(local_run, tmp_path / "report", images=str(coco_set["images"]))
    text = page.read_text()
    for prompt in ("box", "point"):
        rec = local_run["prompts"][prompt]
        worst = rec["worst"]["iou"]
        n = int(rec["sums"]["count"])
        assert len(worst) == min(WORST, n)
        assert [w["iou"] for w in worst] == sorted(w["iou"] for w in worst)
        # the lowest IoU of the run is the first shown (the mean is over the same instances)
        assert worst[0]["iou"] <= rec["summary"]["miou"]
        wrong = rec["worst"]["label"]
        assert all(w["label"] != w["gt_label"] for w in wrong)
        assert len(wrong) == min(WORST, n - int(rec["sums"]["correct"]))
        assert [r["name"] for r in rec["per_class"]] == ["red square", "blue circle", "green triangle"]
        assert sum(r["count"] for r in rec["per_class"]) == n
    figures = text.count('<img class="case"')
    assert figures == sum(len(local_run["prompts"][p]["worst"][k]) for p in ("box", "point") for k in ("iou", "label"))
    assert text.count('alt="per-class bars') == 2 and "data:image/png;base64," in text
    assert "src=\"http" not in text and "<script" not in text  # self-contained


def test_report_opens_in_a_headless_browser_without_errors(coco_set, local_run, tmp_path) -> None:
    from pipeline.evaluation.report import write_report

    page = write_report(local_run, tmp_path / "report", images=str(coco_set["images"]))
    driver = headless_chrome()
    try:
        driver.get(page.as_uri())
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => [i.className, i.complete && i.naturalWidth > 0])")
        cases = [ok for cls, ok in loaded if cls == "case"]
        assert cases and all(ok for _, ok in loaded), loaded
        assert driver.find_element("tag name", "h1").text.startswith("ovsam eval prompts")
        errors = console_errors(driver)
        assert not errors, errors
        ARTEFACTS.mkdir(exist_ok=True)
        shot = ARTEFACTS / "eval_prompts_report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    with Image.open(shot) as img:  # the worst cases are drawn: magenta and green tints in the screenshot
        px = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert ((px[:, 0] > 180) & (px[:, 1] < 90) & (px[:, 2] > 150)).sum() > 200
