"""Polygons of given masks, rasterised back the way the tools that import them do: COCO polygons (``--polygons``,
``cvat``) with pycocotools, YOLO-seg lines with OpenCV's ``fillPoly`` at the image size from the normalised
coordinates (as Ultralytics' ``polygon2mask`` does). Every part of a mask keeps >= 90% of its pixels and the IoU
with the mask (holes filled) is >= 0.9, down to 3x3 blocks, 40-pixel blobs and 1-pixel-wide straight and diagonal
lines, at several image sizes.

The masks are constructed (NumPy's seeded generator draws the same on every CPU), committed as an annotation output
by hand with one tar shard of images, so nothing depends on a model's numerics.
"""

from __future__ import annotations

import json
from collections import Counter

import cv2
import fsspec
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from jobs.cli import main
from pipeline.annotate.ledger import write_run_json
from pipeline.annotate.sinks import commit_shard
from pipeline.export.coco import mask_polygons
from pipeline.export.tools import join_parts
from pipeline.inputs.shard_io import ShardReadReport

from tests.pipeline.corpus import CorpusCase, good_jpeg, tar_bytes

SIZES = {"s0": (20, 30), "s1": (333, 517), "s2": (1000, 1503)}  # key -> (height, width)
SHARD = "shard-000000"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _blob(rng: np.random.Generator, n: int, shape: tuple[int, int], start: tuple[int, int]) -> np.ndarray:
    """An irregular 8-connected part of ``n`` pixels grown from ``start`` in random steps."""
    m = np.zeros(shape, dtype=bool)
    m[start] = True
    pixels = [start]
    while len(pixels) < n:
        y, x = pixels[int(rng.integers(len(pixels)))]
        dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
        if 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1] and not m[y + dy, x + dx]:
            m[y + dy, x + dx] = True
            pixels.append((y + dy, x + dx))
    return m


