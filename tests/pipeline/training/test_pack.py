"""``ovsam pack``: COCO, LVIS, detection, class-folder and SA-1B fixtures packed and read back with the
``webdataset`` library; sharding by count and bytes; resume after a crash equals an uninterrupted run; changed
settings refused; ``classes.json`` as a vocabulary; an S3 round trip through moto's server on 127.0.0.1.

Every fixture is generated here, in temporary directories. Run time: about 20 s on 2 cores (most of it the first
torch import for the vocabulary test and the moto server).
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipeline.training.packers import writer as pack_writer
from pipeline.training.packers.synthetic import pack_synthetic, plan_synthetic
from pipeline.training.packers.coco import plan_coco
from pipeline.training.packers.folders import plan_folders
from pipeline.training.packers.sa1b import plan_sa1b
from pipeline.training.packers.writer import write_plan
from pipeline.training.packers.writer import member_bytes, tar_file_bytes
from schemas.training import ClassesFile, TrainingRecord, index_from_json
from tests.s3server import moto_s3


# ------------------------------------------------------------------------------------------------ helpers


def _image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    """An irregular mask: a rectangle with random pixels flipped off and a few stray pixels on."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[y0: y0 + height // 3, x0: x0 + width // 3] = True
    return mask ^ (rng.random((height, width)) < 0.05)


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written independently of pycocotools: column-major runs, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Each polygon rasterised on its own, then OR-ed (so the packer's merge of the parts is what is tested)."""
    out = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        out |= mask_utils.decode(mask_utils.frPyObjects([poly], height, width)[0]).astype(bool)
    return out


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def read_packed(root: Path) -> dict[str, dict]:
    """Every sample of ``root``'s shards, read with the webdataset library: key -> image bytes, extension,
    validated sidecar, shard name."""
    import webdataset as wds

    shards = sorted(str(p) for p in root.glob("*.tar"))
    out = {}
    for sample in wds.WebDataset(shards, shardshuffle=False):
        key = sample["__key__"]
        assert key not in out, f"duplicate key {key}"
        exts = [k for k in sample if not k.startswith("__") and k != "json"]
        assert len(exts) == 1, sample.keys()
        out[key] = {"image": sample[exts[0]], "ext": exts[0], "json": sample["json"],
                    "record": TrainingRecord.from_json(sample["json"]), "shard": Path(sample["__url__"]).name}
    return out


def read_index(root: Path) -> dict:
    return {name: entry.to_dict() for name, entry in index_from_json((root / "_index.json").read_text()).items()}


def read_classes(root: Path) -> ClassesFile:
    return ClassesFile.from_json((root / "classes.json").read_text())


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def assert_index_matches(root: Path, packed: dict[str, dict]) -> dict:
    """``_index.json`` counts, sizes, hashes and item ranges agree with the shard files and what was read."""
    import hashlib

    index = read_index(root)
    assert sorted(index) == sorted(p.name for p in root.glob("*.tar"))
    per_shard: dict[str, int] = {}
    for sample in packed.values():
        per_shard[sample["shard"]] = per_shard.get(sample["shard"], 0) + 1
    next_item = 0
    for name in sorted(index):
        entry, data = index[name], (root / name).read_bytes()
        assert entry["num_samples"] == per_shard[name]
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["first_item"] == next_item
        next_item += entry["num_items"]
    return index


# ------------------------------------------------------------------------------------------------ COCO


COCO_CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"},
                   {"id": 6, "name": "bus"}]  # listed out of id order on purpose
PERSON, BUS, LIGHT, DOG = 0, 1, 2, 3  # contiguous indices in category-id order


