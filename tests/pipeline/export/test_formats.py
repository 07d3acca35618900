"""Exports for labelling tools, read back by code that is not ours: COCO file names that exist with --images-dir
(pycocotools and Pillow open them, EXIF-rotated images in the masks' frame), Label Studio brush masks, and the
layout and format of YOLO-seg labels.

The annotated output is made without Ray: a ``ShardWorker`` in this process annotates a nested folder of images
(virtual shards, two of them EXIF-rotated) and a tar shard with ``ovsam-tiny`` and whole-image prompts. Its random
weights give masks that differ from CPU to CPU, so nothing here asserts on their geometry: polygons are checked on
given masks in ``test_polygons.py`` (and here on constructed shapes).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jobs.cli import main
from pipeline.annotate.ledger import write_run_json
from pipeline.inputs.sources import expand_shards
from pipeline.annotate.stages import ModelStageConfig
from pipeline.annotate.worker import ShardWorker, WorkerConfig

from tests.pipeline.corpus import CorpusCase, encode, good_jpeg, good_png, gradient_rgb, tar_bytes

ROTATED = {"r/6.jpg": 6, "r/8.png": 8}  # EXIF orientation: stored 64 x 40, shown (and annotated) 40 x 64


def _rotated(name: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "ovsam test camera"  # Make: other EXIF data is kept
    fmt = "JPEG" if name.endswith(".jpg") else "PNG"
    return encode(Image.fromarray(gradient_rgb(64, 40)), fmt, exif=exif.tobytes(), **({"quality": 95} if
                                                                                       fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    folder = root / "photos"
    keys = {"a/1.jpg": good_jpeg(64, 48), "a/b/2.png": good_png(50, 70),
            "3.webp": encode(Image.fromarray(gradient_rgb(80, 60)), "WEBP", quality=90), "bad.jpg": b"\xff\xd8no",
            **{name: _rotated(name, orientation) for name, orientation in ROTATED.items()}}
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
    assert "7 images" in capsys.readouterr().out
    coco = COCO(str(coco_path))
    names = sorted(im["file_name"] for im in coco.dataset["images"])
    assert names == ["3.webp", "a/1.jpg", "a/b/2.png", *ROTATED, "shard-000000/k0.jpg", "shard-000000/k1.png"]
    for im in coco.dataset["images"]:
        with Image.open(images / im["file_name"]) as img:  # as a tool that ignores EXIF orientation sees it
            assert img.size == (im["width"], im["height"])
        if im["file_name"] not in ROTATED:  # the others are copied byte for byte
            source = ({"shard-000000/k0.jpg": good_jpeg(60, 40), "shard-000000/k1.png": good_png(40, 60)}.get(
                im["file_name"]) or (annotated["root"] / "photos" / im["file_name"]).read_bytes())
            assert (images / im["file_name"]).read_bytes() == source
    assert len(coco.getAnnIds()) == 7
    for ann in coco.dataset["annotations"]:
        assert coco.annToMask(ann).shape == (coco.imgs[ann["image_id"]]["height"], coco.imgs[ann["image_id"]]["width"])
    # export-coco is the same command
    assert main(["export-coco", "--input", str(annotated["out"]), "-o", str(tmp_path / "alias.json")]) == 0
    alias = json.loads((tmp_path / "alias.json").read_text())
    assert alias == json.loads(coco_path.read_text())


def test_cvat_export_is_the_coco_export_with_polygons(annotated, tmp_path) -> None:
    """The same images, annotations and categories as the RLE export, each segmentation a list of polygons of >= 3
    points (an empty mask, which has none, keeps its RLE; how well polygons fit masks is checked on given masks, in
    test_polygons.py)."""
    rle_path, poly_path = tmp_path / "rle.json", tmp_path / "poly.json"
    assert main(["export", "--input", str(annotated["out"]), "-o", str(rle_path)]) == 0
    assert main(["export", "--format", "cvat", "--input", str(annotated["out"]), "-o", str(poly_path)]) == 0
    rle, poly = json.loads(rle_path.read_text()), json.loads(poly_path.read_text())
    assert rle["images"] == poly["images"] and rle["categories"] == poly["categories"]
    assert len(poly["annotations"]) == 7
    for a, b in zip(rle["annotations"], poly["annotations"]):
        assert {**a, "segmentation": None} == {**b, "segmentation": None}
        if a["area"] == 0:
            assert b["segmentation"] == a["segmentation"]
            continue
        assert isinstance(b["segmentation"], list) and all(len(p) >= 6 and len(p) % 2 == 0 for p in b["segmentation"])


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
    assert len(tasks) == 7
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
    assert checked == 7


def test_label_studio_export_is_the_same_every_time_and_result_ids_are_unique(annotated, tmp_path) -> None:
    for run in ("a", "b"):
        for fmt_args in ([], ["--polygons"]):
            out = tmp_path / f"ls-{run}{'-poly' if fmt_args else ''}.json"
            assert main(["export", "--format", "label-studio", "--input", str(annotated["out"]), "-o", str(out),
                         *fmt_args]) == 0
    for kind in ("", "-poly"):
        a = (tmp_path / f"ls-a{kind}.json").read_bytes()
        assert a == (tmp_path / f"ls-b{kind}.json").read_bytes()
        ids = [r["id"] for task in json.loads(a) for r in task["predictions"][0]["result"]]
        assert ids and len(set(ids)) == len(ids)


def test_brush_rle_edge_cases_decode_with_label_studio_code() -> None:
    from label_studio_converter.brush import decode_rle

    from pipeline.export.tools import brush_rle

    rng = np.random.default_rng(0)
    for mask in (np.zeros((3, 5), bool), np.ones((7, 2), bool), rng.random((33, 47)) > 0.5,
                 np.pad(np.ones((1, 1), bool), ((4, 0), (0, 9))), np.ones((300, 300), bool)):
        rgba = decode_rle(brush_rle(mask)).reshape(*mask.shape, 4)
        assert (rgba == (mask[..., None] * 255)).all()


def test_yolo_seg_layout_and_format(annotated, tmp_path) -> None:
    """The layout Ultralytics reads (images/ and labels/ with the same relative paths, the images in the masks'
    frame, data.yaml with the class names) and its label format: one line per instance (but one with an empty
    mask), a class index < nc and >= 3 normalised points. How well the polygons fit the masks is checked on given
    masks (test_polygons.py)."""
    import yaml

    out = tmp_path / "yolo"
    assert main(["export", "--format", "yolo-seg", "--input", str(annotated["out"]), "-o", str(out)]) == 0
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["train"] == data["val"] == "images" and data["names"] == {0: "red square", 1: "blue circle"}
    images = sorted(p.relative_to(out / "images") for p in (out / "images").rglob("*") if p.is_file())
    labels = sorted(p.relative_to(out / "labels") for p in (out / "labels").rglob("*.txt"))
    assert [p.with_suffix("") for p in images] == [p.with_suffix("") for p in labels] and len(labels) == 7
    assert main(["export", "--input", str(annotated["out"]), "-o", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    by_name = {im["file_name"]: im for im in coco.dataset["images"]}
    for image in images:
        im = by_name[str(image)]
        with Image.open(out / "images" / image) as img:
            assert img.size == (im["width"], im["height"])
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]])) if a["area"] > 0]
        lines = (out / "labels" / image.with_suffix(".txt")).read_text().splitlines()
        assert len(lines) == len(anns)
        for line, ann in zip(lines, anns):
            values = line.split()
            cls, coords = int(values[0]), np.asarray(values[1:], dtype=np.float64)
            assert 0 <= cls < len(data["names"]) and cls == ann["category_id"] - 1
            assert len(coords) % 2 == 0 and len(coords) >= 6 and coords.min() >= 0 and coords.max() <= 1


def test_images_dir_writes_exif_rotated_images_in_the_masks_frame(annotated, tmp_path) -> None:
    """An image with an EXIF orientation is written with the orientation applied to its pixels and no orientation
    tag (its other EXIF data kept), so a tool that ignores the tag sees the pixels the masks were made on: the
    decoder's. The JPEG is re-encoded (at quality 95), the PNG losslessly."""
    from pipeline.inputs.decode import decode_image

    images = tmp_path / "images"
    assert main(["export", "--input", str(annotated["out"]), "-o", str(tmp_path / "coco.json"), "--images-dir",
                 str(images)]) == 0
    by_name = {im["file_name"]: im for im in json.loads((tmp_path / "coco.json").read_text())["images"]}
    for name, orientation in ROTATED.items():
        source = (annotated["root"] / "photos" / name).read_bytes()
        with Image.open(io.BytesIO(source)) as img:
            stored = img.size
            assert stored == (64, 40) and img.getexif()[0x0112] == orientation
        oriented, _, _ = decode_image(source)  # what the model saw
        assert oriented.shape[:2] == (64, 40)
        with Image.open(images / name) as img:  # no exif_transpose
            assert img.size == (stored[1], stored[0]) == (by_name[name]["width"], by_name[name]["height"])
            exif = img.getexif()
            assert exif.get(0x0112, 1) == 1 and exif.get(0x010F) == "ovsam test camera"
            pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
        diff = np.abs(pixels - oriented.astype(np.int16))
        if name.endswith(".png"):
            assert diff.max() == 0
        else:
            assert diff.mean() < 1.5 and diff.max() <= 10, (diff.mean(), diff.max())
