"""The paper's open-vocabulary interactive segmentation protocol over a whole evaluation set (``ovsam eval
prompts``; OVSAM_SPEC §5): every ground-truth instance is one prompt (its GT box, or its centre point), and the
reported values are mask IoU and top-1 accuracy, micro-averaged, split into base and novel.

The set is cut into **units** (a packed shard each, or ``images_per_unit`` images of a COCO-format set, in image id
order). A unit's metric sums (``ovsam.evaluation.InstanceMetric``) are written to ``OUT/units/<unit>.json`` when it
is done (to a temporary name, then moved), so a killed evaluation resumes with the units left; the summary adds the
units' sums up in unit order, so it is the same however the units were spread over workers. Units run on a pool of
Ray actors (GPU actors where the cluster has GPUs), or in this process with ``workers=0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

PROMPTS = ("box", "point")
DEFAULT_IMAGES_PER_UNIT = 200
#: Instances kept per unit and prompt type for the report: the lowest IoU, and the most confident wrong labels.
WORST = 12
#: The paper's Table 1 (released OV-SAM RN50x16 weights, GT box prompts): mask IoU in percent.
PAPER_TABLE1 = {"coco-val2017": {"box": {"base": 81.5, "novel": 84.0}},
                "lvis-v1-val": {"box": {"base": 83.1, "novel": 83.6}}}


def known_set(gt: Any) -> str | None:
    """``coco-val2017`` or ``lvis-v1-val`` when the ground truth is that public set (by its image and category
    counts), else None: the sets the paper reports numbers for."""
    images, cats = len(gt.dataset["images"]), len(gt.dataset["categories"])
    if (images, cats) == (5000, 80):
        return "coco-val2017"
    if (images, cats) == (19809, 1203):
        return "lvis-v1-val"
    return None


@dataclass(frozen=True)
class EvalPromptsConfig:
    """Everything that decides the numbers (hashed into ``OUT/eval.json``), and how to run (not hashed)."""

    output: str
    model: str = "ovsam-tiny"
    checkpoint: str | None = None
    vocabulary: str | None = None
    shards: tuple[str, ...] = ()
    gt: str | None = None
    images: str | None = None
    prompts: tuple[str, ...] = PROMPTS
    published_point_boxes: bool = False
    images_per_unit: int = DEFAULT_IMAGES_PER_UNIT
    limit: int | None = None
    batch_size: int = 4
    precision: str = "fp32"
    device: str = "auto"
    workers: int | None = None
    num_gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    ray_address: str | None = None
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)

    HASHED = ("model", "checkpoint", "vocabulary", "shards", "gt", "images", "prompts", "published_point_boxes",
              "images_per_unit", "limit", "precision")

    def hashed(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.HASHED}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Unit:
    """One unit of work: a packed shard (``shard``), or COCO image ids (``image_ids``)."""

    name: str
    shard: str | None = None
    image_ids: tuple[int, ...] = ()


def plan_units(cfg: EvalPromptsConfig, gt: Any = None) -> list[Unit]:
    """The evaluation set's units, in order; ``gt``: the ground truth of ``cfg.gt`` if loaded already."""
    if bool(cfg.shards) == bool(cfg.gt):
        raise ValueError("give the evaluation set as --shards URLS or as --gt instances.json --images DIR")
    if cfg.shards:
        from pipeline.training.train_data import open_shard_set

        units = []
        for spec in cfg.shards:
            for url in open_shard_set(spec, cfg.storage_options).shards:
                stem = posixpath.basename(url.rstrip("/")).rsplit(".", 1)[0]
                units.append(Unit(name=f"{len(units):05d}-{stem}", shard=url))
        if not units:
            raise ValueError(f"--shards {', '.join(cfg.shards)}: no shards found")
        return units
    if not cfg.images:
        raise ValueError("--gt needs --images DIR: the directory the ground truth's file_name entries are relative to")
    gt = load_gt(cfg.gt, cfg.storage_options) if gt is None else gt
    ids = sorted(int(i) for i in gt.imgs)
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    step = cfg.images_per_unit
    return [Unit(name=f"coco-{n // step:06d}", image_ids=tuple(ids[n : n + step])) for n in range(0, len(ids), step)]


def load_gt(url: str, storage_options: dict | None = None) -> Any:
    from pipeline.evaluation.coco import load_gt as _load

    return _load(url, storage_options)