def write_coco(root: Path) -> tuple[Path, Path, dict]:
    """A COCO instances JSON over PNG and JPEG images: polygons (a two-part object), compressed and uncompressed
    RLE, a crowd annotation, a zero-width box, a missing image file and a size mismatch.

    Returns (annotations path, images dir, expected {image id: (file bytes, [(label, xyxy, mask)])})."""
    images_dir = root / "images"
    (images_dir / "sub").mkdir(parents=True)
    images, anns, expected = [], [], {}

    def add_image(image_id, file_name, width, height, fmt="JPEG", write=True, declared=None):
        data = _image_bytes(width, height, image_id, fmt)
        if write:
            (images_dir / file_name).write_bytes(data)
        w, h = declared or (width, height)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        expected[image_id] = (data, [])

    def add_ann(image_id, label, bbox, segmentation, mask, crowd=0, keep=True):
        cat = sorted(c["id"] for c in COCO_CATEGORIES)[label]
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                     "segmentation": segmentation, "area": 1.0, "iscrowd": crowd})
        if keep:
            x, y, w, h = bbox
            expected[image_id][1].append((label, [x, y, x + w, y + h], mask))

    add_image(7, "sub/img7.jpg", 64, 48)
    polys = [[2.0, 3.0, 20.5, 3.0, 20.5, 15.0, 2.0, 15.0], [30.0, 30.0, 40.0, 44.0, 26.0, 44.0]]
    add_ann(7, PERSON, [2.0, 3.0, 38.0, 41.0], polys, _polygon_mask(polys, 48, 64))
    dog = _blob(48, 64, 1)
    add_ann(7, DOG, [1.5, 2.25, 10.0, 8.5], _compressed(dog), dog)
    add_ann(7, PERSON, [0, 0, 64, 48], _uncompressed(_blob(48, 64, 2)), None, crowd=1, keep=False)
    add_image(3, "img3.png", 40, 56, fmt="PNG")
    bus = _blob(56, 40, 3)
    add_ann(3, BUS, [4.0, 5.0, 20.0, 30.0], _uncompressed(bus), bus)
    light = [[5.0, 5.0, 30.0, 8.0, 12.0, 40.0]]
    add_ann(3, LIGHT, [5.0, 5.0, 25.0, 35.0], light, _polygon_mask(light, 56, 40))
    add_image(12, "img12.jpg", 50, 50)
    add_ann(12, PERSON, [3.0, 3.0, 0.0, 9.0], _compressed(_blob(50, 50, 4)), None, keep=False)  # no width
    add_image(20, "img20.jpg", 30, 30)
    bus20 = _blob(30, 30, 5)
    add_ann(20, BUS, [1.0, 1.0, 9.0, 9.0], _compressed(bus20), bus20)
    add_image(15, "missing.jpg", 30, 30, write=False)
    add_ann(15, PERSON, [1.0, 1.0, 5.0, 5.0], _compressed(_blob(30, 30, 6)), _blob(30, 30, 6))
    add_image(16, "img16.jpg", 20, 20, declared=(10, 10))
    add_ann(16, PERSON, [1.0, 1.0, 5.0, 5.0], _compressed(_blob(10, 10, 7)), _blob(10, 10, 7))
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": COCO_CATEGORIES}))
    return path, images_dir, expected


def test_coco_round_trip(tmp_path):
    ann_path, images_dir, expected = write_coco(tmp_path)
    out = tmp_path / "out"
    summary = write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=2, prefix="coco")
    packed = read_packed(out)
    # image 12 lost its only annotation (zero width); 15's file is missing; 16's size disagrees with the JSON
    assert sorted(packed) == ["20", "3", "7"]
    assert summary.skipped == {"crowd_annotation": 1, "degenerate_box": 1, "empty_image": 1, "missing_image": 1,
                               "size_mismatch": 1}
    for key, sample in packed.items():
        data, anns = expected[int(key)]
        rec = sample["record"]
        assert sample["image"] == data  # the original bytes, not re-encoded
        assert sample["ext"] == ("png" if key == "3" else "jpg")
        assert (rec.dataset, rec.kind, rec.source_id, rec.image_labels) == ("coco", "mask", int(key), [])
        height, width = np.asarray(Image.open(io.BytesIO(data))).shape[:2]
        assert (rec.width, rec.height) == (width, height)
        assert rec.labels == [a[0] for a in anns]
        assert rec.boxes == [a[1] for a in anns]
        for rle, (_, _, mask) in zip(rec.masks, anns, strict=True):
            assert rle["size"] == [height, width]
            np.testing.assert_array_equal(_decode(rle), mask)
    # the two-part polygon really is the polygon (not transposed, both parts present)
    person = _decode(packed["7"]["record"].masks[0])
    drawn = Image.new("L", (64, 48))
    ImageDraw.Draw(drawn).polygon([(2, 3), (20.5, 3), (20.5, 15), (2, 15)], fill=1)
    ImageDraw.Draw(drawn).polygon([(30, 30), (40, 44), (26, 44)], fill=1)
    drawn = np.asarray(drawn).astype(bool)
    assert (person & drawn).sum() / (person | drawn).sum() > 0.8
    # items are the non-empty images in id order (3, 7, 15, 16, 20): shard 1 holds 20 and the skipped 15, 16
    index = assert_index_matches(out, packed)
    assert [(e["first_item"], e["num_items"], e["num_samples"]) for e in index.values()] == [(0, 2, 2), (2, 3, 1)]
    assert {s["shard"] for k, s in packed.items() if k in ("3", "7")} == {"coco-000000.tar"}
    classes = read_classes(out)
    assert classes.classes[PERSON].split(",")[:3] == ["person", "child", "girl"]  # built-in COCO synonyms
    assert classes.classes[LIGHT] == "traffic light" and classes.ids == [1, 6, 10, 18]
    assert classes.split == ["base", "novel", "excluded", "novel"] and classes.kind == "mask"


