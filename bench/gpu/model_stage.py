"""The annotation job's model stage in this process: ``pipeline.annotate.stages.Annotator`` over a decoded corpus, with
how busy it keeps the GPU.

    python bench/gpu/model_stage.py --device cuda --precision bf16 --batch-size 16 --json out/model_stage.json
    .venv/bin/python bench/gpu/model_stage.py --model ovsam-tiny --device cpu --shards 1 --images-per-shard 4

What it does: writes a corpus of ``--shards`` x ``--images-per-shard`` photo-like JPEGs with 3-10 sidecar boxes
each (``bench/corpus.py``), decodes it in this process (``bench/pipeline.py``'s ``measure_decode``, the job's own
decoder), builds ``Annotator`` (``--model``, random weights, ``--precision``, ``--compile``, COCO vocabulary) and
times ``annotator(batch)`` over the decoded samples in batches of ``--batch-size`` after ``--warmup-batches``
untimed batches: the model-only pass of ``bench/pipeline.py`` (backbone, prompts, masks, labels, RLE, rows).

The numbers:

- ``images_per_s`` / ``boxes_per_s`` of the timed pass, and ``ms_per_image``;
- ``model_busy_pct`` (CUDA only): the share of the stage's wall time in which the GPU was running a kernel,
  from a second pass over ``--profile-batches`` batches under ``torch.profiler`` (the union of the kernels' time
  intervals over the pass's wall time; the profiler's own overhead makes it a slight under-estimate). What is not
  busy is host work the GPU waits for: mask and RLE copies, RLE, row building, Python between kernels;
- ``nvidia_smi_util_pct`` (when ``nvidia-smi`` exists): the mean of the driver's utilisation samples taken every
  100 ms during the timed pass (no profiler involved; the driver's own definition: a kernel ran during the sample).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse
import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu/model_stage.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ovsam-rn50x16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--vocabulary", default="coco")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--images-per-shard", type=int, default=32)
    p.add_argument("--image-size", default="1024x768,640x480")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-batches", type=int, default=1)
    p.add_argument("--profile-batches", type=int, default=2, help="batches of the profiled pass (0: none)")
    p.add_argument("--json", dest="json_path", default=None)
    return p


def _merged_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profiled_busy(annotator: Any, batches: list[list[Any]]) -> dict[str, Any]:
    """GPU-busy share of ``annotator(batch)`` over ``batches``, from the kernels' intervals under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for batch in batches:
            annotator(batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    intervals = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events()
                 if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = _merged_seconds(intervals)
    how = "union of kernel intervals"
    if not intervals:  # a profiler that lists no device events: the kernels' summed self time (overlaps count twice)
        busy = sum(getattr(k, "self_device_time_total", getattr(k, "self_cuda_time_total", 0.0))
                   for k in prof.key_averages()) / 1e6
        how = "sum of kernel self times"
    return {"wall_s": wall, "kernel_s": busy, "kernels": len(intervals), "method": how,
            "model_busy_pct": min(100.0, 100.0 * busy / wall)}


class SmiSampler:
    """``nvidia-smi`` utilisation samples every 100 ms while the block runs (nothing if nvidia-smi is missing)."""

    def __enter__(self) -> "SmiSampler":
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.samples: list[float] = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.corpus import parse_sizes, write_corpus
    from bench.pipeline import measure_decode, measure_model_only
    from pipeline.annotate.stages import Annotator, ModelStageConfig

    sizes = parse_sizes(args.image_size)
    workdir = Path(tempfile.mkdtemp(prefix="ovsam-model-stage-"))
    try:
        corpus = write_corpus(workdir / "corpus", args.shards, args.images_per_shard, sizes)
        decoded, decode = measure_decode(list(corpus.shard_paths), require_prompts=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    fields = {f.name for f in dataclasses.fields(ModelStageConfig)}
    wanted = {"model": args.model, "vocabulary": args.vocabulary, "prompts": "sidecar", "device": args.device,
              "precision": args.precision, "compile": args.compile}
    unsupported = sorted(k for k in wanted if k not in fields)
    stage = ModelStageConfig(**{k: v for k, v in wanted.items() if k in fields})
    t = time.perf_counter()
    annotator = Annotator(stage)
    build_s = time.perf_counter() - t
    if "precision" in unsupported and args.precision != "fp32":  # an older ModelStageConfig: set it on the model
        from ovsam.precision import set_precision

        set_precision(annotator.model, args.precision)
    cuda = torch.device(args.device).type == "cuda"
    with SmiSampler() as smi:
        model_only = measure_model_only(annotator, decoded, args.batch_size, torch.get_num_threads(),
                                        args.warmup_batches)
    result: dict[str, Any] = {
        "settings": {**wanted, "batch_size": args.batch_size, "shards": args.shards,
                     "images_per_shard": args.images_per_shard, "image_sizes": [f"{w}x{h}" for w, h in sizes],
                     "warmup_batches": args.warmup_batches, "unsupported_config_fields": unsupported},
        "precision": getattr(annotator.model, "precision", "fp32"),
        "corpus": {"images": corpus.images, "boxes": corpus.boxes, "boxes_per_image": corpus.boxes_per_image},
        "decode": decode, "model_only": model_only, "build_s": build_s,
        "images_per_s": model_only["images_per_s"], "boxes_per_s": model_only["boxes_per_s"],
        "ms_per_image": 1000.0 * model_only["seconds"] / model_only["images"],
        "nvidia_smi_util_pct": smi.mean, "model_busy_pct": None,
    }
    if cuda and args.profile_batches > 0:
        batches = [items[i:i + args.batch_size] for items in decoded.values()
                   for i in range(0, len(items), args.batch_size)][: args.profile_batches]
        try:
            prof = profiled_busy(annotator, batches)
            result["profile"] = prof
            result["model_busy_pct"] = prof["model_busy_pct"]
        except Exception as e:  # noqa: BLE001 - the rates above stand without it
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def format_line(r: dict[str, Any]) -> str:
    s = r["settings"]
    busy = "-" if r["model_busy_pct"] is None else f"{r['model_busy_pct']:.0f}%"
    smi = "-" if r["nvidia_smi_util_pct"] is None else f"{r['nvidia_smi_util_pct']:.0f}%"
    return (f"model stage ({s['model']} {r['precision']}{' compiled' if s['compile'] else ''}, batch "
            f"{s['batch_size']}, {r['corpus']['images']} images, {r['corpus']['boxes_per_image']:.1f} boxes/image): "
            f"{r['images_per_s']:.2f} images/s, {r['boxes_per_s']:.1f} boxes/s, {r['ms_per_image']:.1f} ms/image, "
            f"model-busy {busy} (profiler), {smi} (nvidia-smi)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"bench/gpu/model_stage.py: error: {e}", file=sys.stderr)
        return 1
    print(format_line(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        print(f"[model_stage] wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
