"""Model cost per system, precision and box count: parameters, GFLOPs, warm latency and its distance from the
FLOP floor, with the time per stage.

Launch (from the repository root):

    .venv/bin/python bench/model.py --tiny                                      # every system, tiny configs, seconds
    .venv/bin/python bench/model.py --systems ovsam-rn50x16 --precisions fp32,bf16 --boxes 1,10,100 --repeats 3
    .venv/bin/python bench/model.py --systems image-crop,feature-crop --precisions bf16 --boxes 10 --json b.json
    python bench/model.py --device cuda --systems ovsam-rn50x16 --precisions bf16 --compile --batch 1,16
    .venv/bin/python bench/model.py --systems owlv2+ovsam,grounding-dino+ovsam,sam3,grid,proposals:owlv2 \
        --precisions bf16 --classes 80,1203 --max-calls 1 --sam3-batch 1 --repeats 1    # open-world, 2-core CPU

Systems (``bench/systems.py`` says exactly what each runs): ``ovsam-rn50x16`` (this project), ``image-crop``
(SAM ViT-H masks, then CLIP RN50x16 on each masked box crop at 384 x 384), ``feature-crop`` (SAM ViT-H masks plus
one CLIP RN50x16 trunk pass at 1024 x 1024, C5 pooled inside each mask), ``ovsam-convnext-large``. All weights are
random: cost does not depend on their values. ``--tiny`` maps the systems to tiny configs (``ovsam-tiny``,
``sam-tiny`` + ``ovsam-tiny``'s CLIP, ``ovsam-tiny`` with a ``convnext_atto`` trunk) so the whole matrix runs in
seconds (about a minute more with the open-world systems); its numbers only show that the benchmark works.

Open-world systems (``bench/open_world.py``; named with ``--systems``, or all of them with ``--tiny``): one image
with no given boxes, found and named at each vocabulary of ``--classes`` (80 = COCO with its synonyms, 1203 = LVIS):
``owlv2+ovsam`` and ``grounding-dino+ovsam`` (the project's detectors queried with the vocabulary, their top
``--detections`` boxes, then OV-SAM), ``sam3`` (transformers' SAM 3, one text concept per class), ``grid`` (OV-SAM's
everything mode, 32 x 32 points) and ``proposals:owlv2`` (OWLv2 objectness boxes, then OV-SAM). Their rows have
``batch`` 1, ``boxes`` = the prompts OV-SAM (or SAM 3's mask output) got, ``classes``; ``--max-calls`` runs fewer of
their repeated calls and extrapolates (``extrapolated``); once-per-vocabulary text work is in ``text_gflops`` /
``text_s``, not in ``gflops`` / ``p50_s``. ``--tiny`` maps them to the tiny random detectors and SAM 3 of
``pipeline/annotate/detectors/tiny.py`` and ``ovsam-tiny``, with ``--max-calls 8`` unless given.

The work of one row: a pass over ``--batch`` images of 1024 x 768 pixels (resized and padded to the model's input
size), each with ``boxes`` box prompts (seeded random boxes, sides 5-50% of the image's), every box decoded to a
mask at the original size and labelled against a vocabulary of random unit-norm embeddings (``--vocabulary``,
default ``coco``: its 80 classes with their real 17 synonym prototypes).

How each number is made:

- ``ceilings``: the machine's matrix-product rate, measured at the start of this run: a ``--matmul-size``
  (4096) square product in fp32 and in bf16 (and fp16 if asked for), best of 3 loops, in GFLOP/s (2 FLOPs per
  multiply-add). On CUDA, fp32 means torch's default (TF32 off).
- ``params``: parameters (millions) of the modules that run per image (the OV-SAM text tower, used only to build
  vocabularies, is left out).
- ``gflops``: FLOPs of the row's whole pass (image side + every box of every image), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on an extra eager pass in fp32 (the count does not depend on the
  precision, so one count serves every precision of a system and batch): matrix products, convolutions and
  attention, 2 per multiply-add; element-wise ops, RoIAlign and resizing count zero. ``gflops_image`` and
  ``gflops_boxes`` split it.
- latency: the image-level stages and the per-box stages are timed separately, ``--repeats`` R times each, after
  ``--warmup`` untimed passes (with ``--compile``, at least two compiled ones),
  each timing with the device synchronised before and after (``torch.cuda.synchronize`` on CUDA). A row's latency
  samples are ``image_sample[k] + boxes_sample[k]`` for k < R (one image-side measurement serves every box count
  of that system, precision and batch; a SAM ViT-H fp32 pass alone takes ~80 s on a 2-core CPU). ``p50_s`` /
  ``p90_s`` are their percentiles (linear interpolation), per pass; ``images_per_s`` = batch / p50.
- ``floor_s`` = GFLOPs / the ceiling of the row's precision: the time the pass would take if all its counted work
  ran at the matrix-product rate. ``ratio`` = p50 / floor (1 is the ideal; what lies above is lower kernel
  efficiency than a big matrix product, uncounted work, Python and host-device overhead).
- ``stages``: median seconds per pass of each stage. OV-SAM: ``encode_images`` (the whole image side, as timed
  for the latency), then ``trunk`` (CLIP), ``neck`` (SAM2CLIP) and ``fpn`` from a separate stage-by-stage
  pass (``--stage-repeats`` times, eager only, so not with ``--compile``); the per-box side is
  ``decode+recognition`` (prompt encoder, decoder, recognition and scores, all images' boxes together) and
  ``masks+labels`` (masks upscaled to the original size and thresholded, their boxes, labels). Baselines:
  ``sam_encoder`` (+ ``clip_trunk``), ``sam_decode``, ``crops`` + ``clip_crops`` or ``mask_pool+proj``,
  ``classify``; each stage synchronises the device on both sides.

JSON (``--json PATH``): ``{"ceilings": {"fp32": GFLOP/s, "bf16": GFLOP/s}, "rows": [{"system", "precision",
"boxes", "gflops", "p50_s", "p90_s", "floor_s", "ratio", "params_m", "stages", ...}], "machine": {...},
"settings": {...}, "errors": [...]}``. A system that fails (say, out of memory) is reported in ``errors`` and the
run goes on.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, as bench/pipeline.py

import argparse
import gc
import json
import logging
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SYSTEMS = "ovsam-rn50x16,image-crop,feature-crop,ovsam-convnext-large"


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, e.g. 1,10,100; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} expects positive integers, e.g. 1,10,100; got {text!r}")
    return values


def parse_vocabulary(text: str) -> int | str:
    """``coco`` / ``lvis`` / ``imagenet21k`` (built-in lists, random embeddings) or a class count."""
    from ovsam import Vocabulary

    if text.isdigit() and int(text) > 0:
        return int(text)
    if text in Vocabulary.builtin_names():
        return text
    raise ValueError(f"--vocabulary expects a class count or one of {', '.join(Vocabulary.builtin_names())}; "
                     f"got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/model.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of bench/model.py) for what each number means.")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated (default: {DEFAULT_SYSTEMS}; with --tiny every system, the open-world "
                        "ones of bench/open_world.py too)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated fp32/bf16/fp16/auto (default: fp32,bf16)")
    p.add_argument("--boxes", default="1,10,100", help="box prompts per image, comma-separated (default: 1,10,100)")
    p.add_argument("--batch", default="1", help="images per pass, comma-separated (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (default: 3)")
    p.add_argument("--stage-repeats", type=int, default=None,
                   help="repeats of OV-SAM's stage-by-stage image pass (default: --repeats; 0: skip it)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes of each side before timing (default: 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--compile", action="store_true", help="torch.compile the models (after counting FLOPs eagerly)")
    p.add_argument("--tiny", action="store_true", help="tiny configs for every system (tests, smoke runs)")
    p.add_argument("--vocabulary", default="coco", help="coco, lvis, imagenet21k or a class count (default: coco)")
    ow = p.add_argument_group("open-world systems (bench/open_world.py)")
    ow.add_argument("--classes", default="80,1203",
                    help="vocabularies, comma-separated: 80 = COCO, 1203 = LVIS, or a built-in list name (default: "
                         "80,1203)")
    ow.add_argument("--detections", type=int, default=100,
                    help="detector boxes (SAM 3: masks) per image, the best by score (default: 100)")
    ow.add_argument("--max-calls", type=int, default=None,
                    help="run at most N of the repeated calls per image (SAM 3 concept forwards, Grounding DINO "
                         "captions, grid decoder calls) and extrapolate the rest linearly (default: all; 8 with "
                         "--tiny)")
    ow.add_argument("--sam3-batch", type=int, default=8, help="SAM 3 concepts per forward (default: 8)")
    ow.add_argument("--grid-points", type=int, default=None, help="grid points per side (default: 32; tiny 16)")
    p.add_argument("--crop-chunk", type=int, default=32, help="image-crop baseline: crops per CLIP pass (default: 32)")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the ceiling's square matrix product "
                                                                   "(default: 4096; 512 with --tiny)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: ovsam.runtime.keep_freed_memory, as the job does)")
    p.add_argument("--seed", type=int, default=0, help="seed of the boxes and inputs")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the result as JSON")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def _workload(system: Any, batch: int, box_counts: list[int], seed: int) -> tuple[Any, dict[int, list[Any]]]:
    """The inputs of a pass and, per box count, each image's boxes (seeded, so every precision gets the same)."""
    from bench.common import ORIGINAL_SIZE, random_boxes
    from bench.systems import make_inputs

    dev = system.device
    inputs = make_inputs(batch, system.image_size, ORIGINAL_SIZE, dev, system.memory_format, seed)
    boxes = {n: [random_boxes(n, inputs.input_size, seed=seed * 100_003 + 1_000 * i + n, device=dev)
                 for i in range(batch)] for n in box_counts}
    return inputs, boxes


