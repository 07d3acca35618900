"""COCO mask and box AP of an annotation output against COCO-format ground truth (``ovsam eval coco``).

The output's committed instances become COCO results and are scored by pycocotools' ``COCOeval``, so the numbers
are the ones the COCO toolkit gives for the same detections:

- **images** are matched by file name: a ground-truth ``file_name`` equals the annotated image's source name (the
  tar member's name ``key.jpg``, or the image file's path relative to the input root), or the name the COCO
  export writes for it (``<shard>/<key>.<ext>``). Only matched images are evaluated; an annotated image whose
  status is not ``ok`` is evaluated with no detections (a miss is a miss).
- **categories** are matched by name: a class matches the ground-truth category whose name (or one of its
  ``synonyms``, as LVIS has them) equals the class's name or one of its synonyms, compared case-blind with ``_``
  read as a space. Only matched categories are evaluated; classes and categories left unmatched are reported.
- **splits**: a category is base or novel as its class is in the vocabulary's split (excluded classes are left
  out of every number, as in OV-COCO's 48/17 protocol). ``all``/``base``/``novel`` are the same evaluation read
  over those categories (COCOeval scores each category on its own). The OV-COCO convention reports novel AP50.
- **results**: one list per IoU type, segm with the RLE masks (area = mask area), bbox with the masks' boxes
  (area = box area), with a category and a score from the chosen label source.
- **label source** (``--label-source``): ``ovsam`` (the default) scores OV-SAM's own recognition: the category of
  ``label_name`` and ``score`` = ``label_score`` (the label's probability, ``softmax(fused)[:C]``). ``detector``
  scores the detector's labels on OV-SAM's masks: where a detector made the prompt (``--prompts detector:...``, or
  sidecar boxes with labels), the instance's category is that of its ``detector_label``, a class of the run's
  vocabulary matched by display name (exactly, else case-blind with ``_`` as a space, else the one class with that
  synonym), then through the same class -> category matching as above; ``score`` = ``detector_score`` (1.0 where
  the prompt's label came without a score). The masks and boxes are the same for both sources, so the difference
  between them is the difference in labelling alone. Instances without a detector label are skipped and counted
  (``skipped_no_detector_label``), as are labels that name no class of the vocabulary; an output in which no
  instance has a detector label is an error (:class:`NoDetectorLabels`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.annotate.outputs import coco_file_name, iter_committed, read_run
from pipeline.evaluation.label_source import (LABEL_SOURCES, NoDetectorLabels, detector_class_index,  # noqa: F401
                                              normalise_name)

logger = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
SPLIT_CODES = {1: "base", 2: "novel", 0: "excluded"}
#: ``COCOeval.stats`` in order (maxDets 100 unless named).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class ClassInfo:
    """The vocabulary of a run as far as evaluation needs it: display names (as in ``label_name``), synonyms
    per class, and the split per class (1 base, 2 novel, 0 excluded) or None."""

    names: list[str]
    synonyms: list[list[str]]
    split: list[int] | None = None


def run_classes(run: dict[str, Any]) -> ClassInfo:
    """The classes recorded in an output's ``run.json`` (synonyms and split where the run recorded them)."""
    voc = run.get("vocabulary") or {}
    names = [str(n) for n in voc.get("names") or []]
    if not names:
        raise ValueError("run.json records no vocabulary names; pass --vocabulary")
    synonyms = voc.get("synonyms") or [[n] for n in names]
    split = voc.get("split")
    return ClassInfo(names, [list(map(str, s)) for s in synonyms], None if split is None else [int(v) for v in split])


def classes_from_spec(spec: str, run_names: list[str]) -> ClassInfo:
    """Synonyms and split from a vocabulary spec (a built-in name, a saved vocabulary, a packed ``classes.json``
    or a text class list), read without a model, laid over the run's class names: each run class takes the
    synonyms and split of the spec's class of the same display name."""
    from ovsam.vocabulary import Vocabulary

    try:
        names, synonyms, split = Vocabulary.read_spec(spec)
    except ValueError as e:
        raise ValueError(f"--vocabulary: {e}") from None
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in run_names if n not in index]
    if missing:
        raise ValueError(f"--vocabulary {spec}: {len(missing)} of the run's classes are not in it "
                         f"(e.g. {missing[0]!r}); pass the vocabulary the run was annotated with")
    picked = [index[n] for n in run_names]
    split_list = None if split is None else [int(split[i]) for i in picked]
    return ClassInfo(list(run_names), [list(synonyms[i]) for i in picked], split_list)