def shard_set_vocabulary(classes: Any, model: Any) -> Any:
    """The vocabulary of a packed set's ``classes.json``, as the training job builds it for its held-out
    evaluation: classes without a split count as base (the model was trained on them)."""
    from ovsam import Vocabulary
    from ovsam.class_lists import SPLIT_NAMES

    split = [SPLIT_NAMES[s] for s in classes.split] if classes.split is not None else [1] * len(classes.classes)
    names_file = {"format": "ovsam-classes", "version": 1, "dataset": classes.dataset, "kind": classes.kind,
                  "classes": classes.classes, "split": classes.split, "ids": classes.ids}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classes.json"
        path.write_text(json.dumps(names_file))
        return Vocabulary.resolve(path, model, split=split, progress=False)


def resolve_vocabulary(cfg: EvalPromptsConfig, model: Any) -> Any:
    """``cfg.vocabulary`` if given; else the packed set's ``classes.json``. A COCO-format set needs one."""
    from ovsam import Vocabulary

    if cfg.vocabulary is not None:
        return Vocabulary.resolve(cfg.vocabulary, model, progress=False)
    if cfg.shards:
        from pipeline.training.train_data import open_shard_set

        classes = open_shard_set(cfg.shards[0], cfg.storage_options).classes
        if classes is None or classes.class_agnostic:
            raise ValueError(f"--shards {cfg.shards[0]} has no classes.json with classes; pass --vocabulary")
        return shard_set_vocabulary(classes, model)
    raise ValueError("--gt needs --vocabulary (e.g. coco or lvis, or a class list naming the ground truth's "
                     "categories)")


def image_file_name(img: dict[str, Any]) -> str:
    """Where a ground-truth image lies under ``--images``: its ``file_name``, or for LVIS (which names images by
    ``coco_url`` only) the URL's last two parts, ``val2017/000000397133.jpg``."""
    if img.get("file_name"):
        return str(img["file_name"])
    url = img.get("coco_url")
    if not url:
        raise ValueError(f"ground-truth image {img.get('id')} has neither file_name nor coco_url")
    return "/".join(str(url).rstrip("/").split("/")[-2:])


def _coco_samples(cfg: EvalPromptsConfig, unit: Unit, vocabulary: Any, gt: Any,
                  skipped: dict[str, int]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """``(image, target)`` of a COCO unit: non-crowd instances of categories that a vocabulary class names."""
    import fsspec

    from pipeline.inputs.decode import decode_image
    from pipeline.evaluation.coco import ClassInfo, match_categories

    info = ClassInfo(list(vocabulary.names), [list(s) for s in vocabulary.synonyms], None)
    match = match_categories(gt.dataset["categories"], info)
    class_of: dict[int, int] = {}
    for c, cat in sorted(match.class_to_cat.items()):
        class_of.setdefault(cat, c)
    root = cfg.images.rstrip("/")
    for image_id in unit.image_ids:
        img = gt.imgs[image_id]
        anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        kept = [a for a in anns if a["category_id"] in class_of]
        skipped["instances_of_unmatched_categories"] += len(anns) - len(kept)
        if not kept:
            continue
        name = image_file_name(img)
        with fsspec.open(f"{root}/{name}", "rb", **cfg.storage_options) as f:
            image, _, _ = decode_image(f.read())
        h, w = image.shape[:2]
        if (h, w) != (int(img["height"]), int(img["width"])):
            raise ValueError(f"{name} is {w}x{h}, the ground truth says {img['width']}x{img['height']}")
        masks = np.stack([gt.annToMask(a).astype(bool) for a in kept])
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in kept], dtype=np.float32)
        yield image, {"labels": np.asarray([class_of[a["category_id"]] for a in kept]), "boxes": boxes,
                      "masks": masks, "source": {"file_name": name}}


def _shard_samples(cfg: EvalPromptsConfig, unit: Unit) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    from pipeline.training.train_data import eval_targets, iter_samples

    for key, image, record in iter_samples([unit.shard], cfg.storage_options):
        yield image, {**eval_targets(record), "source": {"shard": unit.shard, "key": key}}