def test_coco_base_only_drops_other_classes_and_emptied_images(tmp_path):
    ann_path, images_dir, expected = write_coco(tmp_path)
    out = tmp_path / "base"
    summary = write_plan(plan_coco(str(ann_path), str(images_dir), base_only=True), str(out), samples_per_shard=10)
    packed = read_packed(out)
    assert sorted(packed) == ["7"]  # 3 (bus, traffic light) and 20 (bus) held no base class
    assert packed["7"]["record"].labels == [PERSON]
    np.testing.assert_array_equal(_decode(packed["7"]["record"].masks[0]), expected[7][1][0][2])
    assert summary.skipped["not_base_annotation"] == 4 and summary.skipped["empty_image"] == 3
    assert len(read_classes(out).classes) == 4 and read_classes(out).split[PERSON] == "base"


LVIS_CATEGORIES = [
    {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
    {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "frequency": "r"},
    {"id": 3, "name": "tape_(sticky_cloth_or_paper)", "synonyms": ["tape_(sticky_cloth_or_paper)"], "frequency": "f"},
]


def write_lvis(root: Path) -> tuple[Path, Path]:
    """LVIS-style: synonyms and frequency per category, images named only by ``coco_url``, no iscrowd field."""
    images_dir = root / "coco"
    images_dir.mkdir()
    images, anns = [], []
    for n, (image_id, cats) in enumerate(((101, [1, 2]), (102, [2]), (103, [3]))):
        name = f"{image_id:012d}.jpg"
        (images_dir / name).write_bytes(_image_bytes(32, 24, n))
        images.append({"id": image_id, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "width": 32, "height": 24})
        for c in cats:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [1, 1, 10, 10],
                         "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]], "area": 100})
    path = root / "lvis_v1_train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": LVIS_CATEGORIES}))
    return path, images_dir


def test_lvis_synonyms_frequency_split_and_base_only(tmp_path):
    ann_path, images_dir = write_lvis(tmp_path)
    write_plan(plan_coco(str(ann_path), str(images_dir)), str(tmp_path / "all"), samples_per_shard=10)
    classes = read_classes(tmp_path / "all")
    assert classes.dataset == "lvis"
    assert classes.classes == ["aerosol can,spray can", "bow (weapon)", "tape (sticky cloth or paper)"]
    assert classes.split == ["base", "novel", "base"]  # rare = novel
    assert {k: s["record"].labels for k, s in read_packed(tmp_path / "all").items()} == {
        "101": [0, 1], "102": [1], "103": [2]}
    summary = write_plan(plan_coco(str(ann_path), str(images_dir), base_only=True), str(tmp_path / "base"),
                         samples_per_shard=10)
    assert {k: s["record"].labels for k, s in read_packed(tmp_path / "base").items()} == {"101": [0], "103": [2]}
    assert summary.skipped == {"not_base_annotation": 2, "empty_image": 1}