@dataclass
class CategoryMatch:
    """Which ground-truth category each class scores as, and what was left over."""

    class_to_cat: dict[int, int]
    cat_split: dict[int, str]
    unmatched_classes: list[str] = field(default_factory=list)
    unmatched_categories: list[str] = field(default_factory=list)
    excluded_categories: list[str] = field(default_factory=list)


def match_categories(categories: list[dict[str, Any]], classes: ClassInfo) -> CategoryMatch:
    """Match classes to ground-truth categories by name and synonyms (see the module docstring). A class's own
    display name decides first; otherwise its synonyms in order, the first that names exactly one category."""
    keys: dict[str, list[int]] = {}
    for cat in categories:
        for text in [cat["name"], *(cat.get("synonyms") or [])]:
            ids = keys.setdefault(normalise_name(text), [])
            if cat["id"] not in ids:
                ids.append(cat["id"])
    class_to_cat: dict[int, int] = {}
    unmatched = []
    for c, name in enumerate(classes.names):
        cat = None
        for text in [name, *classes.synonyms[c]]:
            ids = keys.get(normalise_name(text), [])
            if len(ids) == 1:
                cat = ids[0]
                break
        if cat is None:
            unmatched.append(name)
        else:
            class_to_cat[c] = cat
    cat_split: dict[int, str] = {}
    for c, cat in class_to_cat.items():  # a category named by several classes takes the first one's split
        code = 2 if classes.split is None else int(classes.split[c])
        cat_split.setdefault(cat, SPLIT_CODES.get(code, "novel"))
    excluded = [cat_id for cat_id, s in cat_split.items() if s == "excluded"]
    for cat_id in excluded:
        del cat_split[cat_id]
    class_to_cat = {c: cat for c, cat in class_to_cat.items() if cat in cat_split}
    names = {cat["id"]: cat["name"] for cat in categories}
    return CategoryMatch(class_to_cat, cat_split, unmatched,
                         [names[cat["id"]] for cat in categories if cat["id"] not in cat_split
                          and cat["id"] not in excluded],
                         [names[i] for i in excluded])


def load_gt(url: str, storage_options: dict | None = None) -> Any:
    """A ``pycocotools.coco.COCO`` of the instances JSON at ``url`` (any fsspec URL)."""
    import fsspec
    from pycocotools.coco import COCO

    try:
        with fsspec.open(url, "r", **dict(storage_options or {})) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--gt {url}: not JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"--gt {url}: not a COCO instances file (needs 'images', 'categories' and 'annotations')")
    data.setdefault("annotations", [])
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@dataclass
class Detections:
    """The output's instances as COCO results per IoU type, with the matching's bookkeeping."""

    results: dict[str, list[dict[str, Any]]]
    image_ids: list[int]
    sources: dict[int, tuple[str, str]] = field(default_factory=dict)
    unmatched_images: list[str] = field(default_factory=list)
    duplicate_images: list[str] = field(default_factory=list)
    size_mismatches: list[str] = field(default_factory=list)
    not_ok_images: int = 0
    dropped_instances: int = 0
    instances: int = 0
    label_source: str = "ovsam"
    #: with ``label_source="detector"``: instances without a detector label (skipped), and detector labels that
    #: name no class of the vocabulary (label -> instances, dropped)
    skipped_no_detector_label: int = 0
    unknown_detector_labels: dict[str, int] = field(default_factory=dict)
    detector_labels_without_score: int = 0