class _Details:
    """What the report needs of a unit, per prompt type: sums per ground-truth class, the ``WORST`` instances by
    IoU and the ``WORST`` most confident wrong labels (with both masks as RLE, the prompt and the image's source)."""

    def __init__(self) -> None:
        self.classes: dict[str, dict[int, dict[str, float]]] = {}
        self.worst: dict[str, dict[str, list[dict[str, Any]]]] = {}

    @staticmethod
    def _keep(items: list[dict[str, Any]], rank: tuple, make: Any) -> None:
        if len(items) < WORST or rank < items[-1]["_rank"]:
            items.append({**make(), "_rank": rank})
            items.sort(key=lambda r: r["_rank"])
            del items[WORST:]

    def observe(self, prompt: str, target: dict[str, Any], pred: Any, ious: Any, prompts: dict[str, Any]) -> None:
        from ovsam.masks import encode_rle

        per_class = self.classes.setdefault(prompt, {})
        worst = self.worst.setdefault(prompt, {"iou": [], "label": []})
        labels = np.asarray(target["labels"], dtype=np.int64)
        source = target.get("source", {})
        for i, c in enumerate(labels.tolist()):
            got = int(pred.labels[i])
            d = per_class.setdefault(c, {"count": 0.0, "correct": 0.0, "iou": 0.0, "masks": 0.0})
            d["count"] += 1
            d["correct"] += float(got == c)
            iou = None if ious is None else float(ious[i])
            if iou is not None:
                d["iou"] += iou
                d["masks"] += 1

            def make(i: int = i, c: int = c, got: int = got, iou: float | None = iou) -> dict[str, Any]:
                rec = {"source": source, "index": i, "gt_label": c, "label": got,
                       "score": float(pred.label_scores[i, got]), "iou": iou,
                       "box": [float(v) for v in np.asarray(target["boxes"])[i]],
                       "pred_mask": encode_rle(np.asarray(pred.masks[i])[None])[0]}
                if target.get("masks") is not None:
                    rec["gt_mask"] = encode_rle(np.asarray(target["masks"][i])[None])[0]
                if "point_coords" in prompts:
                    rec["point"] = [float(v) for v in prompts["point_coords"][i, 0]]
                return rec

            where = (json.dumps(source, sort_keys=True), i)
            if iou is not None:
                self._keep(worst["iou"], (iou, *where), make)
            if got != c:
                self._keep(worst["label"], (-float(pred.label_scores[i, got]), *where), make)

    def as_dict(self) -> dict[str, Any]:
        strip = {p: {k: [{f: v for f, v in r.items() if f != "_rank"} for r in items] for k, items in w.items()}
                 for p, w in self.worst.items()}
        return {"classes": {p: {str(c): d for c, d in sorted(v.items())} for p, v in self.classes.items()},
                "worst": strip}


class UnitEvaluator:
    """Holds the model and vocabulary; evaluates units and writes their results (hosted in Ray actors). ``gt``: the
    ground truth of ``cfg.gt`` if loaded already (in this process), else it is loaded here."""

    def __init__(self, cfg: EvalPromptsConfig, gt: Any = None) -> None:
        import torch

        import ovsam
        from ovsam.runtime import keep_freed_memory
        from pipeline.annotate.worker import resolve_device

        keep_freed_memory()
        self.cfg = cfg
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        self.model = ovsam.build_ovsam(cfg.model, checkpoint=cfg.checkpoint, device=resolve_device(device),
                                       precision=cfg.precision).eval()
        self.vocabulary = resolve_vocabulary(cfg, self.model)
        self._gt = gt if gt is not None or not cfg.gt else load_gt(cfg.gt, cfg.storage_options)

    def evaluate(self, unit: Unit) -> dict[str, Any]:
        """The unit's sums per prompt type, written to ``OUT/units/<unit>.json``; returns that record."""
        from ovsam.evaluation import evaluate_samples

        t0 = time.perf_counter()
        result: dict[str, Any] = {"unit": unit.name, "sums": {}, "skipped": {}}
        details = _Details()
        for prompt in self.cfg.prompts:
            skipped = {"instances_of_unmatched_categories": 0}
            if unit.shard is not None:
                samples = _shard_samples(self.cfg, unit)
            else:
                samples = _coco_samples(self.cfg, unit, self.vocabulary, self._gt, skipped)
            if prompt == "point":
                samples = (s for s in samples if s[1].get("masks") is not None)
            metric = evaluate_samples(self.model, samples, self.vocabulary, prompt=prompt,
                                      batch_size=self.cfg.batch_size,
                                      published_point_boxes=self.cfg.published_point_boxes,
                                      observe=lambda t, pred, ious, p, prompt=prompt: details.observe(
                                          prompt, t, pred, ious, p))
            result["sums"][prompt] = dict(sorted(metric.sums.items()))
            result["skipped"] = skipped
        result.update(details.as_dict())
        result["class_names"] = list(self.vocabulary.names)
        result["seconds"] = time.perf_counter() - t0
        write_unit(self.cfg, unit, result)
        return result


