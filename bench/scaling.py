"""Cost per image as the boxes and the vocabulary grow: the image side apart from the per-box part.

Launch (from the repository root):

    .venv/bin/python bench/scaling.py                                   # ovsam-rn50x16, auto precision
    .venv/bin/python bench/scaling.py --precision fp32 --boxes 1,10,100 --json scaling.json --plot scaling.png
    .venv/bin/python bench/scaling.py --tiny --boxes 1,4 --repeats 1     # ovsam-tiny, seconds

One image of 1024 x 768 pixels (resized and padded to the model's input), ``--boxes`` box prompts (seeded random
boxes, sides 5-50% of the image's; 1, 10, 30, 100, 300 by default), each decoded to a mask at the original size
and labelled against each vocabulary of ``--vocabularies``: the built-in ``coco`` (80 classes), ``lvis`` (1,203)
and ``imagenet21k`` (21,841) lists with random unit-norm embeddings and their real numbers of synonym prototypes
(17, 2 and 15; ``--prototypes P`` overrides them), or class counts (one prototype each).

The numbers:

- ``image``: the image side (``ovsam.batch.encode_images``: CLIP trunk, SAM2CLIP neck, FPN), which does not
  depend on the boxes or the vocabulary: GFLOPs and p50 seconds of ``--repeats`` timed passes after ``--warmup``.
- ``boxes``: the per-box part of the image (``ovsam.batch.predict_torch_prompts`` over all its boxes: prompt
  encoder, decoder, masks at the original size, recognition, scores against the vocabulary), per vocabulary and
  box count: GFLOPs and p50 seconds the same way. ``total`` = image + boxes, the cost per image.
- GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on an extra fp32 pass (2 per multiply-add of
  matrix products, convolutions and attention; see ``bench/model.py``), times are wall-clock with the device
  synchronised.
- ``per_box``: the cost of one more box, per vocabulary: the least-squares slope of the per-box part's GFLOPs and
  seconds over the box counts (per-box cost without the part's fixed cost per call).
- ``per_box_increase``: how much more a box costs with the largest vocabulary than with the smallest (80 ->
  21,841 classes by default): ``slope(largest) / slope(smallest) - 1``, in GFLOPs and in time, each checked
  against ``--max-increase`` (5%). Also per box count: ``boxes(largest, n) / boxes(smallest, n) - 1``.

``--plot PATH`` (default ``bench/scaling.png``; ``--plot ''`` for none) draws GFLOPs and seconds per image against
the box count (log scale), one line per vocabulary, with the image side as a dashed line.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_BOXES = "1,10,30,100,300"
DEFAULT_VOCABULARIES = "coco,lvis,imagenet21k"
DEFAULT_PLOT = str(Path(__file__).resolve().parent / "scaling.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/scaling.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of bench/scaling.py) for what each number means.")
    p.add_argument("--model", default="ovsam-rn50x16", choices=("ovsam-rn50x16", "ovsam-convnext-large"))
    p.add_argument("--tiny", action="store_true", help="the model's tiny config (tests, smoke runs)")
    p.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto (default: auto)")
    p.add_argument("--boxes", default=DEFAULT_BOXES, help=f"box counts (default: {DEFAULT_BOXES})")
    p.add_argument("--vocabularies", default=DEFAULT_VOCABULARIES,
                   help=f"built-in lists or class counts, smallest first (default: {DEFAULT_VOCABULARIES})")
    p.add_argument("--prototypes", type=int, default=None, help="prototypes per class (default: each list's own)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each measurement (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before timing (default: 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: ovsam.runtime.keep_freed_memory, as the job does)")
    p.add_argument("--max-increase", type=float, default=0.05,
                   help="acceptance bound on the per-box cost increase (default: 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH", help="PNG plot path ('' for none)")
    return p


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (the cost of one more box); ``ys[0] / xs[0]`` for one point."""
    n = len(xs)
    if n == 1:
        return ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.common import (ORIGINAL_SIZE, count_flops, machine_info, percentile, random_boxes,
                              random_vocabulary, timed)
    from bench.model import _int_list, parse_vocabulary
    from bench.systems import OvsamSystem, StageClock, make_inputs
    from ovsam.runtime import keep_freed_memory

    box_counts = sorted(set(_int_list("--boxes", args.boxes)))
    vocab_specs = [parse_vocabulary(v.strip()) for v in args.vocabularies.split(",") if v.strip()]
    if len(vocab_specs) < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("need at least one vocabulary, --repeats >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()

    t = time.perf_counter()
    system = OvsamSystem(args.model, args.tiny, args.device, args.precision, 1)
    build_s = time.perf_counter() - t
    dev = system.device
    model = system.model
    inputs = make_inputs(1, system.image_size, ORIGINAL_SIZE, dev, system.memory_format, args.seed)
    boxes = {n: [random_boxes(n, inputs.input_size, seed=args.seed * 100_003 + n, device=dev)] for n in box_counts}
    scratch = StageClock(dev)

    def timed_samples(fn) -> list[float]:
        for _ in range(args.warmup):
            fn()
        return [timed(fn, dev)[0] for _ in range(args.repeats)]

    with torch.no_grad():
        with system.full_precision():
            image_flops, _ = count_flops(lambda: system.image_pass(inputs, scratch))
        features = system.image_pass(inputs, scratch)
        image_samples = timed_samples(lambda: system.image_pass(inputs, scratch))
        image = {"gflops": image_flops / 1e9, "p50_s": percentile(image_samples, 50), "samples_s": image_samples}
        print(f"[scaling] image side: {image['gflops']:.1f} GFLOPs, p50 {image['p50_s']:.3f}s", flush=True)
        if system.precision != "fp32":
            with system.full_precision():
                features32 = system.image_pass(inputs, scratch)
        else:
            features32 = features

        vocabularies = []
        for spec in vocab_specs:
            vocab = random_vocabulary(spec, model.text_dim, model.clip_model_name, args.prototypes, args.seed)
            system.set_vocabulary(vocab)
            entry: dict[str, Any] = {"name": str(spec), "classes": len(vocab), "prototypes": vocab.num_prototypes,
                                     "rows": []}
            for n in box_counts:
                with system.full_precision():
                    flops, _ = count_flops(lambda: system.box_pass(features32, inputs, boxes[n], scratch))
                samples = timed_samples(lambda: system.box_pass(features, inputs, boxes[n], scratch))
                p50 = percentile(samples, 50)
                entry["rows"].append({
                    "boxes": n, "boxes_gflops": flops / 1e9, "boxes_p50_s": p50, "samples_s": samples,
                    "total_gflops": image["gflops"] + flops / 1e9, "total_p50_s": image["p50_s"] + p50,
                })
                print(f"[scaling] {spec} ({len(vocab)} classes, P={vocab.num_prototypes}), {n} boxes: "
                      f"{flops / 1e9:.1f} GFLOPs, p50 {p50:.3f}s", flush=True)
            xs = [r["boxes"] for r in entry["rows"]]
            entry["per_box"] = {"gflops": slope(xs, [r["boxes_gflops"] for r in entry["rows"]]),
                                "seconds": slope(xs, [r["boxes_p50_s"] for r in entry["rows"]])}
            vocabularies.append(entry)
            system.set_vocabulary(random_vocabulary(1, model.text_dim, model.clip_model_name))  # free the big one
            del vocab

    small, large = vocabularies[0], vocabularies[-1]
    increase = {
        "from_classes": small["classes"], "to_classes": large["classes"],
        "gflops": large["per_box"]["gflops"] / small["per_box"]["gflops"] - 1,
        "seconds": large["per_box"]["seconds"] / small["per_box"]["seconds"] - 1,
        "by_boxes": [{"boxes": a["boxes"], "gflops": b["boxes_gflops"] / a["boxes_gflops"] - 1,
                      "seconds": b["boxes_p50_s"] / a["boxes_p50_s"] - 1}
                     for a, b in zip(small["rows"], large["rows"])],
        "max_increase": args.max_increase,
    }
    increase["gflops_ok"] = increase["gflops"] <= args.max_increase
    increase["seconds_ok"] = increase["seconds"] <= args.max_increase
    return {
        "model": model.config.name, "precision": system.precision,
        "image": image, "vocabularies": vocabularies, "per_box_increase": increase, "build_s": build_s,
        "machine": machine_info(args.device),
        "settings": {"model": args.model, "tiny": args.tiny, "boxes": box_counts, "repeats": args.repeats,
                     "warmup": args.warmup, "device": args.device, "prototypes": args.prototypes,
                     "vocabularies": [str(v) for v in vocab_specs], "seed": args.seed},
    }


def format_table(r: dict[str, Any]) -> str:
    m, inc = r["machine"], r["per_box_increase"]
    lines = [f"{r['model']} {r['precision']} on {m.get('gpu') or m['cpu']} ({m['torch_threads']} threads), {m['date']}",
             f"image side: {r['image']['gflops']:.1f} GFLOPs, {r['image']['p50_s']:.3f} s (p50)", ""]
    head = f"{'boxes':>6}"
    for v in r["vocabularies"]:
        head += f"  | {v['name'] + ' (' + str(v['classes']) + ', P=' + str(v['prototypes']) + ')':^38}"
    lines.append(head)
    sub = f"{'':>6}" + "  | {:>9}{:>9}{:>10}{:>10}".format("box GF", "total GF", "box s", "total s") * len(r["vocabularies"])
    lines.append(sub)
    for i, n in enumerate(r["settings"]["boxes"]):
        line = f"{n:>6}"
        for v in r["vocabularies"]:
            row = v["rows"][i]
            line += (f"  | {row['boxes_gflops']:9.2f}{row['total_gflops']:9.1f}{row['boxes_p50_s']:10.3f}"
                     f"{row['total_p50_s']:10.3f}")
        lines.append(line)
    lines.append("")
    for v in r["vocabularies"]:
        lines.append(f"per box ({v['name']}, {v['classes']} classes): {v['per_box']['gflops']:.3f} GFLOPs, "
                     f"{1000 * v['per_box']['seconds']:.1f} ms")
    bound = 100 * inc["max_increase"]
    lines.append(f"per-box cost increase {inc['from_classes']} -> {inc['to_classes']} classes: "
                 f"GFLOPs {100 * inc['gflops']:+.1f}% ({'ok' if inc['gflops_ok'] else 'FAILS'} <= {bound:.0f}%), "
                 f"time {100 * inc['seconds']:+.1f}% ({'ok' if inc['seconds_ok'] else 'FAILS'} <= {bound:.0f}%)")
    lines.append("  by box count: " + ", ".join(f"{b['boxes']}: {100 * b['gflops']:+.1f}% GFLOPs / "
                                                 f"{100 * b['seconds']:+.1f}% time" for b in inc["by_boxes"]))
    return "\n".join(lines)


def plot(r: dict[str, Any], path: str) -> None:
    """GFLOPs and seconds per image (linear, from 0) against boxes (log), a line per vocabulary; the image side
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, image_key, label in ((axes[0], "total_gflops", "gflops", "GFLOPs per image"),
                                      (axes[1], "total_p50_s", "p50_s", "seconds per image (p50)")):
        for v in r["vocabularies"]:
            xs = [row["boxes"] for row in v["rows"]]
            ax.plot(xs, [row[key] for row in v["rows"]], marker="o",
                    label=f"{v['name']} ({v['classes']:,} classes, P={v['prototypes']})")
        ax.axhline(r["image"][image_key], color="grey", linestyle="--", label="image side alone")
        ax.set_xscale("log")
        ax.set_xticks(r["settings"]["boxes"])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("boxes per image")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    inc = r["per_box_increase"]
    m = r["machine"]
    fig.suptitle(f"{r['model']} {r['precision']} on {m.get('gpu') or m['cpu']}: per-box cost "
                 f"{inc['from_classes']} -> {inc['to_classes']:,} classes {100 * inc['gflops']:+.1f}% GFLOPs, "
                 f"{100 * inc['seconds']:+.1f}% time", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except ValueError as e:
        print(f"bench/scaling.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"[scaling] wrote {args.json_path}")
    if args.plot:
        try:
            plot(result, args.plot)
            print(f"[scaling] wrote {args.plot}")
        except ImportError:
            print("[scaling] no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
