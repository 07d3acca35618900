"""COCO-format packers: instances JSON + image folder (COCO, LVIS; masks from polygons or RLE, crowd annotations
left out, optional base-only filtering) and COCO-style detection JSON (Objects365, V3Det: boxes and labels).
"""

from __future__ import annotations

import collections
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from schemas.training import ClassesFile, TrainingRecord, make_key

from pipeline.training.packers.writer import PackedSample, PackPlan, SkipItem
from pipeline.training.packers.common import class_text, dataset_prefix, open_fs, probe_image, read_image, read_source_json, xyxy
from pipeline.training.packers.common import segmentation_to_rle, valid_segmentation

logger = logging.getLogger(__name__)








def _coco_builtin() -> dict[str, tuple[list[str], str]]:
    from ovsam.class_lists import BASE, NOVEL, builtin_class_list

    names, synonyms, split = builtin_class_list("coco")
    label = {BASE: "base", NOVEL: "novel"}
    return {n: (s, label.get(int(v), "excluded")) for n, s, v in zip(names, synonyms, split)}


def read_split_file(url: str, categories: list[dict], storage_options: dict | None = None) -> list[str]:
    """Per class (in ``categories`` order) ``base``/``novel``/``excluded`` from a JSON split file
    ``{"base": [ids or names], "novel": [ids or names]}``; classes in neither list are excluded."""
    data, _ = read_source_json(url, storage_options)
    if not isinstance(data, dict) or not set(data) <= {"base", "novel"} or not data:
        raise ValueError(f"{url}: expected a split file {{\"base\": [category ids or names], \"novel\": [...]}}, got "
                         f"keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    by_id = {c["id"]: i for i, c in enumerate(categories)}
    by_name = {c["name"]: i for i, c in enumerate(categories)}
    split = ["excluded"] * len(categories)
    for part in ("base", "novel"):
        for ref in data.get(part, []):
            i = by_name.get(ref) if isinstance(ref, str) else by_id.get(ref)
            if i is None:
                raise ValueError(f"{url}: {part} entry {ref!r} is not a category id or name of the annotations")
            if split[i] != "excluded":
                raise ValueError(f"{url}: category {ref!r} is listed twice")
            split[i] = part
    return split


@dataclass(frozen=True)
class _CocoItem:
    image_id: int | str
    file_name: str
    width: int | None
    height: int | None
    annotations: tuple[tuple[int, list[float], Any], ...]  # (class index, xyxy, segmentation or None)


def _image_file_name(image: dict) -> str:
    name = image.get("file_name")
    if not name and image.get("coco_url"):
        name = posixpath.basename(str(image["coco_url"]))  # LVIS lists images by URL only
    if not isinstance(name, str) or not name:
        raise ValueError(f"image {image.get('id')!r} has neither 'file_name' nor 'coco_url'")
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or ".." in parts:
        raise ValueError(f"image {image.get('id')!r}: file_name {name!r} must be a relative path inside --images")
    return "/".join(p for p in parts if p not in ("", "."))


def plan_coco(annotations: str, images: str, *, kind: str = "mask", base_only: bool = False,
              split_file: str | None = None, dataset: str | None = None, keep_empty: bool = False,
              storage_options: dict | None = None) -> PackPlan:
    """Plan packing a COCO-format instances JSON (COCO, LVIS; with ``kind="box"`` Objects365, V3Det).

    Images are read from ``images`` joined with each image's ``file_name`` (LVIS lists images by ``coco_url``
    only: its file name is used). Classes are the categories in id order (label = position). Names and synonyms: LVIS ``synonyms`` when the
    categories have them (``_`` read as a space); the built-in COCO synonyms when every category name is a COCO
    class; otherwise the category name. The split: ``split_file`` (see :func:`read_split_file`), else LVIS
    ``frequency`` (``r`` = novel), else the built-in COCO 48/17 split (the 15 classes in neither list are
    excluded), else none. ``base_only`` keeps only base-class annotations and needs a split. Crowd annotations,
    boxes with no area, and (for masks) missing or malformed segmentations are left out and counted; images
    left without annotations are dropped unless ``keep_empty``. Items are the images in id order.
    """
    if kind not in ("box", "mask"):
        raise ValueError(f"kind must be 'box' or 'mask' for COCO-style data, got {kind!r}")
    data, digest = read_source_json(annotations, storage_options)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{annotations}: expected a COCO-format JSON object with a {key!r} list")
    for c in data["categories"]:
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
            raise ValueError(f"{annotations}: expected categories with an integer 'id' and a 'name', got "
                             f"{str(c)[:120]}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    if len(cat_index) != len(categories):
        raise ValueError(f"{annotations}: category ids are not unique")
    lvis = any("synonyms" in c or "frequency" in c for c in categories)
    builtin = _coco_builtin()
    coco = not lvis and bool(categories) and all(c["name"] in builtin for c in categories)
    if lvis:
        texts = [class_text([s.replace("_", " ") for s in [c["name"], *c.get("synonyms", [])]]) for c in categories]
    elif coco:
        texts = [class_text(builtin[c["name"]][0]) for c in categories]
    else:
        texts = [class_text([c["name"]]) for c in categories]
    if split_file is not None:
        split: list[str] | None = read_split_file(split_file, categories, storage_options)
    elif lvis and all("frequency" in c for c in categories):
        split = ["novel" if c["frequency"] == "r" else "base" for c in categories]
    elif coco:
        split = [builtin[c["name"]][1] for c in categories]
    else:
        split = None
    if base_only and split is None:
        raise ValueError(f"--base-only needs a base/novel split; {annotations} has none (not COCO's classes, no "
                         f"LVIS frequencies): pass --split-file")
    name = dataset or ("lvis" if lvis else "coco" if coco else dataset_prefix(Path(annotations).stem))

    stats: collections.Counter = collections.Counter()
    by_id = {}
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image or image["id"] in by_id:
            raise ValueError(f"{annotations}: image entry without a unique 'id': {str(image)[:120]}")
        by_id[image["id"]] = image
    grouped: dict[Any, list] = collections.defaultdict(list)
    for ann in data["annotations"]:
        if ann.get("category_id") not in cat_index:
            raise ValueError(f"{annotations}: annotation {ann.get('id')!r} has category_id {ann.get('category_id')!r}, "
                             f"which is not among the {len(categories)} categories")
        image = by_id.get(ann.get("image_id"))
        if image is None:
            stats["annotation_without_image"] += 1
            continue
        label = cat_index[ann["category_id"]]
        if ann.get("iscrowd", 0):
            stats["crowd_annotation"] += 1
            continue
        if base_only and split[label] != "base":
            stats["not_base_annotation"] += 1
            continue
        box = xyxy(ann.get("bbox"))
        if box is None:
            stats["degenerate_box"] += 1
            continue
        seg = None
        if kind == "mask":
            seg = valid_segmentation(ann.get("segmentation"), image.get("height"), image.get("width"))
            if seg is None:
                stats["bad_segmentation"] += 1
                continue
        grouped[image["id"]].append((label, box, seg))
    items = []
    for image_id in sorted(by_id, key=lambda i: (isinstance(i, str), i)):
        anns = grouped.pop(image_id, [])
        if not anns and not keep_empty:
            stats["empty_image"] += 1
            continue
        image = by_id[image_id]
        items.append(_CocoItem(image_id, _image_file_name(image), image.get("width"), image.get("height"),
                               tuple(anns)))
    del data, by_id, grouped
    img_fs, img_root = open_fs(images, storage_options)

    def load(item: _CocoItem) -> PackedSample:
        path = posixpath.join(img_root, item.file_name)
        raw = read_image(img_fs, path)
        ext, width, height = probe_image(raw)
        if item.width is not None and item.height is not None and (width, height) != (item.width, item.height):
            raise SkipItem("size_mismatch", f"{path}: image is {width}x{height}, the annotations say "
                                            f"{item.width}x{item.height}")
        labels = [a[0] for a in item.annotations]
        boxes = [a[1] for a in item.annotations]
        try:
            masks = [segmentation_to_rle(a[2], height, width) for a in item.annotations] if kind == "mask" else []
            record = TrainingRecord(dataset=name, kind=kind, width=width, height=height, source_id=item.image_id,
                                    labels=labels, boxes=boxes, masks=masks)
        except (ValueError, TypeError) as e:  # e.g. an RLE sized for another image, when the JSON has no sizes
            raise SkipItem("bad_annotation", f"image {item.image_id!r}: {e}") from None
        return PackedSample(make_key(item.image_id), ext, raw, record)

    classes = ClassesFile(dataset=name, kind=kind, classes=texts, split=split, ids=[c["id"] for c in categories],
                          source={"packer": "coco" if kind == "mask" else "detection", "annotations": annotations,
                                  "images": images, "base_only": base_only})
    settings = {"packer": classes.source["packer"], "annotations": annotations, "annotations_sha256": digest,
                "images": images, "kind": kind, "base_only": base_only, "split_file": split_file,
                "keep_empty": keep_empty, "dataset": name}
    logger.info("%s: %d images to pack, %d classes, left out: %s", annotations, len(items), len(texts), dict(stats))
    return PackPlan(classes=classes, settings=settings, items=items, load=load, stats=dict(stats))


def plan_detection(annotations: str, images: str, **kwargs: Any) -> PackPlan:
    """:func:`plan_coco` with ``kind="box"``: COCO-style detection JSON (Objects365, V3Det), boxes and labels."""
    return plan_coco(annotations, images, kind="box", **kwargs)