def test_split_file_sets_the_split(tmp_path):
    ann_path, images_dir = write_lvis(tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"base": ["bow_(weapon)"], "novel": [1]}))
    write_plan(plan_coco(str(ann_path), str(images_dir), split_file=str(split), base_only=True),
               str(tmp_path / "out"), samples_per_shard=10)
    assert read_classes(tmp_path / "out").split == ["novel", "base", "excluded"]
    assert {k: s["record"].labels for k, s in read_packed(tmp_path / "out").items()} == {"101": [1], "102": [1]}
    split.write_text(json.dumps({"base": [99]}))
    with pytest.raises(ValueError, match="99 is not a category id or name"):
        plan_coco(str(ann_path), str(images_dir), split_file=str(split))


# ------------------------------------------------------------------------------------------------ detection


def write_detection(root: Path) -> tuple[Path, Path, dict]:
    images_dir = root / "o365"
    images_dir.mkdir()
    cats = [{"id": 9, "name": "Lamp, desk"}, {"id": 2, "name": "Sneakers"}, {"id": 5, "name": "Person"}]
    images = [{"id": 1, "file_name": "objects365_1.jpg", "width": 80, "height": 60},
              {"id": 2, "file_name": "objects365_2.jpg", "width": 60, "height": 80}]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10.5, 20.0, 30.0, 15.25], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0.0, 0.0, 80.0, 60.0], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [1.0, 1.0, 5.0, 5.0], "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [3.0, 4.0, 5.0, 6.0]}]
    data = {}
    for n, image in enumerate(images):
        data[image["id"]] = _image_bytes(image["width"], image["height"], 40 + n)
        (images_dir / image["file_name"]).write_bytes(data[image["id"]])
    path = root / "objects365_train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, images_dir, data