def collect_detections(fs: Any, output: str, gt: Any, classes: ClassInfo, match: CategoryMatch,
                       label_source: str = "ovsam") -> Detections:
    """Read every committed shard of ``output`` and turn its instances into COCO results against ``gt``, each
    with the category and score of ``label_source`` (:data:`LABEL_SOURCES`, see the module docstring)."""
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    use_detector = label_source == "detector"
    detector_class = detector_class_index(classes) if use_detector else None
    by_name: dict[str, int] = {}
    for img in gt.dataset["images"]:
        name = str(img["file_name"])
        by_name[name[2:] if name.startswith("./") else name] = img["id"]
    class_index = {n: i for i, n in enumerate(classes.names)}
    out = Detections(results={t: [] for t in IOU_TYPES}, image_ids=[], label_source=label_source)
    seen: set[int] = set()
    cols = ["image_key", "instance_index", "mask_rle", "box_xyxy"]
    cols += ["detector_label", "detector_score"] if use_detector else ["label_name", "label_score"]
    for part in iter_committed(fs, output, columns=cols):
        image_ids: dict[str, int] = {}
        for row in sorted(part.images.to_pylist(), key=lambda r: r["image_key"]):
            candidates = [row.get("source_name"), coco_file_name(part.shard, row)]
            image_id = next((by_name[c] for c in candidates if c is not None and c in by_name), None)
            if image_id is None:
                out.unmatched_images.append(f"{part.shard}/{row['image_key']}")
                continue
            if image_id in seen:
                out.duplicate_images.append(f"{part.shard}/{row['image_key']}")
                continue
            info = gt.imgs[image_id]
            if row["status"] == "ok" and (int(row["height"]), int(row["width"])) != (int(info["height"]),
                                                                                   int(info["width"])):
                out.size_mismatches.append(f"{part.shard}/{row['image_key']} is {row['width']}x{row['height']}, "
                                           f"the ground truth's {info['file_name']} {info['width']}x{info['height']}")
                continue
            seen.add(image_id)
            out.image_ids.append(image_id)
            if row["status"] != "ok":
                out.not_ok_images += 1
                continue
            image_ids[row["image_key"]] = image_id
            out.sources[image_id] = (part.shard, row["image_key"])
        rows = sorted(part.instances.to_pylist(), key=lambda r: (r["image_key"], r["instance_index"]))
        for row in rows:
            image_id = image_ids.get(row["image_key"])
            if image_id is None:
                continue
            out.instances += 1
            if use_detector:
                label = row["detector_label"]
                if label is None:
                    out.skipped_no_detector_label += 1
                    continue
                c = detector_class(label)
                if c is None:
                    out.unknown_detector_labels[label] = out.unknown_detector_labels.get(label, 0) + 1
                    continue
                if row["detector_score"] is None:
                    out.detector_labels_without_score += 1
                score = 1.0 if row["detector_score"] is None else float(row["detector_score"])
            else:
                c = class_index.get(row["label_name"], -1)
                score = float(row["label_score"])
            cat = match.class_to_cat.get(c)
            if cat is None:
                out.dropped_instances += 1
                continue
            x0, y0, x1, y1 = (float(v) for v in row["box_xyxy"])
            rle = {"size": [int(v) for v in row["mask_rle"]["size"]], "counts": row["mask_rle"]["counts"]}
            out.results["segm"].append({"image_id": image_id, "category_id": cat, "segmentation": rle,
                                        "score": score})
            out.results["bbox"].append({"image_id": image_id, "category_id": cat,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    out.image_ids.sort()
    return out


WORST = 12


def worst_instances(gt: Any, detections: Detections, match: CategoryMatch, n: int = WORST) -> dict[str, list]:
    """The ground-truth instances (of evaluated categories, on annotated images that decoded) with the lowest best
    mask IoU against any prediction, and those whose best prediction (IoU >= 0.5) has another category, most
    confident first: ``{"iou": [...], "label": [...]}``, each record with both masks as RLE."""
    from pycocotools import mask as mask_utils

    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in detections.results["segm"]:
        by_image.setdefault(r["image_id"], []).append(r)
    lowest: list[tuple] = []
    wrong: list[tuple] = []
    for image_id in detections.image_ids:
        if image_id not in detections.sources:
            continue
        anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)
                and a["category_id"] in match.cat_split]
        if not anns:
            continue
        gts = []
        for a in anns:
            rle = gt.annToRLE(a)
            gts.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")
                        if isinstance(rle["counts"], bytes) else rle["counts"]})
        dts = by_image.get(image_id, [])
        ious = (np.asarray(mask_utils.iou([d["segmentation"] for d in dts], gts, [0] * len(gts)), dtype=np.float64)
                .reshape(len(dts), len(gts)) if dts else np.zeros((0, len(gts))))
        shard, key = detections.sources[image_id]
        for g, a in enumerate(anns):
            det = dts[int(np.argmax(ious[:, g]))] if dts else None
            iou = float(ious[:, g].max()) if dts else 0.0
            x, y, w, h = a["bbox"]
            rec = {"shard": shard, "key": key, "image_id": image_id, "annotation_id": a["id"], "iou": iou,
                   "gt_name": gt.cats[a["category_id"]]["name"], "gt_mask": gts[g], "box": [x, y, x + w, y + h],
                   "pred_name": None if det is None else gt.cats[det["category_id"]]["name"],
                   "score": None if det is None else float(det["score"]),
                   "pred_mask": None if det is None else det["segmentation"]}
            lowest.append((iou, shard, key, a["id"], rec))
            if det is not None and iou >= 0.5 and det["category_id"] != a["category_id"]:
                wrong.append((-float(det["score"]), shard, key, a["id"], rec))
        for items in (lowest, wrong):
            if len(items) > 4 * n:
                items.sort(key=lambda t: t[:4])
                del items[n:]
    lowest.sort(key=lambda t: t[:4])
    wrong.sort(key=lambda t: t[:4])
    return {"iou": [t[-1] for t in lowest[:n]], "label": [t[-1] for t in wrong[:n]]}


