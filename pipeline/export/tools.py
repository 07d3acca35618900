"""Exports for labelling tools beyond COCO: Label Studio pre-annotation tasks and YOLO segmentation labels, both
made from the COCO export (``pipeline.export.coco.export_coco``), so file names and instances are the same everywhere.

- ``label_studio_tasks``: one task per image, ``{"data": {"image": <prefix + file_name>}, "predictions": [...]}``
  with one ``brushlabels`` result per instance (the mask in Label Studio's own brush RLE, :func:`brush_rle`), or
  ``polygonlabels`` results (points in percent of the image size) with ``polygons``.
- ``write_yolo_seg``: ``labels/<file_name without extension>.txt`` per image (``class x1 y1 x2 y2 ...``, normalised
  to [0, 1]; an instance whose mask has several parts keeps its largest polygon, as a YOLO line holds one) and a
  ``data.yaml`` naming the classes, beside ``images/`` (``--images-dir``) as Ultralytics expects.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from pipeline.export.coco import mask_polygons

BRUSH_WORD_BITS = 8
BRUSH_RUN_BITS = (4, 8, 12, 16)  # the four run-length field widths a Label Studio brush RLE header declares


def brush_rle(mask: np.ndarray) -> list[int]:
    """A boolean ``H x W`` mask in Label Studio's brush RLE: the mask as an RGBA image (255 in all four channels
    inside it, 0 outside), flattened row-major and run-length coded in Label Studio's bit layout: a 32-bit value
    count, the word size less one (5 bits), four run-field widths less one (4 bits each), then per run a repeat flag
    (1), the index of its run-field width (2 bits), the run length less one, and the value (8 bits); the bits are
    packed big-endian into bytes."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    n = flat.size
    bits: list[str] = [format(4 * n, "032b"), format(BRUSH_WORD_BITS - 1, "05b")]
    bits += [format(w - 1, "04b") for w in BRUSH_RUN_BITS]
    if n:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [n]])) * 4  # each pixel is 4 equal values (R, G, B, A)
        longest = 1 << BRUSH_RUN_BITS[-1]
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = format(255 if flat[start] else 0, "08b")
            while length > 0:
                run = min(length, longest)
                j = next(i for i, w in enumerate(BRUSH_RUN_BITS) if run <= 1 << w)
                bits.append("1" + format(j, "02b") + format(run - 1, f"0{BRUSH_RUN_BITS[j]}b") + value)
                length -= run
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return np.packbits(np.frombuffer(stream.encode("ascii"), dtype=np.uint8) - ord("0")).tolist()


def _mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, height, width))).astype(bool)
    return mask_utils.decode({"size": list(seg["size"]), "counts": seg["counts"]}).astype(bool)


def _by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def label_studio_tasks(coco: dict[str, Any], *, image_prefix: str = "", from_name: str = "label",
                       to_name: str = "image", polygons: bool = False, tolerance: float = 1.0,
                       model_version: str = "ovsam") -> list[dict[str, Any]]:
    """Label Studio tasks with predictions (pre-annotations) for every image of a COCO export. The labelling config
    they fit: ``<Image name="{to_name}" value="$image"/>`` with ``<BrushLabels name="{from_name}" ...>`` (or
    ``<PolygonLabels ...>`` with ``polygons``) listing the vocabulary's classes."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = _by_image(coco)
    tasks = []
    for im in coco["images"]:
        h, w = int(im["height"]), int(im["width"])
        results, scores = [], []
        for ann in anns[im["id"]]:
            label = names[ann["category_id"]]
            base = {"from_name": from_name, "to_name": to_name, "original_width": w, "original_height": h,
                    "image_rotation": 0, "score": float(ann.get("score", 1.0))}
            scores.append(base["score"])
            if polygons:
                seg = ann["segmentation"]
                if not isinstance(seg, list):
                    seg = mask_polygons(seg, tolerance)
                for poly in seg:
                    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                    points = [[round(100.0 * x / w, 4), round(100.0 * y / h, 4)] for x, y in pts]
                    results.append({**base, "id": uuid.uuid4().hex[:10], "type": "polygonlabels",
                                    "value": {"points": points, "polygonlabels": [label]}})
            else:
                results.append({**base, "id": uuid.uuid4().hex[:10], "type": "brushlabels",
                                "value": {"format": "rle", "rle": brush_rle(_mask(ann, h, w)),
                                          "brushlabels": [label]}})
        prediction = {"model_version": model_version, "result": results,
                      "score": float(np.mean(scores)) if scores else 0.0}
        tasks.append({"data": {"image": image_prefix + im["file_name"]}, "predictions": [prediction]})
    return tasks


def yolo_lines(coco: dict[str, Any], image: dict[str, Any], anns: list[dict[str, Any]],
               tolerance: float = 1.0) -> list[str]:
    """An image's YOLO-seg label lines: ``class x1 y1 ...`` with the class index (COCO category id - 1) and the
    instance's largest polygon normalised by the image's width and height."""
    h, w = int(image["height"]), int(image["width"])
    lines = []
    for ann in anns:
        seg = ann["segmentation"]
        polys = seg if isinstance(seg, list) else mask_polygons(seg, tolerance)
        if not polys:
            continue
        pts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys]
        largest = max(pts, key=_area)
        norm = np.clip(largest / np.array([w, h], dtype=np.float64), 0.0, 1.0)
        lines.append(" ".join([str(int(ann["category_id"]) - 1)] + [f"{v:.6f}" for v in norm.reshape(-1)]))
    return lines


def _area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def write_yolo_seg(coco: dict[str, Any], out_dir: str, *, storage_options: dict | None = None,
                   tolerance: float = 1.0) -> int:
    """Write ``out_dir/labels/...txt`` for every image of a COCO export and ``out_dir/data.yaml``; returns the
    number of label files. Images go to ``out_dir/images/<file_name>`` (``write_images``), the layout
    Ultralytics reads (``labels/`` beside ``images/``, same relative paths)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out_dir, **dict(storage_options or {}))
    root = root.rstrip("/")
    anns = _by_image(coco)
    for im in coco["images"]:
        stem = im["file_name"].rsplit(".", 1)[0] if "." in im["file_name"].rsplit("/", 1)[-1] else im["file_name"]
        path = f"{root}/labels/{stem}.txt"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            lines = yolo_lines(coco, im, anns[im["id"]], tolerance)
            f.write("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {c['id'] - 1}: {json.dumps(c['name'])}" for c in sorted(coco["categories"],
                                                                                  key=lambda c: c["id"]))
    with fs.open(f"{root}/data.yaml", "w") as f:
        f.write(f"path: {json.dumps(out_dir)}\ntrain: images\nval: images\nnames:\n{names}\n")
    return len(coco["images"])