def test_detection_boxes_labels_via_cli(tmp_path, capsys):
    from jobs.cli import main

    ann_path, images_dir, data = write_detection(tmp_path)
    out = tmp_path / "out"
    argv = ["pack", "detection", "--annotations", str(ann_path), "--images", str(images_dir), "--output", str(out),
            "--dataset", "objects365", "--samples-per-shard", "1"]
    assert main(argv) == 0
    assert "objects365 (box, 3 classes): 2 samples in 2 shards" in capsys.readouterr().out
    packed = read_packed(out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["objects365-000000.tar", "objects365-000001.tar"]
    # classes in id order 2, 5, 9; the comma inside a name must not split it into synonyms
    assert read_classes(out).classes == ["Sneakers", "Person", "Lamp desk"] and read_classes(out).split is None
    one, two = packed["1"]["record"], packed["2"]["record"]
    assert (one.kind, one.labels, one.masks) == ("box", [1, 2], [])
    assert one.boxes == [[10.5, 20.0, 40.5, 35.25], [0.0, 0.0, 80.0, 60.0]]  # xywh -> xyxy, the crowd box left out
    assert (two.labels, two.boxes, two.width, two.height) == ([0], [[3.0, 4.0, 8.0, 10.0]], 60, 80)
    assert packed["1"]["image"] == data[1] and packed["2"]["image"] == data[2]
    assert_index_matches(out, packed)
    # the same command with another shard size into the same output is refused, naming the change
    assert main(argv[:-1] + ["2"]) == 1
    assert "samples_per_shard: 1 -> 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ class folders


def test_class_folders_with_wordnet_names(tmp_path, caplog):
    root = tmp_path / "in21k"
    files = {"n01440764/n01440764_1.JPEG": _image_bytes(20, 30, 1), "n01440764/n01440764_2.JPEG":
             _image_bytes(30, 20, 2), "n02084071/a.jpg": _image_bytes(16, 16, 3),
             "n02084071/a.png": _image_bytes(17, 15, 4, "PNG"), "my_things/x.y.jpeg": _image_bytes(8, 8, 5)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "n01440764" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("not a class")
    (root / ".cache").mkdir()  # hidden folders are not classes
    (root / ".cache" / "thumb.jpg").write_bytes(_image_bytes(4, 4, 6))
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        summary = write_plan(plan_folders(str(root)), str(out), samples_per_shard=2, prefix="in21k")
    assert "my_things" in caplog.text  # unknown folder names are used as they are, with a warning
    classes = read_classes(out)
    assert classes.classes == ["my things", "tench,Tinca tinca", "dog,domestic dog,Canis familiaris"]
    assert classes.ids == ["my_things", "n01440764", "n02084071"] and classes.kind == "image"
    packed = read_packed(out)
    by_source = {s["record"].source_id: (k, s) for k, s in packed.items()}
    assert sorted(by_source) == sorted(files)
    for source, (key, sample) in by_source.items():
        rec = sample["record"]
        assert sample["image"] == files[source] and "." not in key
        assert rec.image_labels == [classes.ids.index(source.split("/")[0])]
        assert (rec.kind, rec.labels, rec.boxes, rec.masks) == ("image", [], [], [])
        assert (rec.width, rec.height) == Image.open(io.BytesIO(files[source])).size
    assert by_source["n02084071/a.jpg"][0] == "n02084071/a"
    assert by_source["n02084071/a.png"][0].startswith("n02084071/a_png_")  # same stem: the extension joins the key
    assert by_source["n02084071/a.png"][1]["ext"] == "png"
    assert summary.skipped == {"not_an_image_file": 1, "file_outside_class_folder": 1}
    assert [e["num_samples"] for e in assert_index_matches(out, packed).values()] == [2, 2, 1]


# ------------------------------------------------------------------------------------------------ SA-1B


def write_sa1b(root: Path) -> dict:
    """``sa_1`` with three masks, ``sa_2`` with one mask and one zero-height box, ``sa_3.jpg`` without JSON."""
    root.mkdir(parents=True)
    expected = {}
    for n, width, height, count in ((1, 48, 32, 3), (2, 40, 40, 1)):
        data = _image_bytes(width, height, 100 + n)
        (root / f"sa_{n}.jpg").write_bytes(data)
        anns, masks = [], []
        for j in range(count):
            mask = _blob(height, width, 10 * n + j)
            ys, xs = np.nonzero(mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            anns.append({"id": j, "segmentation": _compressed(mask), "bbox": bbox, "area": int(mask.sum()),
                         "predicted_iou": 0.9, "point_coords": [[1.0, 1.0]], "stability_score": 0.95})
            masks.append((mask, [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]))
        if n == 2:
            anns.append({"id": 9, "segmentation": _compressed(_blob(height, width, 99)), "bbox": [1, 1, 5, 0]})
        meta = {"image": {"image_id": n, "width": width, "height": height, "file_name": f"sa_{n}.jpg"},
                "annotations": anns}
        (root / f"sa_{n}.json").write_text(json.dumps(meta))
        expected[f"sa_{n}"] = (data, masks)
    (root / "sa_3.jpg").write_bytes(_image_bytes(8, 8, 3))
    return expected


def check_sa1b(packed: dict, expected: dict) -> None:
    assert sorted(packed) == sorted(expected)
    for key, (data, masks) in expected.items():
        rec = packed[key]["record"]
        assert packed[key]["image"] == data and rec.source_id == int(key[3:])
        assert rec.kind == "mask" and rec.labels == [-1] * len(masks)
        assert rec.boxes == [m[1] for m in masks]
        for rle, (mask, _) in zip(rec.masks, masks, strict=True):
            np.testing.assert_array_equal(_decode(rle), mask)


def test_sa1b_class_agnostic_masks(tmp_path):
    expected = write_sa1b(tmp_path / "sa1b")
    out = tmp_path / "out"
    summary = write_plan(plan_sa1b(str(tmp_path / "sa1b")), str(out), samples_per_shard=1, prefix="sa1b")
    packed = read_packed(out)
    check_sa1b(packed, expected)
    assert summary.skipped == {"image_without_json": 1, "degenerate_box": 1}
    assert read_classes(out).classes == [] and read_classes(out).kind == "mask"
    assert_index_matches(out, packed)


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_train_and_heldout(tmp_path):
    summaries = pack_synthetic(str(tmp_path / "syn"), kind="mask", num_train=5, num_heldout=3, seed=1,
                               samples_per_shard=2)
    assert {k: (s.samples, s.shards) for k, s in summaries.items()} == {"train": (5, 3), "heldout": (3, 2)}
    train, heldout = read_packed(tmp_path / "syn" / "train"), read_packed(tmp_path / "syn" / "heldout")
    assert len(train) == 5 and len(heldout) == 3
    assert not {s["image"] for s in train.values()} & {s["image"] for s in heldout.values()}
    sizes = set()
    for split, samples in (("train", train), ("heldout", heldout)):
        classes = read_classes(tmp_path / "syn" / split)
        assert len(classes.classes) == 12 and classes.classes[0] == "red square"
        assert_index_matches(tmp_path / "syn" / split, samples)
        for sample in samples.values():
            rec = sample["record"]
            image = np.asarray(Image.open(io.BytesIO(sample["image"])))
            sizes.add(image.shape[:2])
            assert image.shape[:2] == (rec.height, rec.width) and rec.labels and len(rec.masks) == len(rec.boxes)
            for rle, box in zip(rec.masks, rec.boxes, strict=True):
                ys, xs = np.nonzero(_decode(rle))
                assert box == [xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]
    assert len(sizes) > 1
    # image-level: the class of the scene's object; box-level: no masks; the same seed draws the same scenes
    image_level = read_packed_plan(plan_synthetic("image", 3, seed=1))
    box_level = read_packed_plan(plan_synthetic("box", 3, seed=1))
    for i in range(3):
        assert len(image_level[i].record.image_labels) == 1 and image_level[i].record.boxes == []
        assert box_level[i].record.masks == [] and box_level[i].record.boxes
    assert read_packed_plan(plan_synthetic("box", 3, seed=1))[2].image == box_level[2].image


def read_packed_plan(plan) -> list:
    return [plan.load(item) for item in plan.items]


# ------------------------------------------------------------------------------------------------ sharding


def test_sharding_by_bytes_is_greedy_and_bounded(tmp_path):
    plan = plan_synthetic("box", 9, seed=2)
    whole = tmp_path / "whole"
    write_plan(plan, str(whole), samples_per_shard=100)
    sizes = {k: member_bytes(len(s["image"])) + member_bytes(len(s["json"]))
             for k, s in read_packed(whole).items()}
    limit = tar_file_bytes(int(2.5 * np.mean(list(sizes.values()))))
    out = tmp_path / "bytes"
    write_plan(plan, str(out), samples_per_shard=None, max_shard_bytes=limit)
    packed = read_packed(out)
    assert list(packed) == list(read_packed(whole))  # same samples, same order
    index = assert_index_matches(out, packed)
    assert len(index) > 2 and max(e["num_samples"] for e in index.values()) >= 2
    keys = list(packed)
    pos = 0
    for name in sorted(index):
        n = index[name]["num_samples"]
        content = sum(sizes[k] for k in keys[pos: pos + n])
        assert index[name]["bytes"] == tar_file_bytes(content) <= limit
        if pos + n < len(keys):  # the next sample would not have fitted
            assert tar_file_bytes(content + sizes[keys[pos + n]]) > limit
        pos += n
    both = tmp_path / "both"  # whichever limit comes first
    write_plan(plan, str(both), samples_per_shard=1, max_shard_bytes=limit)
    assert [e["num_samples"] for e in read_index(both).values()] == [1] * 9


# ------------------------------------------------------------------------------------------------ resume


class Crash(Exception):
    pass


def test_resume_after_crash_mid_shard_equals_uninterrupted_run(tmp_path, monkeypatch):
    ann_path, images_dir, _ = write_coco(tmp_path)
    plan = plan_coco(str(ann_path), str(images_dir))
    write_plan(plan, str(tmp_path / "ref"), samples_per_shard=1)
    reference = snapshot(tmp_path / "ref")
    assert len(read_index(tmp_path / "ref")) == 3

    calls = {"n": 0}
    original = pack_writer._OpenShard.write

    def crashing_write(self, key, members):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash("killed while writing the third shard")
        return original(self, key, members)

    out = tmp_path / "out"
    monkeypatch.setattr(pack_writer._OpenShard, "write", crashing_write)
    with pytest.raises(Crash):
        write_plan(plan, str(out), samples_per_shard=1)
    assert len(read_index(out)) == 2 and not list(out.glob("*.tmp"))
    monkeypatch.setattr(pack_writer._OpenShard, "write", original)
    summary = write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=1)
    assert (summary.shards_kept, summary.shards_written, summary.samples_written) == (2, 1, 1)
    assert snapshot(out) == reference


def test_resume_rewrites_a_shard_moved_into_place_before_its_index_entry(tmp_path, monkeypatch):
    plan = plan_synthetic("mask", 7, seed=3)
    write_plan(plan, str(tmp_path / "ref"), samples_per_shard=3)
    reference = snapshot(tmp_path / "ref")

    original = pack_writer._write_text
    index_writes = {"n": 0}

    def crashing_write_text(fs, path, text):
        if path.endswith("_index.json"):
            index_writes["n"] += 1
            if index_writes["n"] == 2:
                raise Crash("killed between moving shard 1 into place and recording it")
        return original(fs, path, text)

    out = tmp_path / "out"
    monkeypatch.setattr(pack_writer, "_write_text", crashing_write_text)
    with pytest.raises(Crash):
        write_plan(plan, str(out), samples_per_shard=3)
    monkeypatch.setattr(pack_writer, "_write_text", original)
    assert sorted(read_index(out)) == ["shard-000000.tar"] and (out / "shard-000001.tar").exists()
    (out / "shard-000001.tar").write_bytes(b"partial garbage")  # whatever is there without an entry is redone
    summary = write_plan(plan_synthetic("mask", 7, seed=3), str(out), samples_per_shard=3)
    assert (summary.shards_kept, summary.shards_written) == (1, 2)
    assert snapshot(out) == reference


def test_changed_source_or_foreign_output_is_refused(tmp_path):
    ann_path, images_dir = write_lvis(tmp_path)
    out = tmp_path / "out"
    write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=2)
    data = json.loads(ann_path.read_text())
    data["annotations"][0]["bbox"] = [2, 2, 10, 10]
    ann_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotations_sha256"):
        write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=2)
    with pytest.raises(ValueError, match="base_only: False -> True"):
        write_plan(plan_coco(str(ann_path), str(images_dir), base_only=True), str(out), samples_per_shard=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "_index.json").write_text("{}")
    with pytest.raises(ValueError, match="no classes.json"):
        write_plan(plan_coco(str(ann_path), str(images_dir)), str(foreign), samples_per_shard=2)
    (out / "shard-000000.tar").unlink()
    data["annotations"][0]["bbox"] = [1, 1, 10, 10]  # back to the packed source
    ann_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is missing"):
        write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=2)