def _load_results(gt: Any, results: list[dict[str, Any]]) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes([dict(r) for r in results])  # loadRes adds id/area/iscrowd in place
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                         "annotations": []}
        empty.createIndex()
        return empty


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def slice_stats(evaluator: Any, k_index: list[int]) -> dict[str, float]:
    """AP, AP50, AP75, APs/m/l and AR100 over the categories at ``k_index`` of an accumulated ``COCOeval``: the
    same means ``COCOeval.summarize`` takes, over fewer categories."""
    p = evaluator.params
    prec, rec = evaluator.eval["precision"], evaluator.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    m = len(p.maxDets) - 1
    t50, t75 = (int(np.argmin(np.abs(p.iouThrs - t))) for t in (0.5, 0.75))
    k = np.asarray(k_index, dtype=int)
    return {
        "AP": _mean_valid(prec[:, :, k, 0, m]), "AP50": _mean_valid(prec[t50, :, k, 0, m]),
        "AP75": _mean_valid(prec[t75, :, k, 0, m]), "APs": _mean_valid(prec[:, :, k, 1, m]),
        "APm": _mean_valid(prec[:, :, k, 2, m]), "APl": _mean_valid(prec[:, :, k, 3, m]),
        "AR100": _mean_valid(rec[:, k, 0, m]),
    }


def evaluate(gt: Any, detections: Detections, match: CategoryMatch,
             iou_types: tuple[str, ...] = IOU_TYPES) -> dict[str, Any]:
    """``COCOeval`` per IoU type over the matched images and categories: ``stats`` (all 12, as
    ``COCOeval.stats``), ``all``/``base``/``novel`` summaries and a per-class table."""
    from pycocotools.cocoeval import COCOeval

    cat_ids = sorted(match.cat_split)
    gt_counts: dict[int, int] = {c: 0 for c in cat_ids}
    wanted = set(detections.image_ids)
    for ann in gt.dataset["annotations"]:
        if ann["image_id"] in wanted and ann["category_id"] in gt_counts and not ann.get("iscrowd", 0):
            gt_counts[ann["category_id"]] += 1
    report: dict[str, Any] = {}
    for iou_type in iou_types:
        dt = _load_results(gt, detections.results[iou_type])
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = list(detections.image_ids)
        ev.params.catIds = cat_ids
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        splits = {"all": list(range(len(cat_ids)))}
        for name in ("base", "novel"):
            ks = [i for i, c in enumerate(cat_ids) if match.cat_split[c] == name]
            if ks:
                splits[name] = ks
        per_class = []
        for i, c in enumerate(cat_ids):
            s = slice_stats(ev, [i])
            per_class.append({"category_id": c, "name": gt.cats[c]["name"], "split": match.cat_split[c],
                              "gt_instances": gt_counts[c], "AP": s["AP"], "AP50": s["AP50"]})
        report[iou_type] = {"stats": dict(zip(STAT_NAMES, (float(v) for v in ev.stats))),
                            **{name: slice_stats(ev, ks) for name, ks in splits.items()},
                            "per_class": per_class}
    return report