def _fs(cfg: EvalPromptsConfig) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    return fs, root.rstrip("/")


def write_unit(cfg: EvalPromptsConfig, unit: Unit, result: dict[str, Any]) -> None:
    fs, root = _fs(cfg)
    fs.makedirs(f"{root}/units", exist_ok=True)
    tmp = f"{root}/units/.{unit.name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump({**result, "config_hash": cfg.config_hash()}, f)
    fs.mv(tmp, f"{root}/units/{unit.name}.json")


def done_units(cfg: EvalPromptsConfig) -> dict[str, dict[str, Any]]:
    fs, root = _fs(cfg)
    fs.invalidate_cache(f"{root}/units")
    try:
        paths = fs.glob(f"{root}/units/*.json")
    except FileNotFoundError:
        return {}
    out = {}
    for p in paths:
        with fs.open(p, "r") as f:
            rec = json.load(f)
        if rec.get("config_hash") == cfg.config_hash():
            out[rec["unit"]] = rec
    return out


def check_output(cfg: EvalPromptsConfig, overwrite: bool = False) -> None:
    """Write ``OUT/eval.json``, or check that the one there is this configuration's (``overwrite``: start over)."""
    fs, root = _fs(cfg)
    path = f"{root}/eval.json"
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = json.load(f)
        if old.get("config_hash") != cfg.config_hash():
            if not overwrite:
                changed = sorted(k for k, v in cfg.hashed().items() if old.get("config", {}).get(k) != v)
                raise ValueError(f"--output {cfg.output} holds an evaluation with another configuration "
                                 f"(differs in: {', '.join(changed) or 'version'}); use a new --output, or "
                                 "--overwrite to start over")
            fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump({"config": cfg.hashed(), "config_hash": cfg.config_hash()}, f, indent=1)


def summarise(units: list[Unit], results: dict[str, dict[str, Any]], prompts: tuple[str, ...]) -> dict[str, Any]:
    """Add the units' sums up in unit order and summarise them per prompt type (``InstanceMetric.summary``)."""
    from ovsam.evaluation import InstanceMetric

    out: dict[str, Any] = {"units": len(units), "prompts": {}}
    skipped = 0
    for prompt in prompts:
        total: dict[str, float] = {}
        for unit in units:
            for k, v in results[unit.name]["sums"].get(prompt, {}).items():
                total[k] = total.get(k, 0.0) + float(v)
        out["prompts"][prompt] = {"summary": InstanceMetric.summary(total), "sums": total}
    for unit in units:
        skipped += int(results[unit.name].get("skipped", {}).get("instances_of_unmatched_categories", 0))
    out["instances_of_unmatched_categories"] = skipped
    names = next((results[u.name].get("class_names") for u in units if results[u.name].get("class_names")), None)
    out["class_names"] = names
    for prompt in prompts:
        per_class: dict[str, dict[str, float]] = {}
        worst: dict[str, list[dict[str, Any]]] = {"iou": [], "label": []}
        for unit in units:
            for c, d in results[unit.name].get("classes", {}).get(prompt, {}).items():
                acc = per_class.setdefault(c, {})
                for k, v in d.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
            for kind in worst:
                worst[kind] += results[unit.name].get("worst", {}).get(prompt, {}).get(kind, [])

        def where(r: dict[str, Any]) -> tuple:
            return json.dumps(r["source"], sort_keys=True), r["index"]

        worst["iou"].sort(key=lambda r: (r["iou"], *where(r)))
        worst["label"].sort(key=lambda r: (-r["score"], *where(r)))
        table = []
        for c, d in sorted(per_class.items(), key=lambda kv: int(kv[0])):
            table.append({"class": int(c), "name": names[int(c)] if names else str(c), "count": d["count"],
                          "acc": d["correct"] / d["count"] if d["count"] else None,
                          "miou": d["iou"] / d["masks"] if d.get("masks") else None})
        out["prompts"][prompt]["per_class"] = table
        out["prompts"][prompt]["worst"] = {k: v[:WORST] for k, v in worst.items()}
    return out


