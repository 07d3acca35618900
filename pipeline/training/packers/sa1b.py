"""The SA-1B packer: ``sa_N.jpg`` + ``sa_N.json`` pairs, class-agnostic masks.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import posixpath


from schemas.training import AGNOSTIC_LABEL, ClassesFile, TrainingRecord, make_key

from pipeline.training.packers.writer import PackedSample, PackPlan, SkipItem
from pipeline.training.packers.common import segmentation_to_rle, valid_segmentation
from pipeline.training.packers.common import IMAGE_SUFFIXES, open_fs, probe_image, read_image, xyxy

logger = logging.getLogger(__name__)


def plan_sa1b(root: str, *, dataset: str = "sa1b", keep_empty: bool = False,
              storage_options: dict | None = None) -> PackPlan:
    """Plan packing SA-1B style data: ``<name>.jpg`` + ``<name>.json`` pairs anywhere under ``root`` (the JSON
    has ``image`` {width, height, image_id} and ``annotations[]`` with ``segmentation`` (compressed RLE) and
    ``bbox`` (xywh)). Class-agnostic masks: every label is -1 and ``classes.json`` has no classes. Items are the
    pairs in path order; an image without its JSON (or the reverse) is counted and left out."""
    fs, base = open_fs(root, storage_options)
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
        raw = read_image(fs, image_path)
        ext, width, height = probe_image(raw)
        if (width, height) != want:
            raise SkipItem("size_mismatch", f"{image_path}: image is {width}x{height}, {json_path} says "
                                            f"{want[0]}x{want[1]}")
        dropped: collections.Counter = collections.Counter()
        boxes, masks = [], []
        for ann in anns if isinstance(anns, list) else []:
            box = xyxy(ann.get("bbox")) if isinstance(ann, dict) else None
            seg = valid_segmentation(ann.get("segmentation"), height, width) if box is not None else None
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


