"""Exports for labelling tools, read back by code that is not ours: COCO file names that exist with --images-dir
(pycocotools and Pillow open them), and polygons that pycocotools re-rasterises to the RLE masks (IoU >= 0.9).

The annotated output is made without Ray: a ``ShardWorker`` in this process annotates a nested folder of images
(virtual shards) and a tar shard with ``ovsam-tiny`` (random weights: irregular masks, which is what polygons must
survive) and whole-image prompts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs.cli import main
from pipeline.export.coco import mask_polygons
from pipeline.annotate.ledger import write_run_json
from pipeline.inputs.sources import expand_shards
from pipeline.annotate.stages import ModelStageConfig
from pipeline.annotate.worker import ShardWorker, WorkerConfig

from tests.pipeline.corpus import CorpusCase, encode, good_jpeg, good_png, gradient_rgb, tar_bytes


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    folder = root / "photos"
    keys = {"a/1.jpg": good_jpeg(64, 48), "a/b/2.png": good_png(50, 70),
            "3.webp": encode(Image.fromarray(gradient_rgb(80, 60)), "WEBP", quality=90), "bad.jpg": b"\xff\xd8no"}
    for key, data in keys.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
    (root / "shard-000000.tar").write_bytes(tar_bytes([CorpusCase("k0", {"jpg": good_jpeg(60, 40)}, "ok"),
                                                       CorpusCase("k1", {"png": good_png(40, 60)}, "ok")]))
    inputs = [str(folder), str(root / "shard-000000.tar")]
    out = root / "out"
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\n")
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), prompts="whole-image")
    worker = ShardWorker(WorkerConfig(output=str(out), stage=stage, config_hash="h", batch_size=2, warm_up=False))
    refs = expand_shards(inputs, images_per_shard=3)
    for ref in refs:
        worker.process(ref)
    import fsspec

    write_run_json(fsspec.filesystem("file"), str(out), {
        "config": {"inputs": inputs, "images_per_shard": 3}, "config_hash": "h",
        "vocabulary": {"names": ["red square", "blue circle"]}})
    return {"out": out, "root": root, "refs": refs}


def test_coco_file_names_are_real_and_images_dir_holds_them(annotated, tmp_path, capsys) -> None:
    coco_path, images = tmp_path / "coco.json", tmp_path / "images"
    assert main(["export", "--input", str(annotated["out"]), "-o", str(coco_path), "--images-dir", str(images)]) == 0
    assert "5 images" in capsys.readouterr().out
    coco = COCO(str(coco_path))
    names = sorted(im["file_name"] for im in coco.dataset["images"])
    assert names == ["3.webp", "a/1.jpg", "a/b/2.png", "shard-000000/k0.jpg", "shard-000000/k1.png"]
    for im in coco.dataset["images"]:
        with Image.open(images / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])
        assert (images / im["file_name"]).read_bytes() == (
            (annotated["root"] / "photos" / im["file_name"]).read_bytes()
            if not im["file_name"].startswith("shard-") else (images / im["file_name"]).read_bytes())
    assert len(coco.getAnnIds()) == 5
    for ann in coco.dataset["annotations"]:
        assert coco.annToMask(ann).shape == (coco.imgs[ann["image_id"]]["height"], coco.imgs[ann["image_id"]]["width"])
    # export-coco is the same command
    assert main(["export-coco", "--input", str(annotated["out"]), "-o", str(tmp_path / "alias.json")]) == 0
    alias = json.loads((tmp_path / "alias.json").read_text())
    assert alias == json.loads(coco_path.read_text())


def test_polygons_rerasterise_to_the_rle_masks(annotated, tmp_path) -> None:
    rle_path, poly_path = tmp_path / "rle.json", tmp_path / "poly.json"
    assert main(["export", "--input", str(annotated["out"]), "-o", str(rle_path)]) == 0
    assert main(["export", "--format", "cvat", "--input", str(annotated["out"]), "-o", str(poly_path)]) == 0
    rle, poly = COCO(str(rle_path)), COCO(str(poly_path))
    ious = []
    for ann in poly.dataset["annotations"]:
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
        ious.append(_iou(poly.annToMask(ann), rle.annToMask(rle.anns[ann["id"]])))
    assert len(ious) == 5 and min(ious) >= 0.9, ious  # speckled random-weight masks: the hardest case


@pytest.mark.parametrize("shape", ["disc", "triangle", "ring", "two_parts", "thin_bar"])
def test_mask_polygons_of_shapes(shape) -> None:
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    masks = {
        "disc": (yy - 60) ** 2 + (xx - 80) ** 2 < 45 ** 2,
        "triangle": (yy > 20) & (yy < 100) & (np.abs(xx - 80) < (yy - 20) * 0.8),
        "ring": ((yy - 60) ** 2 + (xx - 80) ** 2 < 50 ** 2) & ((yy - 60) ** 2 + (xx - 80) ** 2 > 15 ** 2),
        "two_parts": ((yy - 40) ** 2 + (xx - 40) ** 2 < 25 ** 2) | ((yy > 60) & (yy < 110) & (xx > 90) & (xx < 150)),
        "thin_bar": (yy >= 50) & (yy < 54) & (xx > 10) & (xx < 150),
    }
    m = masks[shape]
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    polygons = mask_polygons({"size": rle["size"], "counts": rle["counts"].decode()}, tolerance=1.0)
    assert len(polygons) == (2 if shape == "two_parts" else 1)
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)
    filled = m if shape != "ring" else (yy - 60) ** 2 + (xx - 80) ** 2 < 50 ** 2  # COCO polygons hold no holes
    assert _iou(back, filled) >= 0.9


def test_export_refuses_what_is_not_an_annotation_output(tmp_path, capsys) -> None:
    assert main(["export", "--input", str(tmp_path), "-o", str(tmp_path / "x.json")]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert main(["export", "--input", str(tmp_path), "-o", str(tmp_path / "x.json"), "--tolerance", "-1"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_label_studio_brush_masks_decode_to_the_same_pixels_with_label_studio_code(annotated, tmp_path) -> None:
    from label_studio_converter.brush import decode_rle

    assert main(["export", "--input", str(annotated["out"]), "-o", str(tmp_path / "coco.json")]) == 0
    assert main(["export", "--format", "label-studio", "--input", str(annotated["out"]), "-o",
                 str(tmp_path / "ls.json"), "--image-prefix", "/data/local-files/?d="]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert len(tasks) == 5
    by_name = {im["file_name"]: im for im in coco.dataset["images"]}
    checked = 0
    for task in tasks:
        im = by_name[task["data"]["image"].removeprefix("/data/local-files/?d=")]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        results = task["predictions"][0]["result"]
        assert len(results) == len(anns)
        for res, ann in zip(results, anns):
            assert res["type"] == "brushlabels" and res["value"]["format"] == "rle"
            assert res["value"]["brushlabels"] == [coco.cats[ann["category_id"]]["name"]]
            assert (res["original_width"], res["original_height"]) == (im["width"], im["height"])
            rgba = decode_rle(res["value"]["rle"]).reshape(im["height"], im["width"], 4)
            assert (rgba[..., 3] > 0).tolist() == coco.annToMask(ann).astype(bool).tolist()
            checked += 1
    assert checked == 5


def test_brush_rle_edge_cases_decode_with_label_studio_code() -> None:
    from label_studio_converter.brush import decode_rle

    from pipeline.export.tools import brush_rle

    rng = np.random.default_rng(0)
    for mask in (np.zeros((3, 5), bool), np.ones((7, 2), bool), rng.random((33, 47)) > 0.5,
                 np.pad(np.ones((1, 1), bool), ((4, 0), (0, 9))), np.ones((300, 300), bool)):
        rgba = decode_rle(brush_rle(mask)).reshape(*mask.shape, 4)
        assert (rgba == (mask[..., None] * 255)).all()


def test_yolo_seg_layout_and_polygons(annotated, tmp_path) -> None:
    """The layout Ultralytics reads (images/ and labels/ with the same relative paths, data.yaml with the class
    names) and its label format: per line a class index < nc and >= 3 normalised points; each line's polygon
    re-rasterised covers its mask's largest part."""
    import yaml

    out = tmp_path / "yolo"
    assert main(["export", "--format", "yolo-seg", "--input", str(annotated["out"]), "-o", str(out)]) == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["train"] == data["val"] == "images" and data["names"] == {0: "red square", 1: "blue circle"}
    images = sorted(p.relative_to(out / "images") for p in (out / "images").rglob("*") if p.is_file())
    labels = sorted(p.relative_to(out / "labels") for p in (out / "labels").rglob("*.txt"))
    assert [p.with_suffix("") for p in images] == [p.with_suffix("") for p in labels] and len(labels) == 5
    assert main(["export", "--input", str(annotated["out"]), "-o", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    by_stem = {im["file_name"].rsplit(".", 1)[0]: im for im in coco.dataset["images"]}
    import cv2

    for label in labels:
        im = by_stem[str(label.with_suffix(""))]
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        (line,) = (out / "labels" / label).read_text().splitlines()
        values = line.split()
        cls, coords = int(values[0]), np.asarray(values[1:], dtype=np.float64)
        assert 0 <= cls < len(data["names"]) and cls == ann["category_id"] - 1
        assert len(coords) % 2 == 0 and len(coords) >= 6 and coords.min() >= 0 and coords.max() <= 1
        w, h = im["width"], im["height"]
        poly = (coords.reshape(-1, 2) * [w, h]).reshape(-1).tolist()
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)
        n, parts, stats, _ = cv2.connectedComponentsWithStats(coco.annToMask(ann), connectivity=8)
        largest = parts == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        assert np.logical_and(back, largest).sum() >= 0.9 * largest.sum()