# ------------------------------------------------------------------------------------------------ readers


def test_annotation_reader_detects_truncated_packed_shards(tmp_path):
    from pipeline.inputs.sources import iter_samples, read_expected_count

    ann_path, images_dir = write_lvis(tmp_path)
    out = tmp_path / "out"
    write_plan(plan_coco(str(ann_path), str(images_dir)), str(out), samples_per_shard=2, prefix="lvis")
    shard = out / "lvis-000000.tar"
    assert read_expected_count(str(shard)) == 2
    reader = iter_samples(str(shard))
    assert len(list(reader)) == 2 and not reader.report.truncated
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    reader = iter_samples(str(shard))
    list(reader)
    assert reader.report.truncated and reader.report.expected == 2


def test_classes_json_as_vocabulary(tmp_path):
    import open_clip
    import torch

    from ovsam import Vocabulary

    ann_path, images_dir = write_lvis(tmp_path)
    write_plan(plan_coco(str(ann_path), str(images_dir)), str(tmp_path / "lvis"), samples_per_shard=10)
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8,
                                                                          image_size=64),
                          text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2,
                                                         layers=1), quick_gelu=True).eval()
    tok = open_clip.get_tokenizer("RN50x16-quickgelu")
    vocab = Vocabulary.resolve(str(tmp_path / "lvis" / "classes.json"), clip, tokenizer=tok, clip_model="tiny",
                               progress=False)
    assert vocab.names == ["aerosol can", "bow (weapon)", "tape (sticky cloth or paper)"]
    assert vocab.synonyms[0] == ["aerosol can", "spray can"] and vocab.split.tolist() == [1, 2, 1]
    same = Vocabulary.from_names([["aerosol can", "spray can"], ["bow (weapon)"], ["tape (sticky cloth or paper)"]],
                                 clip, tokenizer=tok, clip_model="tiny", progress=False, split=[1, 2, 1])
    assert torch.equal(vocab.embeddings, same.embeddings)
    write_sa1b(tmp_path / "sa1b")
    write_plan(plan_sa1b(str(tmp_path / "sa1b")), str(tmp_path / "sa"), samples_per_shard=10)
    with pytest.raises(ValueError, match="class-agnostic"):
        Vocabulary.resolve(str(tmp_path / "sa" / "classes.json"), clip, tokenizer=tok, clip_model="tiny")
    ambiguous = tmp_path / "ambiguous.json"
    ambiguous.write_text(ClassesFile(dataset="x", kind="image", classes=["crane,bird", "crane,lifting device", "ox"],
                                     ids=["n01", "n02", "n03"]).to_json())
    assert Vocabulary.read_classes_json(ambiguous) == (
        ["crane (n01)", "crane (n02)", "ox"], [["crane", "bird"], ["crane", "lifting device"], ["ox"]], None)