def eval_coco(output: str, gt_url: str, *, vocabulary: str | None = None, iou_types: tuple[str, ...] = IOU_TYPES,
              storage_options: dict | None = None, label_source: str = "ovsam") -> dict[str, Any]:
    """The whole of ``ovsam eval coco``: the report dict (see :func:`evaluate`) with the matching's counts and
    ``label_source``. With ``label_source="detector"``, raises :class:`NoDetectorLabels` (a ``ValueError``) when
    no evaluated instance has a detector label."""
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    import fsspec

    storage_options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/run.json"):
        raise ValueError(f"--pred {output} is not the output of `ovsam annotate` (no run.json)")
    run = read_run(fs, root)
    classes = run_classes(run)
    if vocabulary is not None:
        classes = classes_from_spec(vocabulary, classes.names)
    gt = load_gt(gt_url, storage_options)
    match = match_categories(gt.dataset["categories"], classes)
    if not match.cat_split:
        raise ValueError(f"no class of the run's vocabulary ({', '.join(classes.names[:5])}, ...) names a category "
                         f"of {gt_url} ({', '.join(c['name'] for c in gt.dataset['categories'][:5])}, ...)")
    detections = collect_detections(fs, root, gt, classes, match, label_source)
    if not detections.image_ids:
        example = next(iter(gt.dataset["images"]), {}).get("file_name")
        raise ValueError(f"no annotated image matches a file_name of {gt_url} (e.g. {example!r}); the file names "
                         "must be the images' paths relative to the annotated input, or their tar member names")
    if label_source == "detector":
        _check_detector_labels(detections, run, output)
    report = evaluate(gt, detections, match, iou_types)
    report["worst"] = worst_instances(gt, detections, match)
    report["matching"] = {
        "images_evaluated": len(detections.image_ids), "images_in_gt": len(gt.dataset["images"]),
        "images_not_ok": detections.not_ok_images, "unmatched_images": len(detections.unmatched_images),
        "duplicate_images": detections.duplicate_images, "size_mismatches": detections.size_mismatches,
        "categories_evaluated": len(match.cat_split),
        "unmatched_classes": match.unmatched_classes, "unmatched_categories": match.unmatched_categories,
        "excluded_categories": match.excluded_categories,
        "instances": detections.instances, "instances_of_unmatched_classes": detections.dropped_instances,
    }
    report["label_source"] = label_source
    if label_source == "detector":
        report["matching"].update({
            "skipped_no_detector_label": detections.skipped_no_detector_label,
            "unknown_detector_labels": dict(sorted(detections.unknown_detector_labels.items())),
            "detector_labels_without_score": detections.detector_labels_without_score,
        })
    return report


