"""The COCO exporter: committed annotation output -> COCO instances JSON (RLE masks, or polygons traced on the
upsampled mask), and copies of the annotated images in the masks' frame (``--images-dir``).

Only committed shards are read (``pipeline.annotate.outputs``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pipeline.annotate.outputs import coco_file_name, iter_committed, read_run


logger = logging.getLogger(__name__)














POLYGON_UPSAMPLE = 4
MAX_AREA_CHANGE = 0.02


def mask_polygons(rle: dict[str, Any], tolerance: float = 1.0) -> list[list[float]]:
    """COCO polygons (``[[x0, y0, x1, y1, ...], ...]``, in pixel-edge coordinates: pixel ``(i, j)`` spans
    ``[j, j + 1) x [i, i + 1)``) of an RLE mask's outer contours, simplified to within ``tolerance`` pixels
    (Douglas-Peucker; a part whose area that would change by more than ``MAX_AREA_CHANGE`` keeps its traced
    outline, so small parts are not simplified away). OpenCV traces the contours through the centres of boundary pixels, which would leave half a
    pixel of every edge out (and single pixels with no area), so they are traced on the mask upsampled
    ``POLYGON_UPSAMPLE`` times: the outline is then within 1/8 pixel of the mask's edge and every pixel of the mask,
    a lone one included, is inside a polygon. Holes are filled, as COCO polygons cannot hold them."""
    import cv2
    from pycocotools import mask as mask_utils

    m = np.ascontiguousarray(mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"]}), dtype=np.uint8)
    k = POLYGON_UPSAMPLE
    up = cv2.resize(m, (m.shape[1] * k, m.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if tolerance > 0:
            simple = cv2.approxPolyDP(c, tolerance * k, True)
            area = cv2.contourArea(c)
            if len(simple) >= 3 and abs(cv2.contourArea(simple) - area) <= MAX_AREA_CHANGE * max(area, 1.0):
                c = simple
        pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / k
        if len(pts) < 3:  # cannot happen for a k x k block or larger; kept as a guard
            continue
        polygons.append([round(float(v), 3) for v in pts.reshape(-1)])
    return polygons


def export_coco(fs: Any, output: str, class_names: list[str] | None = None, *, polygons: bool = False,
                tolerance: float = 1.0) -> dict:
    """COCO instances JSON for every committed image with status ``ok``.

    Image ids are assigned in (shard, key) order starting at 1; ``file_name`` is :func:`coco_file_name` (made
    unique with the shard's name where two inputs share a path); category ids are vocabulary index + 1; each
    annotation carries ``score`` (the label score) and ``iscrowd = 0``. Segmentation is the RLE mask, or with
    ``polygons`` its polygons (:func:`mask_polygons`; a mask too small for any polygon keeps its RLE). Each image
    also carries ``ovsam_shard`` and ``ovsam_key``, so ``--images-dir`` and other tools can find its source.
    """
    if class_names is None:
        class_names = list(read_run(fs, output)["vocabulary"]["names"])
    images, annotations = [], []
    names: set[str] = set()
    cols = ["image_key", "instance_index", "mask_rle", "area", "box_xyxy", "label", "label_score"]
    for part in iter_committed(fs, output, columns=cols):
        img_rows = sorted(part.images.to_pylist(), key=lambda r: r["image_key"])
        ids = {}
        for row in img_rows:
            if row["status"] != "ok":
                continue
            image_id = len(images) + 1
            ids[row["image_key"]] = image_id
            name = coco_file_name(part.shard, row)
            if name in names:
                name = f"{part.shard}/{name}"
            names.add(name)
            images.append({"id": image_id, "file_name": name, "width": int(row["width"]),
                           "height": int(row["height"]), "ovsam_shard": part.shard, "ovsam_key": row["image_key"]})
        inst = sorted(part.instances.to_pylist(), key=lambda r: (r["image_key"], r["instance_index"]))
        for row in inst:
            x0, y0, x1, y1 = row["box_xyxy"]
            rle = {"size": list(row["mask_rle"]["size"]), "counts": row["mask_rle"]["counts"]}
            segmentation: Any = rle
            if polygons:
                segmentation = mask_polygons(rle, tolerance) or rle
            annotations.append({
                "id": len(annotations) + 1, "image_id": ids[row["image_key"]], "category_id": int(row["label"]) + 1,
                "segmentation": segmentation, "area": float(row["area"]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0, "score": float(row["label_score"]),
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(class_names)]
    return {"info": {"description": f"ovsam annotations of {output}"}, "images": images,
            "annotations": annotations, "categories": categories}


def write_images(output: str, images: list[dict[str, Any]], images_dir: str, *,
                 storage_options: dict | None = None, shards: list[str] | None = None) -> int:
    """Copy the original bytes of the exported ``images`` (COCO image dicts with ``ovsam_shard``/``ovsam_key``)
    from the annotated inputs to ``images_dir/<file_name>`` (any fsspec URL), reading each input shard once.
    Returns how many were written; raises ``ValueError`` naming what could not be found."""
    import fsspec

    from pipeline.inputs.decode import IMAGE_EXTENSIONS
    from pipeline.annotate.ledger import Ledger
    from pipeline.annotate.outputs import source_refs
    from pipeline.inputs.sources import open_shard

    storage_options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    ledger = Ledger(fs, root)
    wanted: dict[str, dict[str, str]] = {}
    for im in images:
        wanted.setdefault(im["ovsam_shard"], {})[im["ovsam_key"]] = im["file_name"]
    refs = source_refs(fs, root, sorted(wanted), ledger.manifests(), ledger.run_record(), shards, storage_options)
    lost = [s for s in wanted if s not in refs]
    if lost:
        raise ValueError(f"--images-dir: the inputs of {len(lost)} shard(s) (e.g. {lost[0]}) were not found; pass "
                         "--shards with the annotated inputs")
    out_fs, out_root = fsspec.core.url_to_fs(images_dir, **storage_options)
    out_root = out_root.rstrip("/")
    written = 0
    for shard, keys in wanted.items():
        reader = open_shard(refs[shard], storage_options)
        for sample in reader:
            name = keys.pop(sample.key, None)
            if name is None:
                continue
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample.files), None)
            if ext is None:
                raise ValueError(f"{shard}/{sample.key}: the input no longer holds its image")
            path = f"{out_root}/{name}"
            out_fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with out_fs.open(path, "wb") as f:
                f.write(sample.files[ext])
            written += 1
        if keys:
            raise ValueError(f"--images-dir: {len(keys)} image(s) of shard {shard} (e.g. {next(iter(keys))}) are not "
                             f"in its input {refs[shard].url}")
    return written