# ------------------------------------------------------------------------------------------------ S3


ACCESS_KEY = "ovsam-pack-test-key"
SECRET_KEY = f"ovsam-pack-test-secret-{uuid.uuid4().hex}"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with dummy credentials in the environment for this module only."""
    with moto_s3(ACCESS_KEY, SECRET_KEY, REGION) as endpoint:
        yield endpoint


def test_s3_round_trip_equals_local_pack(tmp_path, s3_endpoint):
    import boto3
    import s3fs

    from pipeline.inputs.sources import read_expected_count

    storage = {"key": ACCESS_KEY, "secret": SECRET_KEY,
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": REGION}}
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
    for bucket in ("pack-in", "pack-out"):
        client.create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(**storage)
    expected = write_sa1b(tmp_path / "sa1b")
    fs.put(str(tmp_path / "sa1b") + "/", "pack-in/sa1b/", recursive=True)
    local = tmp_path / "local"
    write_plan(plan_sa1b(str(tmp_path / "sa1b")), str(local), samples_per_shard=1, prefix="sa1b")

    url = "s3://pack-out/sa1b"
    summary = write_plan(plan_sa1b("s3://pack-in/sa1b", storage_options=storage), url, storage_options=storage,
                         samples_per_shard=1, prefix="sa1b")
    assert (summary.samples, summary.shards_written) == (2, 2)
    down = tmp_path / "down"
    fs.invalidate_cache()
    fs.get("pack-out/sa1b/", str(down) + "/", recursive=True)
    assert sorted(p.name for p in down.iterdir()) == ["_index.json", "classes.json", "sa1b-000000.tar",
                                                      "sa1b-000001.tar"]
    for name in ("sa1b-000000.tar", "sa1b-000001.tar"):
        assert (down / name).read_bytes() == (local / name).read_bytes()
        assert read_expected_count(f"{url}/{name}", storage) == 1
    assert read_index(down) == read_index(local)
    check_sa1b(read_packed(down), expected)
    again = write_plan(plan_sa1b("s3://pack-in/sa1b", storage_options=storage), url, storage_options=storage,
                       samples_per_shard=1, prefix="sa1b")
    assert (again.shards_kept, again.shards_written) == (2, 0)
    shutil.rmtree(down)


@pytest.mark.parametrize("text, size", [("4096", 4096), ("500MB", 500 * 10**6), ("1GiB", 2**30), ("1e9", 10**9),
                                        ("64k", 64000), ("2 MiB", 2 * 2**20)])
def test_shard_size_option(text, size):
    from jobs.pack import parse_size

    assert parse_size(text) == size


def test_shard_size_option_rejects_garbage():
    import argparse

    from jobs.pack import parse_size

    with pytest.raises(argparse.ArgumentTypeError, match="500MB"):
        parse_size("lots")
