"""How far two annotation runs of the same input agree (``ovsam eval compare A B``): for precision, model and
version regressions.

Shards are paired by name and images by key. Within an image, instances are paired by their prompt first (the
same prompt type, box and points, to 1e-3 pixels: sidecar, whole-image and grid prompts are the same in both
runs), then what is left by mask IoU, greedily from the best pair down to ``min_iou`` (detector boxes move when
the detector's numbers do). Mask IoU is computed on the RLEs (no mask is decoded), for prompt pairs pair by pair
and otherwise only between masks whose boxes overlap, so memory grows with neither the image size nor the square
of the instance count. For the pairs the report gives label agreement, the distribution of mask IoU and the shift
of ``label_score`` (B - A); it counts what only one run has, and lists the worst pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.annotate.outputs import iter_committed

logger = logging.getLogger(__name__)

COLUMNS = ["image_key", "instance_index", "prompt_type", "prompt_box_xyxy", "prompt_points", "mask_rle",
           "label_name", "label_score"]
IOU_EDGES = (0.5, 0.75, 0.9, 0.95, 0.99)


def _prompt_key(row: dict[str, Any]) -> tuple:
    def rounded(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            return tuple(rounded(x) for x in v)
        return round(float(v), 3)

    return row["prompt_type"], rounded(row["prompt_box_xyxy"]), rounded(row["prompt_points"])


def _rle(row: dict[str, Any]) -> dict[str, Any]:
    return {"size": [int(v) for v in row["mask_rle"]["size"]], "counts": row["mask_rle"]["counts"]}


def _one_size(rles: list[dict[str, Any]]) -> bool:
    """Whether all masks have the same size (masks of different sizes are taken not to overlap)."""
    return len({tuple(r["size"]) for r in rles}) <= 1


def _pair_ious(ra: list[dict[str, Any]], rb: list[dict[str, Any]]) -> list[float]:
    """Mask IoU of ``ra[n]`` and ``rb[n]`` for each ``n``, on the RLEs (pycocotools; no mask is decoded)."""
    from pycocotools import mask as mask_utils

    if not _one_size(ra + rb):
        return [0.0] * len(ra)
    return [float(mask_utils.iou([x], [y], [0])[0, 0]) for x, y in zip(ra, rb)]


def _candidates(ra: list[dict[str, Any]], rb: list[dict[str, Any]], min_iou: float) -> list[tuple[float, int, int]]:
    """``(iou, r, c)`` for the mask pairs with ``iou >= min_iou > 0``, computed on the RLEs only for pairs whose
    tight boxes overlap (masks that share a pixel do; pycocotools skips the others the same way), one row of ``ra``
    at a time: memory is the candidates plus a few ``len(rb)`` arrays, and no mask is decoded."""
    from pycocotools import mask as mask_utils

    if not ra or not rb or not _one_size(ra + rb):
        return []
    box_a = np.asarray(mask_utils.toBbox(ra), dtype=np.float64).reshape(-1, 4)
    box_b = np.asarray(mask_utils.toBbox(rb), dtype=np.float64).reshape(-1, 4)
    bx0, by0, bx1, by1 = box_b[:, 0], box_b[:, 1], box_b[:, 0] + box_b[:, 2], box_b[:, 1] + box_b[:, 3]
    out = []
    for r, (x, y, w, h) in enumerate(box_a.tolist()):
        cs = np.flatnonzero((np.minimum(x + w, bx1) > np.maximum(x, bx0))
                            & (np.minimum(y + h, by1) > np.maximum(y, by0)))
        if cs.size:
            ious = mask_utils.iou([ra[r]], [rb[c] for c in cs], [0] * len(cs)).reshape(-1)
            out += [(float(v), r, int(c)) for v, c in zip(ious, cs) if v >= min_iou]
    return out


def pair_instances(a: list[dict], b: list[dict], min_iou: float = 0.5) -> tuple[list[tuple[int, int, float, str]],
                                                                                 list[int], list[int]]:
    """Pairs ``(i, j, mask IoU, "prompt"|"mask")`` of one image's instance rows, and the unpaired indices.

    Mask pairing is greedy: the candidate pairs by IoU, highest first (ties in row-major order), each taken unless
    one side is taken already, down to ``min_iou``. IoUs are computed on the RLEs, pair by pair for the prompt pairs
    and only for box-overlapping pairs for the rest, so memory stays ``O(len(a) + len(b) + candidates)`` however
    large the image. With ``min_iou <= 0`` the pairs of zero IoU follow in row-major order."""
    pairs = []
    by_prompt: dict[tuple, list[int]] = {}
    for j, row in enumerate(b):
        by_prompt.setdefault(_prompt_key(row), []).append(j)
    left_a = []
    used_b: set[int] = set()
    for i, row in enumerate(a):
        candidates = by_prompt.get(_prompt_key(row))
        if candidates:
            j = candidates.pop(0)
            used_b.add(j)
            pairs.append((i, j, -1.0, "prompt"))
        else:
            left_a.append(i)
    left_b = [j for j in range(len(b)) if j not in used_b]
    if pairs:
        ious = _pair_ious([_rle(a[i]) for i, _, _, _ in pairs], [_rle(b[j]) for _, j, _, _ in pairs])
        pairs = [(i, j, iou, how) for (i, j, _, how), iou in zip(pairs, ious)]
    if left_a and left_b:
        found = _candidates([_rle(a[i]) for i in left_a], [_rle(b[j]) for j in left_b], max(min_iou, 1e-300))
        found.sort(key=lambda t: (-t[0], t[1], t[2]))
        taken_a: set[int] = set()
        taken_b: set[int] = set()
        for iou, r, c in found:
            if r in taken_a or c in taken_b:
                continue
            taken_a.add(r)
            taken_b.add(c)
            pairs.append((left_a[r], left_b[c], iou, "mask"))
        if min_iou <= 0:  # every remaining pair qualifies: their IoU is 0, so row-major order
            for r in range(len(left_a)):
                for c in range(len(left_b)):
                    if r not in taken_a and c not in taken_b:
                        taken_a.add(r)
                        taken_b.add(c)
                        pairs.append((left_a[r], left_b[c], 0.0, "mask"))
        left_a = [i for n, i in enumerate(left_a) if n not in taken_a]
        left_b = [j for n, j in enumerate(left_b) if n not in taken_b]
    return pairs, left_a, left_b


@dataclass
class _Tally:
    ious: list[float] = field(default_factory=list)
    same_label: list[bool] = field(default_factory=list)
    shifts: list[float] = field(default_factory=list)
    by: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "mask": 0})
    only_a: int = 0
    only_b: int = 0
    lowest: list[tuple] = field(default_factory=list)
    changed: list[tuple] = field(default_factory=list)

    def keep(self, items: list[tuple], rank: tuple, rec: dict[str, Any], n: int) -> None:
        """Bounded: ``items`` holds at most ``4 n`` entries, and always the ``n`` smallest ranks seen."""
        items.append((*rank, rec))
        if len(items) > 4 * n:
            items.sort(key=lambda t: t[:-1])
            del items[n:]

    @staticmethod
    def first(items: list[tuple], n: int) -> list[dict[str, Any]]:
        return [t[-1] for t in sorted(items, key=lambda t: t[:-1])[:n]]


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    qs = {"min": 0.0, "p1": 0.01, "p5": 0.05, "median": 0.5}
    return {"mean": float(values.mean()), **{k: float(np.quantile(values, q)) for k, q in qs.items()}}


def compare_outputs(output_a: str, output_b: str, *, min_iou: float = 0.5, worst: int = 20,
                    storage_options: dict | None = None) -> dict[str, Any]:
    """The agreement report of two annotation outputs (see the module docstring)."""
    import fsspec

    storage_options = dict(storage_options or {})
    fs_a, root_a = fsspec.core.url_to_fs(output_a, **storage_options)
    fs_b, root_b = fsspec.core.url_to_fs(output_b, **storage_options)
    for fs, root, url in ((fs_a, root_a, output_a), (fs_b, root_b, output_b)):
        if not fs.exists(f"{root.rstrip('/')}/run.json"):
            raise ValueError(f"{url} is not the output of `ovsam annotate` (no run.json)")
    parts_b = {p.shard: p for p in iter_committed(fs_b, root_b.rstrip("/"), columns=COLUMNS)}
    t = _Tally()
    shards = {"both": 0, "only_a": 0, "only_b": 0}
    images = {"both": 0, "status_differs": 0, "only_a": 0, "only_b": 0}
    status_examples: list[str] = []
    for part_a in iter_committed(fs_a, root_a.rstrip("/"), columns=COLUMNS):
        part_b = parts_b.pop(part_a.shard, None)
        if part_b is None:
            shards["only_a"] += 1
            continue
        shards["both"] += 1
        status_a = {r["image_key"]: r["status"] for r in part_a.images.to_pylist()}
        status_b = {r["image_key"]: r["status"] for r in part_b.images.to_pylist()}
        images["only_a"] += len(status_a.keys() - status_b.keys())
        images["only_b"] += len(status_b.keys() - status_a.keys())
        rows_a: dict[str, list[dict]] = {}
        rows_b: dict[str, list[dict]] = {}
        for rows, table in ((rows_a, part_a.instances), (rows_b, part_b.instances)):
            for row in sorted(table.to_pylist(), key=lambda r: (r["image_key"], r["instance_index"])):
                rows.setdefault(row["image_key"], []).append(row)
        for key in sorted(status_a.keys() & status_b.keys()):
            images["both"] += 1
            if status_a[key] != status_b[key]:
                images["status_differs"] += 1
                if len(status_examples) < 10:
                    status_examples.append(f"{part_a.shard}/{key}: {status_a[key]} -> {status_b[key]}")
            a, b = rows_a.get(key, []), rows_b.get(key, [])
            pairs, left_a, left_b = pair_instances(a, b, min_iou)
            t.only_a += len(left_a)
            t.only_b += len(left_b)
            for i, j, iou, how in pairs:
                ra, rb = a[i], b[j]
                t.by[how] += 1
                t.ious.append(iou)
                t.same_label.append(ra["label_name"] == rb["label_name"])
                t.shifts.append(float(rb["label_score"]) - float(ra["label_score"]))
                rec = {"shard": part_a.shard, "image_key": key, "instance_a": ra["instance_index"],
                       "instance_b": rb["instance_index"], "iou": iou, "label_a": ra["label_name"],
                       "label_b": rb["label_name"], "score_a": float(ra["label_score"]),
                       "score_b": float(rb["label_score"]), "mask_a": _rle(ra), "mask_b": _rle(rb)}
                where = (part_a.shard, key, ra["instance_index"])
                t.keep(t.lowest, (iou, *where), rec, worst)
                if ra["label_name"] != rb["label_name"]:
                    t.keep(t.changed, (-max(rec["score_a"], rec["score_b"]), *where), rec, worst)
    shards["only_b"] = len(parts_b)
    ious = np.asarray(t.ious, dtype=np.float64)
    shifts = np.asarray(t.shifts, dtype=np.float64)
    n = len(t.ious)
    edges = (0.0, *IOU_EDGES, 1.0 + 1e-12)
    hist = {f"[{lo:g}, {min(hi, 1.0):g}{']' if hi > 1 else ')'}": int(((ious >= lo) & (ious < hi)).sum())
            for lo, hi in zip(edges[:-1], edges[1:])}
    worst_iou = t.first(t.lowest, worst)
    wrong = t.first(t.changed, worst)
    return {
        "a": output_a, "b": output_b, "shards": shards, "images": images, "status_changes": status_examples,
        "instances": {"pairs": n, "paired_by_prompt": t.by["prompt"], "paired_by_mask": t.by["mask"],
                      "only_a": t.only_a, "only_b": t.only_b},
        "label_agreement": float(np.mean(t.same_label)) if n else None,
        "mask_iou": {**_quantiles(ious), "histogram": hist,
                     "at_least_0.98": float((ious >= 0.98).mean()) if n else None},
        "score_shift": ({"mean": float(shifts.mean()), "mean_abs": float(np.abs(shifts).mean()),
                         "max_abs": float(np.abs(shifts).max()), "std": float(shifts.std())} if n else {}),
        "worst_iou": worst_iou, "label_changes": wrong,
    }


def format_compare(report: dict[str, Any], rows: int = 10) -> str:
    s, im, ins = report["shards"], report["images"], report["instances"]
    lines = [f"A: {report['a']}", f"B: {report['b']}",
             f"shards: {s['both']} in both, {s['only_a']} only in A, {s['only_b']} only in B",
             f"images: {im['both']} in both ({im['status_differs']} with another status), {im['only_a']} only in A, "
             f"{im['only_b']} only in B",
             f"instances: {ins['pairs']} pairs ({ins['paired_by_prompt']} by prompt, {ins['paired_by_mask']} by "
             f"mask IoU), {ins['only_a']} only in A, {ins['only_b']} only in B"]
    lines += [f"  {c}" for c in report["status_changes"]]
    if ins["pairs"]:
        q = report["mask_iou"]
        lines.append(f"label agreement: {100 * report['label_agreement']:.2f}%")
        lines.append(f"mask IoU: mean {q['mean']:.4f}, median {q['median']:.4f}, p5 {q['p5']:.4f}, p1 {q['p1']:.4f}, "
                     f"min {q['min']:.4f}; {100 * q['at_least_0.98']:.1f}% >= 0.98")
        lines.append("  " + "  ".join(f"{k} {v}" for k, v in q["histogram"].items()))
        sh = report["score_shift"]
        lines.append(f"label_score shift (B - A): mean {sh['mean']:+.5f}, mean |.| {sh['mean_abs']:.5f}, "
                     f"max |.| {sh['max_abs']:.5f}")
        for title, items in (("lowest mask IoU", report["worst_iou"]), ("label changes", report["label_changes"])):
            if items:
                lines.append(f"{title}:")
                for w in items[:rows]:
                    lines.append(f"  {w['shard']}/{w['image_key']} #{w['instance_a']}/#{w['instance_b']}: IoU "
                                 f"{w['iou']:.3f}, {w['label_a']} ({w['score_a']:.3f}) -> {w['label_b']} "
                                 f"({w['score_b']:.3f})")
    return "\n".join(lines)


__all__ = ["compare_outputs", "format_compare", "pair_instances"]