def run_eval_prompts(cfg: EvalPromptsConfig, *, overwrite: bool = False, progress: Any = print,
                     units: list[Unit] | None = None) -> dict[str, Any]:
    """Evaluate every unit not done yet (on Ray actors, or here with ``workers == 0``), then summarise; writes
    ``OUT/summary.json`` and returns the summary. ``units``: ``plan_units(cfg)`` if the caller has it already. The
    ground truth of ``cfg.gt`` is read once here (Ray actors read their own)."""
    for p in cfg.prompts:
        if p not in PROMPTS:
            raise ValueError(f"--prompt: unknown prompt type {p!r} (choose from {', '.join(PROMPTS)})")
    gt = load_gt(cfg.gt, cfg.storage_options) if cfg.gt else None
    units = plan_units(cfg, gt) if units is None else units
    check_output(cfg, overwrite)
    results = done_units(cfg)
    todo = [u for u in units if u.name not in results]
    if results:
        progress(f"[eval] resuming: {len(results)} of {len(units)} units done")
    if todo:
        if cfg.workers == 0:
            evaluator = UnitEvaluator(cfg, gt)
            for n, unit in enumerate(todo, 1):
                results[unit.name] = evaluator.evaluate(unit)
                progress(f"[eval] unit {unit.name} done ({len(results)}/{len(units)})")
        else:
            results.update(_run_on_ray(cfg, todo, len(units), len(results), progress))
    summary = summarise(units, results, cfg.prompts)
    summary["config"] = cfg.hashed()
    dataset = known_set(gt) if gt is not None else None
    if dataset is not None:
        summary["dataset"] = dataset
        summary["paper"] = PAPER_TABLE1[dataset]
    fs, root = _fs(cfg)
    with fs.open(f"{root}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _run_on_ray(cfg: EvalPromptsConfig, todo: list[Unit], total: int, done: int, progress: Any) -> dict:
    import ray

    from pipeline.annotate.run import plan_cluster

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
    plan = plan_cluster(cfg.workers, cfg.num_gpus_per_worker, cfg.cpus_per_worker)
    n = min(plan.workers, len(todo))
    env = {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(plan.num_cpus)))}}
    actor = ray.remote(UnitEvaluator).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, runtime_env=env,
                                              max_restarts=-1, max_task_retries=-1)
    device = "cuda" if plan.num_gpus > 0 else "cpu"
    workers = [actor.remote(replace(cfg, device=device)) for _ in range(n)]
    pool = ray.util.ActorPool(workers)
    results = {}
    for rec in pool.map_unordered(lambda a, u: a.evaluate.remote(u), todo):
        results[rec["unit"]] = rec
        done += 1
        progress(f"[eval] unit {rec['unit']} done ({done}/{total}, {rec['seconds']:.1f} s)")
    for w in workers:
        ray.kill(w)
    return results


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt type and split (all, base, novel) with instances: count, mIoU and accuracy (fractions; mIoU None
    without masks), and the paper's mIoU in percent where the set is one it reports (else None)."""
    paper = summary.get("paper") or {}
    rows = []
    for prompt, rec in summary["prompts"].items():
        s = rec["summary"]
        for split, prefix in (("all", ""), ("base", "base_"), ("novel", "novel_")):
            n = rec["sums"].get(prefix + "count", 0)
            if n:
                rows.append({"prompt": prompt, "split": split, "count": int(n), "miou": s.get(prefix + "miou"),
                             "acc": s[prefix + "acc"], "paper_miou": paper.get(prompt, {}).get(split)})
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """A table: per prompt type, IoU and accuracy over all, base and novel instances (percent), with the paper's
    IoU beside them where the set is one it reports (``summary["paper"]``)."""
    lines = [f"{'prompt':<8}{'split':<8}{'count':>9}{'mIoU':>8}{'acc':>8}"]
    for r in summary_rows(summary):
        line = (f"{r['prompt']:<8}{r['split']:<8}{r['count']:>9}"
                + (f"{100 * r['miou']:>8.1f}" if r["miou"] is not None else f"{'-':>8}") + f"{100 * r['acc']:>8.1f}")
        if r["paper_miou"] is not None:
            line += f"   paper: mIoU {r['paper_miou']:.1f} (released weights, Table 1)"
        lines.append(line)
    if summary.get("instances_of_unmatched_categories"):
        lines.append(f"({summary['instances_of_unmatched_categories']} ground-truth instances of categories no "
                     "vocabulary class names were left out)")
    return "\n".join(lines)


__all__ = ["EvalPromptsConfig", "PAPER_TABLE1", "PROMPTS", "WORST", "Unit", "UnitEvaluator", "check_output",
           "done_units", "format_summary", "image_file_name", "known_set", "plan_units", "resolve_vocabulary",
           "run_eval_prompts", "shard_set_vocabulary", "summarise", "summary_rows"]
