"""How far a reduced precision moves the model's answers: labels and masks of bf16 (or fp16) against fp32.

    .venv/bin/python bench/agreement.py                       # the model `make demo` trains, on its held-out scenes
    .venv/bin/python bench/agreement.py --model ovsam-rn50x16 --scenes 8     # random weights, same scenes
    .venv/bin/python bench/agreement.py --checkpoint m.safetensors --vocabulary v.safetensors --heldout DIR

Every ground-truth box of the held-out scenes (``ovsam pack synthetic`` shards, ``classes.json`` beside them) is a
prompt. The same weights are built twice, at fp32 and at ``--precision``, and each prompt is answered by both
(``ovsam.predict_batch``, one image at a time). Printed, and written with ``--json PATH``:

- ``label_agreement``: the fraction of prompts whose top-1 label is the same at both precisions;
- ``mask_miou``: the mean over prompts of the IoU between the two precisions' masks (1 where both are empty);
- ``max_label_score_diff``: the largest absolute difference of a class probability;
- ``fp32_top1`` / ``low_top1``: each precision's top-1 accuracy against the ground truth (meaningful for a trained
  model; the demo model's vocabulary is the one it was trained against).

Without ``--checkpoint`` the default is ``demo_out/model/ovsam-tiny-synthetic.safetensors`` with its vocabulary and
held-out shards; ``--model NAME`` instead builds a random-init model and embeds the scenes' class names with its
own (random) text tower.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, as bench/pipeline.py

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEMO_MODEL = Path("demo_out/model/ovsam-tiny-synthetic.safetensors")


def heldout_scenes(url: str, limit: int | None) -> tuple[list, list[str]]:
    """``[(image, boxes [N, 4], labels [N])]`` of a packed shard set, and its class names."""
    from pipeline.training.train_data import decode_raw, open_shard_set, raw_samples

    shard_set = open_shard_set(url)
    if shard_set.classes is None:
        raise ValueError(f"{url} has no classes.json")
    names = list(shard_set.classes.classes)
    scenes = []
    for sample in raw_samples(list(shard_set.shards), split_workers=False):
        _, image, record = decode_raw(sample)
        if record.boxes:
            scenes.append((image, np.asarray(record.boxes, dtype=float), np.asarray(record.labels)))
        if limit is not None and len(scenes) >= limit:
            break
    return scenes, names


def compare(reference: list, other: list, truth: list[np.ndarray]) -> dict[str, float]:
    """Agreement of two lists of numpy predictions (one per scene) over all their prompts."""
    same, ious, diffs, ref_ok, low_ok = [], [], [], [], []
    for a, b, gt in zip(reference, other, truth):
        same += list(a.labels == b.labels)
        inter = (a.masks & b.masks).sum(axis=(1, 2))
        union = (a.masks | b.masks).sum(axis=(1, 2))
        ious += list(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
        diffs.append(float(np.abs(a.label_scores - b.label_scores).max()))
        ref_ok += list(a.labels == gt)
        low_ok += list(b.labels == gt)
    return {"prompts": len(same), "label_agreement": float(np.mean(same)), "mask_miou": float(np.mean(ious)),
            "min_mask_iou": float(np.min(ious)), "max_label_score_diff": max(diffs),
            "fp32_top1": float(np.mean(ref_ok)), "low_top1": float(np.mean(low_ok))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", help="a project checkpoint (default: the demo's trained model)")
    parser.add_argument("--vocabulary", help="the vocabulary to label with (default: the checkpoint's .vocab file)")
    parser.add_argument("--heldout", help="a packed shard set with classes.json (default: the demo's held-out set)")
    parser.add_argument("--model", help="build this model with random weights instead of loading a checkpoint")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--scenes", type=int, default=None, help="use the first N scenes (default: all)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)

    import ovsam
    from jobs.train import vocabulary_url

    checkpoint = None if args.model else Path(args.checkpoint or DEMO_MODEL)
    if checkpoint is not None and not checkpoint.exists():
        print(f"agreement: {checkpoint} does not exist; run `make demo` first or pass --checkpoint/--model",
              file=sys.stderr)
        return 2
    heldout = args.heldout or str((checkpoint or DEMO_MODEL).parent / "data" / "synthetic" / "heldout")
    scenes, names = heldout_scenes(heldout, args.scenes)
    images = [s[0] for s in scenes]
    prompts = [{"box": s[1]} for s in scenes]
    truth = [s[2] for s in scenes]

    results = {}
    for precision in ("fp32", args.precision):
        model = ovsam.build_ovsam(args.model or None, checkpoint=checkpoint, precision=precision)
        if precision == "fp32":
            if args.model:
                vocab = ovsam.Vocabulary.from_names(names, model, progress=False)
            else:
                vocab = ovsam.Vocabulary.load(args.vocabulary or vocabulary_url(str(checkpoint), "synthetic"))
        start = time.perf_counter()
        results[precision] = [ovsam.predict_batch(model, [im], [p], vocab)[0] for im, p in zip(images, prompts)]
        print(f"{model.config.name} {precision}: {len(images)} scenes in {time.perf_counter() - start:.1f} s",
              flush=True)
    out = {"model": args.model or str(checkpoint), "precision": args.precision, "scenes": len(images),
           **compare(results["fp32"], results[args.precision], truth)}
    for key, value in out.items():
        print(f"  {key:22s} {value if not isinstance(value, float) else f'{value:.4f}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