def _masks(h: int, w: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """``(name, mask)`` for an ``h x w`` image: small blocks, irregular blobs, 1-pixel-wide lines, masks of 2, 3 and
    many parts and, on the larger images, discs with and without speckles."""
    rng = np.random.default_rng(seed)

    def canvas(*where: tuple) -> np.ndarray:
        m = np.zeros((h, w), dtype=bool)
        for index in where:
            m[index] = True
        return m

    steps = np.arange(min(h, w, 40) - 4)
    three = _blob(rng, 40, (h, w), (h // 2, 2 * w // 3)) | canvas(np.s_[h - 2, 1:8], np.s_[1:3, w - 3:w - 1])
    speckles = np.zeros((h, w), dtype=bool)
    speckles[h // 4:h // 4 + 12, w // 4:w // 4 + 12] = rng.random((min(12, h - h // 4), 12)) < 0.25
    out = [("3x3 in the corner", canvas(np.s_[:3, :3])), ("5x5 in the corner", canvas(np.s_[h - 5:, w - 5:])),
           ("5x5", canvas(np.s_[h // 2 - 2:h // 2 + 3, w // 2 - 2:w // 2 + 3])),
           ("one pixel", canvas(np.s_[h // 3, w // 3])),
           ("blob of 40", _blob(rng, 40, (h, w), (h // 2, w // 3))),
           ("blob of 200", _blob(rng, 200, (h, w), (h // 2, w // 2))),
           ("row line", canvas(np.s_[h // 2, 2:min(w - 2, 60)])),
           ("column line", canvas(np.s_[1:min(h - 1, 60), w // 3])), ("top row", canvas(np.s_[0, :])),
           ("diagonal line", canvas((2 + steps, 3 + steps))),
           ("anti-diagonal line", canvas((2 + steps, w - 3 - steps))),
           ("two parts", canvas(np.s_[1:4, 1:4], np.s_[h - 6:h - 1, w - 6:w - 1])),
           ("three parts", three), ("speckles", speckles)]
    if min(h, w) > 100:
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.3 * min(h, w)) ** 2
        specks = np.zeros((h, w), dtype=bool)  # across the edge of the disc: holes inside it, parts outside
        specks[h // 2 - 30:h // 2 + 30, w // 2 + int(0.3 * min(h, w)) - 30:][:, :60] = rng.random((60, 60)) < 0.05
        out += [("disc", disc), ("speckled disc", disc ^ specks)]
    return out


def _parts(m: np.ndarray) -> list[np.ndarray]:
    n, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
    return [labels == i for i in range(1, n)]


def _filled(m: np.ndarray) -> np.ndarray:
    """``m`` with its holes filled (polygons hold none): what is not reached from the border through background."""
    outside = np.ascontiguousarray(np.pad(~m, 1, constant_values=True), dtype=np.uint8)
    cv2.floodFill(outside, None, (0, 0), 2)
    return (outside != 2)[1:-1, 1:-1]


def _fill_yolo(coords: np.ndarray, h: int, w: int) -> np.ndarray:
    """A YOLO-seg polygon (normalised) rasterised at the image size as Ultralytics does: ``fillPoly`` of the
    points scaled by the image size and cast to int32."""
    out = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(out, [(coords.reshape(-1, 2) * [w, h]).astype(np.int32)], 1)
    return out.astype(bool)


def _fill_coco(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def _check(back: np.ndarray, m: np.ndarray, what: str) -> None:
    for part in _parts(m):
        assert (back & part).sum() >= 0.9 * part.sum(), f"{what}: {(back & part).sum()} of {part.sum()} pixels"


@pytest.fixture(scope="module")
def given(tmp_path_factory) -> dict:
    """An annotation output of one tar shard (an image per size) whose instances are the masks of ``_masks``."""
    root = tmp_path_factory.mktemp("given")
    tar = root / f"{SHARD}.tar"
    tar.write_bytes(tar_bytes([CorpusCase(key, {"jpg": good_jpeg(w, h)}, "ok") for key, (h, w) in SIZES.items()]))
    out, fs = root / "out", fsspec.filesystem("file")
    masks, image_rows, instance_rows = {}, [], []
    for seed, (key, (h, w)) in enumerate(SIZES.items()):
        masks[key] = _masks(h, w, seed)
        image_rows.append({"image_key": key, "shard": SHARD, "status": "ok", "error": None, "width": w, "height": h,
                           "num_instances": len(masks[key]), "num_prompts": len(masks[key]),
                           "num_prompts_dropped": 0, "source_format": "jpeg", "source_name": f"{key}.jpg"})
        for j, (_, m) in enumerate(masks[key]):
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            instance_rows.append({
                "image_key": key, "shard": SHARD, "instance_index": j, "prompt_type": "box", "prompt_box_xyxy": box,
                "prompt_points": None, "prompt_point_labels": None, "box_xyxy": box, "mask_rle": _rle(m),
                "area": int(m.sum()), "mask_quality": 0.9, "label": j % 2, "label_name": ["thing", "stuff"][j % 2],
                "label_score": 0.5, "background_score": 0.01, "topk_labels": [j % 2], "topk_scores": [0.5],
                "detector_score": None, "detector_label": None, "head_embedding": None, "clip_embedding": None,
                "clip_valid": None})
    report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
    commit_shard(fs, str(out), SHARD, instance_rows, image_rows, input_url=str(tar), config_hash="given",
                 read_report=report, attempt_id="a")
    write_run_json(fs, str(out), {"config_hash": "given", "config": {"inputs": [str(tar)]},
                                  "vocabulary": {"names": ["thing", "stuff"]}})
    return {"out": out, "masks": masks}


def _yolo_export(given: dict, tmp_path) -> dict[str, list[np.ndarray]]:
    out = tmp_path / "yolo"
    assert main(["export", "--format", "yolo-seg", "--input", str(given["out"]), "-o", str(out)]) == 0
    lines = {}
    for key in SIZES:
        text = (out / "labels" / SHARD / f"{key}.txt").read_text().splitlines()
        lines[key] = [np.asarray(line.split()[1:], dtype=np.float64) for line in text]
        assert [int(line.split()[0]) for line in text] == [j % 2 for j in range(len(given["masks"][key]))]
    return lines


def test_yolo_seg_polygons_keep_small_and_thin_masks(given, tmp_path) -> None:
    """Each line, rasterised at the image size as Ultralytics does, keeps >= 90% of its mask's pixels with an IoU
    >= 0.9; a mask with several parts keeps >= 90% of each part."""
    lines = _yolo_export(given, tmp_path)
    for key, (h, w) in SIZES.items():
        assert len(lines[key]) == len(given["masks"][key])
        for coords, (name, m) in zip(lines[key], given["masks"][key]):
            what = f"{key} {w}x{h} {name}"
            assert len(coords) >= 6 and len(coords) % 2 == 0 and coords.min() >= 0 and coords.max() <= 1, what
            back = _fill_yolo(coords, h, w)
            _check(back, m, what)
            if len(_parts(m)) == 1:
                assert _iou(back, _filled(m)) >= 0.9, (what, _iou(back, _filled(m)))


def test_yolo_seg_joins_every_part_into_one_polygon(given, tmp_path) -> None:
    """Masks of 2, 3 and many parts are one polygon each (a YOLO line holds one) that covers every part; the
    bridges between parts have no width, so pycocotools rasterises the polygon to the mask (IoU >= 0.9)."""
    lines = _yolo_export(given, tmp_path)
    seen = 0
    for key, (h, w) in SIZES.items():
        for coords, (name, m) in zip(lines[key], given["masks"][key]):
            if len(_parts(m)) < 2:
                continue
            seen += 1
            what = f"{key} {w}x{h} {name} ({len(_parts(m))} parts)"
            _check(_fill_yolo(coords, h, w), m, what)
            back = _fill_coco([(coords.reshape(-1, 2) * [w, h]).reshape(-1).tolist()], h, w)
            _check(back, m, what)
            assert _iou(back, _filled(m)) >= 0.9, (what, _iou(back, _filled(m)))
    assert seen >= 3 * len(SIZES)


def test_coco_polygons_rerasterise_to_the_masks(given, tmp_path) -> None:
    """``--format cvat`` (COCO with polygons): pycocotools rasterises each annotation back to its mask."""
    path = tmp_path / "cvat.json"
    assert main(["export", "--format", "cvat", "--input", str(given["out"]), "-o", str(path)]) == 0
    coco = json.loads(path.read_text())
    images = {im["id"]: im for im in coco["images"]}
    anns = iter(coco["annotations"])
    for key, (h, w) in SIZES.items():
        for name, m in given["masks"][key]:
            ann = next(anns)
            im = images[ann["image_id"]]
            assert im["file_name"] == f"{SHARD}/{key}.jpg" and (im["height"], im["width"]) == (h, w)
            polygons = ann["segmentation"]
            assert isinstance(polygons, list) and len(polygons) == len(_parts(m)), name
            back = _fill_coco(polygons, h, w)
            what = f"{key} {w}x{h} {name}"
            _check(back, m, what)
            assert _iou(back, _filled(m)) >= 0.9, (what, _iou(back, _filled(m)))


def test_ultralytics_reads_the_yolo_seg_export(given, tmp_path) -> None:
    """Where Ultralytics is installed (it is no dependency of this project): its label check finds every image and
    label and no corrupt one, and the segments it reads, rasterised by its ``polygon2mask``, cover every part."""
    pytest.importorskip("ultralytics")
    from ultralytics.data.utils import polygon2mask, verify_image_label

    lines = _yolo_export(given, tmp_path)
    out = tmp_path / "yolo"
    for key, (h, w) in SIZES.items():
        im_file, lb_file = out / "images" / SHARD / f"{key}.jpg", out / "labels" / SHARD / f"{key}.txt"
        result = verify_image_label((str(im_file), str(lb_file), "", False, 2, 0, 0, False))
        _, labels, shape, segments, _, missing, found, empty, corrupt, msg = result
        assert (missing, found, empty, corrupt) == (0, 1, 0, 0) and tuple(shape) == (h, w), msg
        assert len(segments) == len(lines[key]) == len(given["masks"][key])
        for segment, (name, m) in zip(segments, given["masks"][key]):
            back = polygon2mask((h, w), [(segment * [w, h]).reshape(-1)]).astype(bool)
            _check(back, m, f"{key} {name}")


@pytest.mark.parametrize("size", [(20, 30), (97, 61), (480, 640)])
def test_small_irregular_parts_keep_their_pixels(size) -> None:
    """Irregular blobs of 10 to 60 pixels (the part that lost 20% of its pixels to a simplified outline), straight
    from ``mask_polygons`` and ``yolo_lines``: >= 90% of the pixels kept and IoU >= 0.9, with either rasteriser."""
    from pipeline.export.tools import yolo_lines

    h, w = size
    rng = np.random.default_rng(h)
    for n in [10, 20, 40, 40, 40, 40, 60] * 6:
        m = _blob(rng, n, (h, w), (int(rng.integers(h)), int(rng.integers(w))))
        what = f"{w}x{h} blob of {n}"
        polygons = mask_polygons(_rle(m))
        back = _fill_coco(polygons, h, w)
        _check(back, m, what)
        assert _iou(back, _filled(m)) >= 0.9, what
        (line,) = yolo_lines({}, {"height": h, "width": w}, [{"segmentation": _rle(m), "category_id": 1}])
        back = _fill_yolo(np.asarray(line.split()[1:], dtype=np.float64), h, w)
        _check(back, m, what)
        assert _iou(back, _filled(m)) >= 0.9, what


def _square(x: float, y: float, size: float) -> np.ndarray:
    return np.array([[x, y], [x, y + size], [x + size, y + size], [x + size, y]], dtype=np.float64)


def test_join_parts_walks_each_part_once_and_each_bridge_out_and_back() -> None:
    parts = [_square(0, 0, 2), _square(20, 1, 5), _square(1, 12, 3), _square(30, 30, 1)]
    joined = join_parts(parts)
    edges = Counter((tuple(p), tuple(q)) for p, q in zip(joined, np.roll(joined, -1, axis=0)))
    own = {(tuple(p), tuple(q)) for part in parts for p, q in zip(part, np.roll(part, -1, axis=0))}
    assert all(edges[e] == 1 for e in own)  # every part all round, in its own direction
    bridges = [e for e in edges if e not in own]
    assert len(bridges) == 2 * (len(parts) - 1) and all(edges[(q, p)] == 1 for p, q in bridges)
    part_of = {tuple(v): i for i, part in enumerate(parts) for v in part}
    for p, q in bridges:  # between the closest vertices of the two parts
        a, b = parts[part_of[p]], parts[part_of[q]]
        closest = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min()
        assert np.hypot(p[0] - q[0], p[1] - q[1]) == pytest.approx(closest)
    assert np.array_equal(join_parts(parts[:1]), parts[0])


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
    polygons = mask_polygons(_rle(m), tolerance=1.0)
    assert len(polygons) == (2 if shape == "two_parts" else 1)
    back = _fill_coco(polygons, h, w)
    filled = m if shape != "ring" else (yy - 60) ** 2 + (xx - 80) ** 2 < 50 ** 2  # COCO polygons hold no holes
    assert _iou(back, filled) >= 0.9
