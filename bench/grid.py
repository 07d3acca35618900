"""Everything mode's settings measured: how many of the synthetic world's held-out objects a point grid finds.

Launch (from the repository root, after ``make demo``):

    .venv/bin/python bench/grid.py                                  # demo_out's model and held-out scenes
    .venv/bin/python bench/grid.py --demo DIR --points 16,24 --stability 0.95,0.9,0.8 --json grid.json

For each setting (points per side x stability-score threshold x box-NMS threshold x minimum mask area) it runs
``ovsam.OvsamMaskGenerator`` with the demo's trained ``ovsam-tiny`` and vocabulary on every held-out scene
(``DIR/model/data/synthetic/heldout``, whose sidecars hold the visible masks) and reports:

- ``recall``: the share of ground-truth objects that some kept mask covers at IoU >= ``--iou`` (0.5);
- ``precision``: the share of kept masks that match some object at that IoU;
- ``label_acc``: of the matched objects, the share whose best-IoU mask has the object's class as its label;
- ``masks/img`` and ``s/img`` (wall time of ``generate``, this machine).

Recall is what ``--prompts grid`` is for (a reviewer deletes a spurious mask faster than drawing a missed one), so
the defaults are the cheapest setting with the highest recall; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def heldout_scenes(demo: Path, limit: int | None) -> list[tuple[np.ndarray, list[np.ndarray], list[str]]]:
    """(image, visible masks, class names) of the demo's held-out scenes."""
    from pycocotools import mask as mask_utils

    from pipeline.inputs.decode import decode_sample
    from pipeline.inputs.sources import expand_shards, open_shard

    root = demo / "model" / "data" / "synthetic" / "heldout"
    classes = json.loads((root / "classes.json").read_text())["classes"]
    scenes = []
    for ref in expand_shards(str(root / "*.tar")):
        for sample in open_shard(ref):
            d = decode_sample(sample)
            if d.status != "ok" or not d.sidecar or not d.sidecar.get("masks"):
                continue
            masks = [mask_utils.decode(r).astype(bool) for r in d.sidecar["masks"]]
            names = [classes[i] if isinstance(i, int) else str(i) for i in d.sidecar["labels"]]
            scenes.append((d.image, masks, names))
            if limit is not None and len(scenes) >= limit:
                return scenes
    return scenes


def evaluate(generator: Any, scenes: list, iou_thresh: float) -> dict[str, float]:
    found = objects = matched_masks = kept = correct = 0
    seconds = 0.0
    for image, masks, names in scenes:
        t = time.perf_counter()
        records = generator.generate(image)
        seconds += time.perf_counter() - t
        pred = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0,) + masks[0].shape, bool)
        gt = np.stack(masks)
        inter = np.einsum("phw,ghw->pg", pred.astype(np.float32), gt.astype(np.float32))
        union = pred.sum((1, 2))[:, None] + gt.sum((1, 2))[None, :] - inter
        iou = inter / np.maximum(union, 1)
        objects += len(masks)
        kept += len(records)
        if len(records):
            hit = iou.max(axis=0) >= iou_thresh
            found += int(hit.sum())
            matched_masks += int((iou.max(axis=1) >= iou_thresh).sum())
            best = iou.argmax(axis=0)
            correct += sum(1 for g in np.flatnonzero(hit) if records[best[g]].get("label_name") == names[g])
    return {"recall": found / max(objects, 1), "precision": matched_masks / max(kept, 1),
            "label_acc": correct / max(found, 1), "masks_per_image": kept / max(len(scenes), 1),
            "seconds_per_image": seconds / max(len(scenes), 1), "objects": objects, "images": len(scenes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="demo_out", help="the output directory of `make demo` (default: demo_out)")
    p.add_argument("--points", default="16,24,32", help="points per side to try (default: 16,24,32)")
    p.add_argument("--stability", default="0.95,0.9,0.85,0.8,0.7", help="stability-score thresholds to try")
    p.add_argument("--nms", default="0.7", help="box-NMS thresholds to try (default: 0.7)")
    p.add_argument("--min-area", default="0", help="minimum mask areas to try (default: 0)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU at which an object counts as found (default: 0.5)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many held-out scenes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH")
    args = p.parse_args(argv)

    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process (tests) keep their thread count


def _run(args: argparse.Namespace) -> int:
    import ovsam

    demo = Path(args.demo)
    model_dir = demo / "model"
    checkpoint = model_dir / "ovsam-tiny-synthetic.safetensors"
    vocab = next(model_dir.glob("*.vocab.safetensors"))
    model = ovsam.build_ovsam("ovsam-tiny", checkpoint=str(checkpoint))
    vocabulary = ovsam.Vocabulary.resolve(str(vocab), model, progress=False)
    scenes = heldout_scenes(demo, args.limit)
    print(f"[grid] {len(scenes)} held-out scenes, {sum(len(m) for _, m, _ in scenes)} objects; model {checkpoint}")
    rows = []
    grid = itertools.product([int(v) for v in args.points.split(",")], [float(v) for v in args.stability.split(",")],
                             [float(v) for v in args.nms.split(",")], [int(v) for v in args.min_area.split(",")])
    print(f"{'points':>6} {'stab':>5} {'nms':>5} {'area':>5} {'recall':>7} {'prec':>6} {'label':>6} "
          f"{'masks/img':>9} {'s/img':>6}")
    for points, stab, nms, area in grid:
        gen = ovsam.OvsamMaskGenerator(model, vocabulary, points_per_side=points, stability_score_thresh=stab,
                                       box_nms_thresh=nms, min_mask_area=area)
        r = {"points_per_side": points, "stability_score_thresh": stab, "box_nms_thresh": nms,
             "min_mask_area": area, **evaluate(gen, scenes, args.iou)}
        rows.append(r)
        print(f"{points:>6} {stab:>5.2f} {nms:>5.2f} {area:>5} {r['recall']:>7.3f} {r['precision']:>6.3f} "
              f"{r['label_acc']:>6.3f} {r['masks_per_image']:>9.1f} {r['seconds_per_image']:>6.2f}", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"rows": rows, "iou": args.iou, "checkpoint": str(checkpoint)},
                                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