def _check_detector_labels(detections: Detections, run: dict[str, Any], output: str) -> None:
    """Raise :class:`NoDetectorLabels` when instances were read and none had a detector label; warn about those
    skipped and about detector labels that name no class."""
    prompts = (run.get("config") or {}).get("prompts")
    made_by = f" (run.json records --prompts {prompts})" if prompts else ""
    if detections.instances and detections.skipped_no_detector_label == detections.instances:
        raise NoDetectorLabels(
            f"--label-source detector: none of the {detections.instances} instances of {output} on the evaluated "
            f"images has a detector_label{made_by}; detector labels exist only where a detector (or a sidecar with "
            "labels) made the prompts. Use --label-source ovsam to score OV-SAM's own labels")
    if detections.skipped_no_detector_label:
        logger.warning("--label-source detector: %d of %d instances have no detector_label%s and are skipped",
                       detections.skipped_no_detector_label, detections.instances, made_by)
    if detections.unknown_detector_labels:
        names = sorted(detections.unknown_detector_labels)
        logger.warning("--label-source detector: %d instances have detector labels that name no class of the "
                       "vocabulary and are dropped: %s", sum(detections.unknown_detector_labels.values()),
                       ", ".join(names[:8]) + (", ..." if len(names) > 8 else ""))


def format_report(report: dict[str, Any], per_class: int = 20) -> str:
    """The report as text tables: summaries per IoU type and split, then the per-class table (worst first)."""
    lines = []
    m = report["matching"]
    source = report.get("label_source", "ovsam")
    if source == "detector":
        text = ("labels: the detector's (detector_label, detector_score) on OV-SAM's masks; "
                f"{m.get('skipped_no_detector_label', 0)} instances without a detector label skipped")
        unknown = m.get("unknown_detector_labels") or {}
        if unknown:
            shown = ", ".join(list(unknown)[:8]) + (", ..." if len(unknown) > 8 else "")
            text += f", {sum(unknown.values())} with labels not in the vocabulary dropped ({shown})"
        lines.append(text)
    else:
        lines.append("labels: OV-SAM's (label_name, label_score)")
    lines.append(f"images: {m['images_evaluated']} evaluated of {m['images_in_gt']} in the ground truth "
                 f"({m['images_not_ok']} not ok, {m['unmatched_images']} annotated images not in it); "
                 f"categories: {m['categories_evaluated']} evaluated")
    for key, what in (("unmatched_categories", "ground-truth categories with no class"),
                      ("unmatched_classes", "classes with no category"),
                      ("excluded_categories", "categories of excluded classes, left out")):
        if m[key]:
            shown = ", ".join(m[key][:8]) + (", ..." if len(m[key]) > 8 else "")
            lines.append(f"{what}: {len(m[key])} ({shown})")
    iou_types = [t for t in IOU_TYPES if t in report]
    header = f"{'':<12}" + "".join(f"{c:>8}" for c in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"))
    for t in iou_types:
        lines.append("")
        lines.append(f"{t} {header[len(t) + 1:]}" if len(t) < 12 else f"{t}\n{header}")
        for split in ("all", "base", "novel"):
            if split in report[t]:
                s = report[t][split]
                lines.append(f"  {split:<10}" + "".join(
                    f"{100 * s[c]:>8.1f}" if s[c] >= 0 else f"{'-':>8}"
                    for c in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")))
    if iou_types and per_class:
        t = iou_types[0]
        rows = sorted(report[t]["per_class"], key=lambda r: (r["AP"], r["name"]))
        lines.append("")
        lines.append(f"per class ({t}, worst {min(per_class, len(rows))} of {len(rows)}):")
        lines.append(f"  {'class':<28}{'split':<8}{'GT':>6}{'AP':>8}{'AP50':>8}")
        for r in rows[:per_class]:
            ap = f"{100 * r['AP']:>8.1f}" if r["AP"] >= 0 else f"{'-':>8}"
            ap50 = f"{100 * r['AP50']:>8.1f}" if r["AP50"] >= 0 else f"{'-':>8}"
            lines.append(f"  {r['name'][:27]:<28}{r['split']:<8}{r['gt_instances']:>6}{ap}{ap50}")
    return "\n".join(lines)


__all__ = ["WORST", "worst_instances", "ClassInfo", "CategoryMatch", "Detections", "IOU_TYPES", "LABEL_SOURCES",
           "NoDetectorLabels", "STAT_NAMES", "classes_from_spec", "detector_class_index",
           "collect_detections", "eval_coco", "evaluate", "format_report", "load_gt", "match_categories",
           "normalise_name", "run_classes", "slice_stats"]
