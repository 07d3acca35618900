"""Exports for labelling tools beyond COCO: Label Studio pre-annotation tasks and YOLO segmentation labels, both
made from the COCO export (``pipeline.export.coco.export_coco``), so file names and instances are the same everywhere.

- ``label_studio_tasks``: one task per image, ``{"data": {"image": <prefix + file_name>}, "predictions": [...]}``
  with one ``brushlabels`` result per instance (the mask in Label Studio's own brush RLE, :func:`brush_rle`), or
  ``polygonlabels`` results (points in percent of the image size) with ``polygons``.
- ``write_yolo_seg``: ``labels/<file_name without extension>.txt`` per image (``class x1 y1 x2 y2 ...``, normalised
  to [0, 1]; the polygons are the COCO export's, :func:`pipeline.export.coco.mask_polygons`, and a mask with several
  parts keeps them all, joined into the one polygon a YOLO line holds by :func:`join_parts`) and a ``data.yaml``
  naming the classes, beside ``images/`` (``--images-dir``) as Ultralytics expects.
"""

from __future__ import annotations

import hashlib
import json
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


def result_id(file_name: str, annotation_id: Any, part: int = 0) -> str:
    """A Label Studio result id that is the same in every export of the same output: 10 hex digits of the sha1 of
    the image's file name, the COCO annotation id and the polygon's index."""
    return hashlib.sha1(f"{file_name}#{annotation_id}#{part}".encode("utf-8")).hexdigest()[:10]


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
                for k, poly in enumerate(seg):
                    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                    points = [[round(100.0 * x / w, 4), round(100.0 * y / h, 4)] for x, y in pts]
                    results.append({**base, "id": result_id(im["file_name"], ann["id"], k), "type": "polygonlabels",
                                    "value": {"points": points, "polygonlabels": [label]}})
            else:
                results.append({**base, "id": result_id(im["file_name"], ann["id"]), "type": "brushlabels",
                                "value": {"format": "rle", "rle": brush_rle(_mask(ann, h, w)),
                                          "brushlabels": [label]}})
        prediction = {"model_version": model_version, "result": results,
                      "score": float(np.mean(scores)) if scores else 0.0}
        tasks.append({"data": {"image": image_prefix + im["file_name"]}, "predictions": [prediction]})
    return tasks


def yolo_lines(coco: dict[str, Any], image: dict[str, Any], anns: list[dict[str, Any]],
               tolerance: float = 1.0) -> list[str]:
    """An image's YOLO-seg label lines: ``class x1 y1 ...`` with the class index (COCO category id - 1) and the
    instance's polygon normalised by the image's width and height: its polygons (the annotation's, or
    :func:`~pipeline.export.coco.mask_polygons` of its RLE mask) joined into one by :func:`join_parts`."""
    h, w = int(image["height"]), int(image["width"])
    lines = []
    for ann in anns:
        seg = ann["segmentation"]
        polys = seg if isinstance(seg, list) else mask_polygons(seg, tolerance)
        parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys if len(p) >= 6]
        if not parts:
            continue
        norm = np.clip(join_parts(parts) / np.array([w, h], dtype=np.float64), 0.0, 1.0)
        lines.append(" ".join([str(int(ann["category_id"]) - 1)] + [f"{v:.6f}" for v in norm.reshape(-1)]))
    return lines


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """One polygon (``N x 2``) through every part (closed polygons, ``N_i x 2``), as Ultralytics' COCO converter
    joins a multi-part mask into one YOLO segment: the parts form a chain, each joined to the next by a bridge
    between their closest vertices that the outline walks out and later back along, so the bridge has no width and
    every part keeps its own area. The chain starts at the largest part and goes on to the part whose centroid is
    nearest the last one's. The walk goes around each part from its entry vertex to the vertex of the next bridge,
    crosses, and after the last part (walked all round) comes back the same way, finishing each part's round."""
    if len(parts) == 1:
        return parts[0]
    order = _chain(parts)
    chain = [parts[i] for i in order]
    links = [_closest_vertices(a, b) for a, b in zip(chain, chain[1:])]  # (vertex in a, vertex in b)
    entry = [links[0][0]] + [b for _, b in links]  # where the walk enters each part (the first: its bridge vertex)
    leave = [a for a, _ in links]  # where it leaves for the next part
    out, back = [], []
    for i, part in enumerate(chain[:-1]):
        n = len(part)
        there = (leave[i] - entry[i]) % n
        out.append(part[(entry[i] + np.arange(there + 1)) % n])  # entry .. leave
        back.append(part[(leave[i] + np.arange(n - there + 1)) % n])  # leave .. entry (all round if they are one)
    last = chain[-1]
    out.append(last[(entry[-1] + np.arange(len(last) + 1)) % len(last)])  # all round
    return np.concatenate(out + back[::-1])[:-1]  # the walk ends where it began: that vertex once


def _chain(parts: list[np.ndarray]) -> list[int]:
    """The order in which :func:`join_parts` visits ``parts``: the largest first, then each time the remaining part
    whose centroid (of its vertices) is nearest the last one's (the first of equals)."""
    centres = np.array([p.mean(axis=0) for p in parts])
    areas = np.array([_area(p) for p in parts])
    order = [int(np.argmax(areas))]
    left = np.ones(len(parts), dtype=bool)
    left[order[0]] = False
    for _ in range(len(parts) - 1):
        d = ((centres - centres[order[-1]]) ** 2).sum(axis=1)
        d[~left] = np.inf
        order.append(int(np.argmin(d)))
        left[order[-1]] = False
    return order


def _closest_vertices(a: np.ndarray, b: np.ndarray, block: int = 1 << 20) -> tuple[int, int]:
    """Indices ``(i, j)`` of the closest pair of vertices ``a[i]``, ``b[j]`` (first of the ties); the distances are
    computed ``block`` at a time, so memory stays bounded for long outlines."""
    best, pair = np.inf, (0, 0)
    rows = max(1, block // max(len(b), 1))
    for s in range(0, len(a), rows):
        d = ((a[s:s + rows, None, :] - b[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        if d[i, j] < best:
            best, pair = float(d[i, j]), (s + int(i), int(j))
    return pair


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