def count(system: Any, batch: int, box_counts: list[int], seed: int, flops: dict[str, Any]) -> dict[str, Any]:
    """Fill ``flops`` (``{"image": FLOPs, "boxes": {count: FLOPs}}`` of one system and batch) where missing, counted
    on eager fp32 passes: FlopCounterMode fails on autocast inside inference mode (see ``bench.common.count_flops``),
    and the count does not depend on the precision, so one count serves every precision."""
    import torch

    from bench.common import count_flops
    from bench.systems import StageClock

    missing = [n for n in box_counts if n not in flops.get("boxes", {})]
    if "image" in flops and not missing:
        return flops
    inputs, boxes = _workload(system, batch, missing, seed)
    scratch = StageClock(system.device)
    with torch.no_grad(), system.full_precision():
        flops["image"], features = count_flops(lambda: system.image_pass(inputs, scratch))
        counts = flops.setdefault("boxes", {})
        for n in missing:
            counts[n] = count_flops(lambda: system.box_pass(features, inputs, boxes[n], scratch))[0]
    return flops


def measure(system: Any, batch: int, box_counts: list[int], repeats: int, stage_repeats: int, warmup: int,
            compile: bool, seed: int, flops: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (without the ceiling-derived fields) for one built system at one batch size, one per box count;
    ``flops`` from :func:`count`."""
    import torch

    from bench.common import percentile, timed
    from bench.systems import StageClock

    dev = system.device
    inputs, boxes = _workload(system, batch, box_counts, seed)
    scratch = StageClock(dev)
    with torch.no_grad():
        image_flops, box_flops = flops["image"], flops["boxes"]
        extra = warmup
        if compile:
            system.compile()
            extra = max(extra, 2)
        for _ in range(extra):
            features = system.image_pass(inputs, scratch)
            for n in box_counts:
                system.box_pass(features, inputs, boxes[n], scratch)

        image_samples, image_stages = [], []
        for _ in range(repeats):
            clock = StageClock(dev)
            seconds, features = timed(lambda: system.image_pass(inputs, clock), dev)
            image_samples.append(seconds)
            image_stages.append(dict(clock.seconds))
        breakdown = []
        if system.has_breakdown and not system.compiled:
            for _ in range(stage_repeats):
                clock = StageClock(dev)
                system.breakdown(inputs, clock)
                breakdown.append(dict(clock.seconds))
        rows = []
        for n in box_counts:
            box_samples, box_stages = [], []
            for _ in range(repeats):
                clock = StageClock(dev)
                seconds, _ = timed(lambda: system.box_pass(features, inputs, boxes[n], clock), dev)
                box_samples.append(seconds)
                box_stages.append(dict(clock.seconds))
            samples = [a + b for a, b in zip(image_samples, box_samples)]
            stages = {}
            for group in (image_stages, breakdown, box_stages):
                for name in (group[0] if group else {}):
                    stages[name] = statistics.median(g[name] for g in group)
            p50 = percentile(samples, 50)
            gflops = (image_flops + box_flops[n]) / 1e9
            rows.append({
                "system": system.name, "model": system.description, "precision": system.precision,
                "compile": bool(system.compiled), "batch": batch, "boxes": n,
                "classes": len(system.vocabulary), "prototypes": system.vocabulary.num_prototypes,
                "params_m": system.params_m,
                "gflops": gflops, "gflops_image": image_flops / 1e9, "gflops_boxes": box_flops[n] / 1e9,
                "gflops_per_image": gflops / batch,
                "p50_s": p50, "p90_s": percentile(samples, 90), "images_per_s": batch / p50,
                "image_p50_s": percentile(image_samples, 50), "boxes_p50_s": percentile(box_samples, 50),
                "samples_s": samples, "stages": stages,
                "device": str(dev), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            })
    return rows


def _failed(errors: list[dict[str, Any]], system: str, precision: str, batch: int | None, e: Exception) -> None:
    errors.append({"system": system, "precision": precision, "batch": batch, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=12)})
    where = "build" if batch is None else f"batch {batch}"
    print(f"[bench] {system} {precision} {where}: FAILED {type(e).__name__}: {e}", flush=True)


def run(args: argparse.Namespace, progress: Any = None) -> dict[str, Any]:
    """The whole benchmark; ``progress(result)`` (if given) gets the partial result after every system."""
    import torch

    from bench import open_world
    from bench.common import machine_info, matmul_ceiling
    from bench.systems import SYSTEMS, build_system
    from ovsam.precision import DTYPES, resolve_precision
    from ovsam.runtime import keep_freed_memory

    known = (*SYSTEMS, *open_world.SYSTEMS)
    text = args.systems if args.systems is not None else ",".join(known) if args.tiny else DEFAULT_SYSTEMS
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in systems if s not in known]
    if unknown or not systems:
        raise ValueError(f"unknown system(s) {unknown}; expected a comma-separated subset of {', '.join(known)}")
    class_sets = open_world.parse_classes(args.classes) if any(s in open_world.SYSTEMS for s in systems) else []
    if args.detections < 1 or (args.max_calls is not None and args.max_calls < 1) or args.sam3_batch < 1 or \
            (args.grid_points is not None and args.grid_points < 1):
        raise ValueError("--detections, --max-calls, --sam3-batch and --grid-points must be >= 1")
    box_counts = _int_list("--boxes", args.boxes)
    batches = _int_list("--batch", args.batch)
    if args.repeats < 1 or args.warmup < 1:
        raise ValueError(f"--repeats and --warmup must be >= 1; got {args.repeats} and {args.warmup}")
    stage_repeats = args.repeats if args.stage_repeats is None else args.stage_repeats
    vocabulary = parse_vocabulary(args.vocabulary)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    precisions = []
    for p in (s.strip() for s in args.precisions.split(",") if s.strip()):
        resolved = resolve_precision(p, args.device)  # raises ValueError naming the choices
        if resolved not in precisions:
            precisions.append(resolved)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()

    size = args.matmul_size or (512 if args.tiny else 4096)
    ceilings = {}
    for name in dict.fromkeys(["fp32", "bf16", *precisions]):
        ceilings[name] = matmul_ceiling(DTYPES[name], args.device, size)
        print(f"[bench] {size}x{size} {name} matmul: {ceilings[name]:.0f} GFLOP/s", flush=True)

    precisions.sort(key=lambda p: p != "fp32")  # fp32 first: its FLOP counts serve the other precisions
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    flop_cache: dict[tuple[str, int], dict[str, Any]] = {}
    result = {
        "ceilings": ceilings, "rows": rows, "errors": errors, "partial": True,
        "machine": {**machine_info(args.device), "matmul_size": size},
        "settings": {"systems": systems, "precisions": precisions, "boxes": box_counts, "batch": batches,
                     "repeats": args.repeats, "stage_repeats": stage_repeats, "warmup": args.warmup,
                     "compile": args.compile, "tiny": args.tiny, "vocabulary": vocabulary, "seed": args.seed,
                     "device": args.device, "classes": [c.label for c in class_sets],
                     "detections": args.detections, "max_calls": args.max_calls, "sam3_batch": args.sam3_batch,
                     "grid_points": args.grid_points},
    }

    def finish(r: dict[str, Any], build_s: float) -> None:
        r["build_s"] = build_s
        r["ceiling_gflop_s"] = ceilings[r["precision"]]
        r["floor_s"] = r["gflops"] / ceilings[r["precision"]]
        r["ratio"] = r["p50_s"] / r["floor_s"] if r["floor_s"] > 0 else None
        what = f"{r['classes']} classes, {r['boxes']} prompts" if "class_list" in r else f"boxes {r['boxes']}"
        print(f"[bench] {r['system']} {r['precision']} batch {r['batch']} {what}: {r['gflops']:.1f} GFLOPs, "
              f"p50 {r['p50_s']:.3f}s ({r['ratio']:.1f}x floor)", flush=True)
        rows.append(r)

    max_calls = args.max_calls if args.max_calls is not None or not args.tiny else 8
    result["settings"]["max_calls"] = max_calls
    ow_settings = argparse.Namespace(**{**vars(args), "max_calls": max_calls})
    ow_times: dict[Any, Any] = {}
    for name in systems:
        for precision in precisions:
            t = time.perf_counter()
            if name in open_world.SYSTEMS:  # one image per row, at every vocabulary of --classes
                system = None
                try:
                    system = open_world.build(name, ow_settings, precision)
                    build_s = time.perf_counter() - t
                    for classes in class_sets:
                        finish(open_world.measure(system, classes, args.repeats, args.warmup, flop_cache, ow_times),
                               build_s)
                except Exception as e:  # as below: report and go on
                    _failed(errors, name, precision, None if system is None else 1, e)
                finally:
                    if system is not None:
                        system.close()
                    del system
                _system_done(args.device, progress, result)
                continue
            system = None
            try:
                system = build_system(name, tiny=args.tiny, device=args.device, precision=precision,
                                      classes=vocabulary, crop_chunk=args.crop_chunk)
            except Exception as e:
                _failed(errors, name, precision, None, e)
                continue
            build_s = time.perf_counter() - t
            try:  # every batch's count before any timing: with --compile, counting must run eager
                for batch in batches:
                    count(system, batch, box_counts, args.seed, flop_cache.setdefault((name, batch), {}))
            except Exception as e:
                _failed(errors, name, precision, None, e)
                continue
            for batch in batches:
                try:
                    new = measure(system, batch, box_counts, args.repeats, stage_repeats, args.warmup, args.compile,
                                  args.seed, flop_cache.setdefault((name, batch), {}))
                except Exception as e:  # one system's failure (e.g. out of memory) must not end the run
                    _failed(errors, name, precision, batch, e)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                else:
                    for r in new:
                        finish(r, build_s)
            del system
            _system_done(args.device, progress, result)
    result["partial"] = False
    return result


# ----------------------------------------------------------------------------------------------------------------
# Output


def _system_done(device: str, progress: Any, result: dict[str, Any]) -> None:
    """After a system's rows: free what it held (host and device memory), then show the result so far."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    if progress is not None:
        progress(result)


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_table(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    m = result["machine"]
    head = (f"machine: {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs, torch {m['torch']}, "
            f"{m['torch_threads']} threads), {m['date']}\n"
            "ceilings (GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in c.items()))
    cols = f"{'system':22}{'prec':>5}{'cmp':>4}{'batch':>6}{'boxes':>6}{'classes':>8}{'params M':>9}{'GFLOPs':>10}" \
           f"{'p50 s':>8}{'p90 s':>8}{'floor s':>8}{'x floor':>8}{'img/s':>8}"
    lines = [head, "", cols]
    for r in result["rows"]:
        mark = "*" if r.get("extrapolated") else ""
        lines.append(f"{r['system']:22}{r['precision']:>5}{'y' if r['compile'] else '-':>4}{r['batch']:>6}"
                     f"{r['boxes']:>6}{r['classes']:>8}{r['params_m']:9.1f}{r['gflops']:10.1f}"
                     f"{_fmt_s(r['p50_s']) + mark:>8}{_fmt_s(r['p90_s']):>8}{_fmt_s(r['floor_s']):>8}"
                     f"{r['ratio']:8.1f}{r['images_per_s']:8.2f}")
    if any(r.get("extrapolated") for r in result["rows"]):
        lines.append("* extrapolated: --max-calls ran fewer calls than an image needs (see 'calls' below)")
    lines += ["", "stages (median seconds per pass):"]
    for r in result["rows"]:
        stages = ", ".join(f"{k} {_fmt_s(v)}" for k, v in r["stages"].items())
        where = f"boxes {r['boxes']}" if "class_list" not in r else f"{r['class_list']} ({r['classes']} classes)"
        lines.append(f"  {r['system']} {r['precision']}{' compiled' if r['compile'] else ''} batch {r['batch']} "
                     f"{where}: {stages}")
    ow = [r for r in result["rows"] if "class_list" in r]
    if ow:
        lines += ["", "open-world rows: GFLOPs per stage; calls run / needed per image; once per vocabulary (not "
                      "in the per-image numbers):"]
        for r in ow:
            per = ", ".join(f"{k} {v:,.1f}" for k, v in r["stage_gflops"].items())
            text = "-" if r["text_gflops"] is None else f"{r['text_gflops']:,.1f} GFLOPs, {_fmt_s(r['text_s'])} s"
            lines.append(f"  {r['system']} {r['precision']} {r['classes']} classes ({r['queries']} queries): {per}; "
                         f"calls {r['measured_calls']}/{r['calls']}; text once: {text}")
    for e in result["errors"]:
        where = "build" if e["batch"] is None else f"batch {e['batch']}"
        lines.append(f"FAILED {e['system']} {e['precision']} {where}: {e['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    def write(partial_result: dict[str, Any]) -> None:
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(partial_result, indent=2, sort_keys=True))

    try:
        result = run(args, progress=write)
    except ValueError as e:
        print(f"bench/model.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"[bench] wrote {args.json_path}")
    return 0 if result["rows"] or not result["errors"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
