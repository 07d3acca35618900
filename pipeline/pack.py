"""Packers: public dataset formats -> WebDataset training shards (``ovsam pack``; format: ``schemas/training.py``).

Each ``plan_*`` function reads a source's metadata once (an annotation JSON, a folder listing) and returns a
:class:`~pipeline.pack_writer.PackPlan`: the classes, the settings, the items in a deterministic order and a
``load`` function that reads one item's image (never re-encoded) and builds its sidecar. ``pack_*`` functions plan
and write (:func:`~pipeline.pack_writer.write_plan`: streaming, resumable, sharded by count and/or bytes).

- :func:`plan_coco`: COCO / LVIS instances JSON + image folder; masks (polygons, RLE) as compressed RLE; crowd
  annotations left out; optional base-only filtering (LVIS: rare = novel; COCO: the built-in 48/17 split).
- :func:`plan_detection`: COCO-style detection JSON (Objects365, V3Det): boxes and labels.
- :func:`plan_folders`: ``root/<class folder>/<image>`` (ImageNet-21k/22k), class names from WordNet ids.
- :func:`plan_sa1b`: SA-1B (``sa_N.jpg`` + ``sa_N.json``), class-agnostic masks.
- :func:`pack_synthetic`: the synthetic world of ``pipeline/synthetic.py``, a train and a held-out shard set.

Every path or URL is opened with fsspec; ``storage_options`` apply to inputs and output alike.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
import logging
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from schemas.training import AGNOSTIC_LABEL, ClassesFile, TrainingRecord, make_key

from .pack_writer import PackedSample, PackPlan, PackSummary, SkipItem, write_plan

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "MPO": "jpg"}
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def _fs(url: str, storage_options: dict | None) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def _read_source_json(url: str, storage_options: dict | None) -> tuple[Any, str]:
    """The parsed JSON at ``url`` and the SHA-256 of its bytes (read once)."""
    fs, path = _fs(url, storage_options)
    data = fs.cat_file(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return json.loads(data), digest
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url}: not a JSON file: {e}") from None


def probe_image(data: bytes) -> tuple[str, int, int]:
    """``(extension, width, height)`` of encoded image bytes, from the header only; ``SkipItem`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; every one means "not an image"
        raise SkipItem("unreadable_image", f"not a readable image ({len(data)} bytes): {type(e).__name__}: {e}")
    return _FORMAT_EXT.get(fmt or "", (fmt or "img").lower()), int(width), int(height)


def _read_image(fs: Any, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise SkipItem("missing_image", f"{path}: no such file") from None


def _class_text(synonyms: Sequence[str]) -> str:
    """``"name,synonym,..."``: commas inside a synonym become spaces, duplicates and empties are dropped."""
    out: list[str] = []
    for s in synonyms:
        s = " ".join(str(s).replace(",", " ").split())
        if s and s not in out:
            out.append(s)
    if not out:
        raise ValueError(f"a class needs a name, got {list(synonyms)!r}")
    return ",".join(out)


def dataset_prefix(dataset: str) -> str:
    """A shard-name prefix from a dataset name."""
    return _NAME.sub("_", dataset).strip("_") or "shard"


# ----------------------------------------------------------------------------------------------------------------
# COCO / LVIS / Objects365 / V3Det


def _xyxy(bbox: Any) -> list[float] | None:
    """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]``; None when it is not 4 finite numbers with w, h > 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    return [x, y, x + w, y + h]


def _valid_segmentation(seg: Any, height: int | None, width: int | None) -> Any:
    """The segmentation in a form pycocotools takes (polygons as a list of lists), or None when malformed."""
    if isinstance(seg, list):
        if seg and all(isinstance(v, (int, float)) for v in seg):
            seg = [seg]  # one flat polygon
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            return None
        if height is not None and width is not None and [int(size[0]), int(size[1])] != [height, width]:
            return None
        if isinstance(seg["counts"], (str, bytes, list)):
            return seg
    return None


def encode_mask(mask: Any) -> dict[str, Any]:
    """A boolean ``HxW`` mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}``."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE ``{"size", "counts": str}``
    of an ``height x width`` image; polygons of one object are merged into one mask."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": [int(seg["size"][0]), int(seg["size"][1])],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _coco_builtin() -> dict[str, tuple[list[str], str]]:
    from ovsam.class_lists import BASE, NOVEL, builtin_class_list

    names, synonyms, split = builtin_class_list("coco")
    label = {BASE: "base", NOVEL: "novel"}
    return {n: (s, label.get(int(v), "excluded")) for n, s, v in zip(names, synonyms, split)}


def read_split_file(url: str, categories: list[dict], storage_options: dict | None = None) -> list[str]:
    """Per class (in ``categories`` order) ``base``/``novel``/``excluded`` from a JSON split file
    ``{"base": [ids or names], "novel": [ids or names]}``; classes in neither list are excluded."""
    data, _ = _read_source_json(url, storage_options)
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
    data, digest = _read_source_json(annotations, storage_options)
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
        texts = [_class_text([s.replace("_", " ") for s in [c["name"], *c.get("synonyms", [])]]) for c in categories]
    elif coco:
        texts = [_class_text(builtin[c["name"]][0]) for c in categories]
    else:
        texts = [_class_text([c["name"]]) for c in categories]
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
        box = _xyxy(ann.get("bbox"))
        if box is None:
            stats["degenerate_box"] += 1
            continue
        seg = None
        if kind == "mask":
            seg = _valid_segmentation(ann.get("segmentation"), image.get("height"), image.get("width"))
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
    img_fs, img_root = _fs(images, storage_options)

    def load(item: _CocoItem) -> PackedSample:
        path = posixpath.join(img_root, item.file_name)
        raw = _read_image(img_fs, path)
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


# ----------------------------------------------------------------------------------------------------------------
# Class folders (ImageNet-21k/22k)


def wordnet_lemmas() -> dict[str, str]:
    """WordNet id -> ``"lemma, lemma, ..."`` from timm's package data (ImageNet-21k/22k and ImageNet-1k synsets)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("class names for WordNet ids come from timm's data; install it: pip install timm")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    return dict(line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line)


@dataclass(frozen=True)
class _FolderItem:
    label: int
    path: str
    source_id: str
    key: str


def _entries(fs: Any, path: str) -> list[dict]:
    fs.invalidate_cache(path)
    return sorted(fs.ls(path, detail=True), key=lambda e: e["name"])


def plan_folders(root: str, *, dataset: str = "imagenet21k", storage_options: dict | None = None) -> PackPlan:
    """Plan packing ``root/<class folder>/<image>`` as image-level samples (ImageNet-21k/22k layout).

    Classes are the folders in name order; a folder named by a WordNet id (``n01440764``) gets its lemmas from
    timm's synset data as synonyms, any other folder name is used as the class name, with a warning. Images are
    files with an image suffix (case-insensitive) directly inside a class folder, in name order; keys are
    ``<folder>/<file stem>``.
    """
    fs, base = _fs(root, storage_options)
    lemmas = wordnet_lemmas()
    stats: collections.Counter = collections.Counter()
    folders = []
    for entry in _entries(fs, base):
        if posixpath.basename(entry["name"].rstrip("/")).startswith("."):
            continue  # hidden: .cache, .ipynb_checkpoints, ...
        if entry["type"] == "directory":
            folders.append(entry["name"].rstrip("/"))
        else:
            stats["file_outside_class_folder"] += 1
    if not folders:
        raise ValueError(f"{root}: no class folders found; expected root/<class>/<image> (e.g. n01440764/*.JPEG)")
    texts, ids, items, unknown = [], [], [], []
    digest = hashlib.sha256()
    for label, folder in enumerate(folders):
        wnid = posixpath.basename(folder)
        if wnid in lemmas:
            texts.append(_class_text(lemmas[wnid].split(",")))
        else:
            unknown.append(wnid)
            texts.append(_class_text([wnid.replace("_", " ")]))
        ids.append(wnid)
        keys: set[str] = set()
        for entry in _entries(fs, folder):
            file_name = posixpath.basename(entry["name"])
            if entry["type"] != "file" or not file_name.lower().endswith(IMAGE_SUFFIXES):
                stats["not_an_image_file"] += 1
                continue
            key = make_key(wnid, file_name.rsplit(".", 1)[0])
            if key in keys:  # a.jpg next to a.png
                key = make_key(wnid, file_name)
            keys.add(key)
            digest.update(f"{wnid}/{file_name}\0{entry.get('size')}\n".encode())
            items.append(_FolderItem(label, entry["name"], f"{wnid}/{file_name}", key))
    if unknown:
        logger.warning("%d class folder(s) are not WordNet ids known to timm and are used as class names: %s",
                       len(unknown), ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else ""))

    def load(item: _FolderItem) -> PackedSample:
        raw = _read_image(fs, item.path)
        ext, width, height = probe_image(raw)
        record = TrainingRecord(dataset=dataset, kind="image", width=width, height=height,
                                source_id=item.source_id, image_labels=[item.label])
        return PackedSample(item.key, ext, raw, record)

    classes = ClassesFile(dataset=dataset, kind="image", classes=texts, split=None, ids=ids,
                          source={"packer": "folders", "root": root, "unknown_folders": unknown})
    settings = {"packer": "folders", "root": root, "listing_sha256": digest.hexdigest(), "dataset": dataset}
    logger.info("%s: %d images in %d class folders", root, len(items), len(folders))
    return PackPlan(classes=classes, settings=settings, items=items, load=load, stats=dict(stats))


# ----------------------------------------------------------------------------------------------------------------
# SA-1B


def plan_sa1b(root: str, *, dataset: str = "sa1b", keep_empty: bool = False,
              storage_options: dict | None = None) -> PackPlan:
    """Plan packing SA-1B style data: ``<name>.jpg`` + ``<name>.json`` pairs anywhere under ``root`` (the JSON
    has ``image`` {width, height, image_id} and ``annotations[]`` with ``segmentation`` (compressed RLE) and
    ``bbox`` (xywh)). Class-agnostic masks: every label is -1 and ``classes.json`` has no classes. Items are the
    pairs in path order; an image without its JSON (or the reverse) is counted and left out."""
    fs, base = _fs(root, storage_options)
    fs.invalidate_cache(base)
    files = fs.find(base, detail=True)
    stems: dict[str, dict[str, str]] = collections.defaultdict(dict)
    digest = hashlib.sha256()
    stats: collections.Counter = collections.Counter()
    for path in sorted(files):
        rel = posixpath.relpath(path, base)
        stem, dot, suffix = rel.rpartition(".")
        suffix = suffix.lower()
        if not dot or "/." in "/" + rel:
            continue
        if suffix == "json":
            stems[stem]["json"] = path
        elif "." + suffix in IMAGE_SUFFIXES:
            if "image" in stems[stem]:
                stats["duplicate_image"] += 1
                continue
            stems[stem]["image"] = path
        else:
            continue
        digest.update(f"{rel}\0{files[path].get('size')}\n".encode())
    items = []
    for stem in sorted(stems):
        pair = stems[stem]
        if "image" not in pair:
            stats["json_without_image"] += 1
        elif "json" not in pair:
            stats["image_without_json"] += 1
        else:
            items.append((stem, pair["image"], pair["json"]))
    if not items:
        raise ValueError(f"{root}: no image + JSON pairs found (expected sa_1.jpg next to sa_1.json)")

    def load(item: tuple[str, str, str]) -> PackedSample:
        stem, image_path, json_path = item
        try:
            meta = json.loads(fs.cat_file(json_path))
            info, anns = meta["image"], meta["annotations"]
            want = (int(info["width"]), int(info["height"]))
        except FileNotFoundError:
            raise SkipItem("missing_json", f"{json_path}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise SkipItem("bad_json", f"{json_path}: expected an SA-1B annotation file with 'image' {{width, "
                                       f"height}} and 'annotations': {type(e).__name__}: {e}") from None
        raw = _read_image(fs, image_path)
        ext, width, height = probe_image(raw)
        if (width, height) != want:
            raise SkipItem("size_mismatch", f"{image_path}: image is {width}x{height}, {json_path} says "
                                            f"{want[0]}x{want[1]}")
        dropped: collections.Counter = collections.Counter()
        boxes, masks = [], []
        for ann in anns if isinstance(anns, list) else []:
            box = _xyxy(ann.get("bbox")) if isinstance(ann, dict) else None
            seg = _valid_segmentation(ann.get("segmentation"), height, width) if box is not None else None
            if box is None:
                dropped["degenerate_box"] += 1
            elif seg is None:
                dropped["bad_segmentation"] += 1
            else:
                boxes.append(box)
                masks.append(segmentation_to_rle(seg, height, width))
        if not boxes and not keep_empty:
            raise SkipItem("empty_image", f"{json_path}: no usable masks")
        source_id = info.get("image_id", posixpath.basename(stem))
        if not isinstance(source_id, (int, str)) or isinstance(source_id, bool):
            source_id = str(source_id)
        record = TrainingRecord(dataset=dataset, kind="mask", width=width, height=height, source_id=source_id,
                                labels=[AGNOSTIC_LABEL] * len(boxes), boxes=boxes, masks=masks)
        return PackedSample(make_key(*stem.split("/")), ext, raw, record, dict(dropped))

    classes = ClassesFile(dataset=dataset, kind="mask", classes=[], split=None, ids=None,
                          source={"packer": "sa1b", "root": root})
    settings = {"packer": "sa1b", "root": root, "listing_sha256": digest.hexdigest(), "dataset": dataset,
                "keep_empty": keep_empty}
    logger.info("%s: %d image + JSON pairs", root, len(items))
    return PackPlan(classes=classes, settings=settings, items=items, load=load, stats=dict(stats))


# ----------------------------------------------------------------------------------------------------------------
# Synthetic world


SYNTHETIC_SPLITS = ("train", "heldout")


def plan_synthetic(kind: str, num_samples: int, *, split: str = "train", seed: int = 0,
                   max_objects: int | None = None) -> PackPlan:
    """Plan ``num_samples`` synthetic scenes (``pipeline/synthetic.py``) of one split.

    Scene ``i`` is drawn from its own generator seeded by ``(seed, split, i)``, so splits never share scenes and
    a resumed run draws the same scenes. ``kind`` ``"mask"``: every visible object's box, class and exact visible
    mask; ``"box"``: boxes and classes; ``"image"``: the class of the largest visible object as ``image_labels``
    (scenes hold one object unless ``max_objects`` says otherwise; default 4 for box/mask).
    """
    import numpy as np

    from .synthetic import CLASS_NAMES, SIZES, draw_scene

    if kind not in ("image", "box", "mask"):
        raise ValueError(f"kind must be image, box or mask, got {kind!r}")
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    objects_max = max_objects if max_objects is not None else (1 if kind == "image" else 4)
    if objects_max < 1:
        raise ValueError(f"max_objects must be >= 1, got {objects_max}")
    split_code = SYNTHETIC_SPLITS.index(split)
    class_index = {n: i for i, n in enumerate(CLASS_NAMES)}

    def load(i: int) -> PackedSample:
        from PIL import Image

        rng = np.random.default_rng([seed, split_code, i])
        height, width = SIZES[int(rng.integers(len(SIZES)))]
        image, objects = draw_scene(rng, height, width, int(rng.integers(1, objects_max + 1)))
        if not objects:
            raise SkipItem("empty_scene", f"scene {i} has no visible object")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        labels = [class_index[o.name] for o in objects]
        boxes = [list(o.box_xyxy) for o in objects]
        if kind == "image":
            largest = max(range(len(objects)), key=lambda j: int(objects[j].mask.sum()))
            record = TrainingRecord(dataset="synthetic", kind="image", width=width, height=height, source_id=i,
                                    image_labels=[labels[largest]])
        else:
            masks = [encode_mask(o.mask) for o in objects] if kind == "mask" else []
            record = TrainingRecord(dataset="synthetic", kind=kind, width=width, height=height, source_id=i,
                                    labels=labels, boxes=boxes, masks=masks)
        return PackedSample(f"{split}_{i:08d}", "jpg", buf.getvalue(), record)

    classes = ClassesFile(dataset="synthetic", kind=kind, classes=list(CLASS_NAMES), split=None, ids=None,
                          source={"packer": "synthetic", "split": split, "seed": seed})
    settings = {"packer": "synthetic", "kind": kind, "num_samples": num_samples, "split": split, "seed": seed,
                "max_objects": objects_max}
    return PackPlan(classes=classes, settings=settings, items=range(num_samples), load=load)


def pack_synthetic(output: str, *, kind: str, num_train: int, num_heldout: int, seed: int = 0,
                   max_objects: int | None = None, **write_options: Any) -> dict[str, PackSummary]:
    """Write ``<output>/train`` and ``<output>/heldout`` shard sets of synthetic scenes (see
    :func:`plan_synthetic`); ``write_options`` go to :func:`~pipeline.pack_writer.write_plan`."""
    out = {}
    for split, count in (("train", num_train), ("heldout", num_heldout)):
        plan = plan_synthetic(kind, count, split=split, seed=seed, max_objects=max_objects)
        out[split] = write_plan(plan, posixpath.join(output.rstrip("/"), split), **write_options)
    return out


__all__ = ["PackPlan", "PackSummary", "PackedSample", "SkipItem", "dataset_prefix", "encode_mask", "pack_synthetic",
           "plan_coco", "plan_detection", "plan_folders", "plan_sa1b", "plan_synthetic", "probe_image",
           "read_split_file", "segmentation_to_rle", "wordnet_lemmas", "write_plan"]
