"""Annotation job throughput against the model alone, on the same machine, batch size and torch thread count.

Launch (from the repository root):

    .venv/bin/python bench/pipeline.py                              # defaults: 4 shards x 64 images, ovsam-tiny
    .venv/bin/python bench/pipeline.py --shards 8 --images-per-shard 128 --batch-size 8 --json bench.json
    .venv/bin/python bench/pipeline.py --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors --workers 1

What it does, in order:

1. writes a corpus of ``--shards`` x ``--images-per-shard`` photo-like JPEGs (sizes from ``--image-size``) with
   3-10 sidecar boxes each (``bench/corpus.py``) into a temporary directory (or ``--workdir``);
2. **decode**: decodes every sample in this process, one thread, with the job's own ``decode_sample`` (timed,
   for reference only);
3. **model-only**: builds ``pipeline.annotate.stages.Annotator`` in this process, sets ``torch.set_num_threads(T)`` with
   T = the job worker's CPUs, and times ``annotator(batch)`` over the pre-decoded images in batches of
   ``--batch-size`` (each shard batched separately, as the worker does) after ``--warmup-batches`` untimed
   batches. This is the model stage alone: backbone, prompts, mask decoding, labels, RLE and row building;
4. **job**: starts a local Ray instance with ``--ray-cpus`` CPUs and runs the real job
   (``jobs.annotate.run_annotate``) into a fresh output directory;
5. **model-only again**, the same loop as in 3. The reference rate pools both passes, so a change of machine
   load while the benchmark runs affects both sides alike; ``drift`` (after/before - 1) says how much it changed.
   On a shared machine, rerun if the drift is more than a few percent.

The numbers:

- ``images/s`` and ``boxes/s`` (prompts answered per second; one instance per box in sidecar mode);
- job ``wall``: images / the whole ``run_annotate`` call (driver-side model and vocabulary build, run.json, actor
  start-up, every shard); ``run``: images / the actor pool's run (actor start-up and every shard); ``steady``:
  images / the busiest actor's time inside ``process`` (summed per-shard seconds, so actor start-up excluded);
- the per-stage breakdown of the workers' model thread from the shard summaries, in ms per image: ``wait_input``
  is time it waited for decoded samples (reading, decoding and resizing run on other threads, ahead of it),
  ``model`` the model part (``Annotator.run_model``: backbone, prompts, mask decoding, labels), ``wait_rows`` time
  it waited for the row thread (RLE and row building run there, overlapping the model), ``write`` the Parquet
  write and commit, ``other`` the rest of ``process``; then the helper threads' busy time (``read``, ``decode``,
  ``prepare``, ``rows``), which overlaps the model's;
- ``model busy``: the job summary's model-busy %, time inside model calls / actor processing wall (summed over
  shards, each from the start of its processing to its commit). The model-only loop does the row building on the
  model's own thread, so its ms/image is not the job's ``model`` ms/image;
- ``ratio``: job steady images/s over the model-only reference, where the reference is model-only images/s times
  the number of actors (each actor runs torch on its own T threads; with several actors this assumes linear
  scaling, so keep actors x cpus-per-worker within the physical cores). ``ratio_wall`` uses the wall rate;
- CPU seconds per image (all threads): the model-only loop's, from ``time.process_time``, and the job actors',
  sampled from ``/proc`` (Linux) over their busy time; ``cpu_ratio`` is model-only over job. Wall-clock rates
  depend on what else the machine runs; CPU time much less so (except that torch's thread pool burns CPU waiting
  for descheduled threads), so on a shared machine read ``cpu_ratio`` next to ``ratio``.

Fairness: by default one worker with every CPU Ray has (``--cpus-per-worker`` = ``--ray-cpus`` = all cores). Ray
sets ``OMP_NUM_THREADS`` to the actor's ``num_cpus`` and torch follows it, so the actor's model runs on the same T
threads as the model-only loop and the job gets no CPU the model-only loop did not have: decoding, reading and
writing must fit into the same cores, and the ratio shows what they cost. The benchmark checks the thread count a
Ray task with T CPUs sees and reports it (``actor_torch_threads``), with its niceness: Ray runs workers at a
lower priority than the driver, which makes no difference on an idle machine but makes the job lose CPU share to
other processes on a busy one, where ``cpu_ratio`` is the fairer comparison.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file, this script's directory comes first on sys.path, and this file's name would shadow the
    # project's `pipeline` package; the repository root is what it needs instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SIZES = "640x480,1024x768"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/pipeline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of bench/pipeline.py) for what each number means.")
    p.add_argument("--model", default="ovsam-tiny", help="model name (default: ovsam-tiny)")
    p.add_argument("--checkpoint", default=None, help="project checkpoint for --model")
    p.add_argument("--vocabulary", default="coco", help="vocabulary as the job takes it (default: coco)")
    p.add_argument("--prompts", default="sidecar", choices=("sidecar", "whole-image", "grid"),
                   help="sidecar: the corpus's 3-10 boxes per image; whole-image: one box; grid: everything mode")
    p.add_argument("--points-per-side", type=int, default=16, help="grid density for --prompts grid")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="model precision, in both measurements (default: auto, as the job; resolved for the CPU)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--image-size", default=DEFAULT_SIZES,
                   help=f"WIDTHxHEIGHT[,WIDTHxHEIGHT...], used in turn (default: {DEFAULT_SIZES})")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch, in both measurements")
    p.add_argument("--workers", type=int, default=1, help="job actors (default: 1)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPUs (and so torch threads) per actor; also the model-only thread count "
                        "(default: --ray-cpus / --workers)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all cores)")
    p.add_argument("--warmup-batches", type=int, default=1, help="untimed model-only batches first (default: 1)")
    p.add_argument("--workdir", default=None, help="where corpus and output go (default: a temporary directory, "
                                                   "removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the corpus and job output")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def measure_decode(shard_paths: list[str], require_prompts: bool) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Decode every sample in this thread. Returns ``{shard path: [SampleInput, ...]}`` and the timing."""
    from pipeline.inputs.decode import decode_sample
    from pipeline.inputs.sources import iter_samples
    from pipeline.annotate.worker import to_stage_input

    decoded: dict[str, list[Any]] = {}
    seconds = 0.0
    n = 0
    for path in shard_paths:
        samples = list(iter_samples(path, {}, shard=Path(path).stem))
        t = time.perf_counter()
        decoded[path] = [to_stage_input(decode_sample(s, require_prompts=require_prompts)) for s in samples]
        seconds += time.perf_counter() - t
        n += len(samples)
    bad = [s.key for items in decoded.values() for s in items if s.status != "ok"]
    if bad:
        raise ValueError(f"the benchmark corpus should decode cleanly but {len(bad)} samples did not, "
                         f"e.g. {bad[:3]}")
    return decoded, {"images": n, "seconds": seconds, "images_per_s": n / seconds, "threads": 1}


def measure_model_only(annotator: Any, decoded: dict[str, list[Any]], batch_size: int, threads: int,
                       warmup_batches: int) -> dict[str, Any]:
    """Time ``annotator(batch)`` over ``decoded`` with torch on ``threads`` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = [items[i:i + batch_size] for items in decoded.values() for i in range(0, len(items), batch_size)]
        for batch in batches[:warmup_batches]:
            annotator(batch)
        images = prompts = instances = 0
        statuses: dict[str, int] = {}
        seconds = 0.0
        cpu_seconds = 0.0
        for batch in batches:
            t, c = time.perf_counter(), time.process_time()
            results = annotator(batch)
            seconds += time.perf_counter() - t
            cpu_seconds += time.process_time() - c
            images += len(results)
            prompts += sum(r.image_row["num_prompts"] for r in results)
            instances += sum(len(r.instance_rows) for r in results)
            for r in results:
                statuses[r.image_row["status"]] = statuses.get(r.image_row["status"], 0) + 1
    finally:
        torch.set_num_threads(previous)
    return {"images": images, "prompts": prompts, "instances": instances, "statuses": statuses,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "images_per_s": images / seconds, "boxes_per_s": prompts / seconds,
            "torch_threads": threads, "batches": len(batches)}


def actor_threads(num_cpus: int) -> dict[str, Any]:
    """torch's thread count, OMP_NUM_THREADS and the process niceness in a Ray task that asks for ``num_cpus``
    CPUs (Ray starts its workers at a lower priority than the driver, which matters only on a busy machine)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe() -> dict[str, Any]:
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "niceness": os.nice(0)}

    return ray.get(probe.remote())


def measure_job(cfg: Any, workers: int) -> dict[str, Any]:
    """Run ``run_annotate(cfg)`` (Ray already initialised) and summarise its throughput and stage times."""
    import pyarrow.parquet as pq

    from bench.cpu import ActorCpuSampler
    from jobs.annotate import run_annotate

    t = time.perf_counter()
    with ActorCpuSampler() as sampler:
        summary = run_annotate(cfg)
    wall = time.perf_counter() - t
    if summary.failed:
        raise RuntimeError(f"the job failed on {len(summary.failed)} shards: {summary.failed}")
    images = summary.images
    out = Path(cfg.output)
    prompts = sum(sum(v for v in pq.read_table(p, columns=["num_prompts"]).column(0).to_pylist() if v)
                  for p in sorted((out / "images").glob("*.parquet")))
    busy: dict[Any, float] = {}
    for s in summary.per_shard:
        key = (s.get("node_id"), s.get("pid")) if s.get("pid") is not None else "all"
        busy[key] = busy.get(key, 0.0) + s["seconds"]
    actors = len(busy)
    if "all" in busy:  # summaries without a pid: assume the shards were spread evenly over the actors
        actors = max(1, min(workers, len(summary.per_shard)))
        busy = {"all": busy["all"] / actors}
    steady = max(busy.values())
    cpu = sampler.cpu_seconds({k[1]: v for k, v in busy.items() if isinstance(k, tuple)})
    stages = summary.stage_seconds()
    shard_seconds = sum(s["seconds"] for s in summary.per_shard)
    stages["other"] = max(0.0, shard_seconds - sum(stages.values()))
    background = summary.background_seconds()
    return {"images": images, "prompts": prompts, "instances": summary.instances, "statuses": summary.statuses(),
            "shards": len(summary.per_shard), "actors": actors,
            "wall_s": wall, "run_s": summary.seconds, "steady_s": steady,
            "images_per_s_wall": images / wall, "images_per_s_run": images / summary.seconds,
            "images_per_s_steady": images / steady, "boxes_per_s_steady": prompts / steady,
            "boxes_per_s_wall": prompts / wall,
            "actor_cpu_s_total": None if cpu is None else cpu[0],
            "actor_cpu_s_steady": None if cpu is None else cpu[1],
            "stage_ms_per_image": {k: 1000.0 * v / max(images, 1) for k, v in stages.items()},
            "background_ms_per_image": {k: 1000.0 * v / max(images, 1) for k, v in background.items()},
            "model_busy_pct": summary.model_busy_pct, "model_s": summary.model_seconds,
            "precisions": summary.precisions(),
            "threads": sorted({json.dumps(s.get("threads"), sort_keys=True) for s in summary.per_shard}),
            "stage_fraction": {k: v / shard_seconds for k, v in stages.items()} if shard_seconds else {}}


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.corpus import parse_sizes, write_corpus
    from pipeline.annotate.stages import ModelStageConfig

    for name in ("shards", "images_per_shard", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sizes = parse_sizes(args.image_size)
    ray_cpus = args.ray_cpus or os.cpu_count() or 1
    cpus = args.cpus_per_worker or max(1, ray_cpus // args.workers)
    if cpus * args.workers > ray_cpus:
        raise ValueError(f"{args.workers} workers x {cpus} CPUs need {cpus * args.workers} CPUs but the Ray instance "
                         f"has {ray_cpus}; lower --workers/--cpus-per-worker or raise --ray-cpus")
    import ray
    import torch

    from jobs.annotate import AnnotateConfig

    load_1min = os.getloadavg()[0]
    if load_1min > 0.5 * (os.cpu_count() or 1):
        print(f"[bench] warning: load average {load_1min:.1f} on {os.cpu_count()} cores; other processes compete "
              "for the CPUs and torch's thread pool degrades badly when its threads are descheduled, so the rates "
              "and the ratio will not be reliable", file=sys.stderr, flush=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ovsam-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        t = time.perf_counter()
        corpus = write_corpus(run_dir / "corpus", args.shards, args.images_per_shard, sizes, seed=args.seed)
        corpus_s = time.perf_counter() - t
        print(f"[bench] corpus: {corpus.images} images ({corpus.boxes_per_image:.1f} boxes/image, "
              f"{corpus.jpeg_bytes / corpus.images / 1024:.0f} KiB/JPEG) in {corpus_s:.1f}s", flush=True)
        stage = ModelStageConfig(model=args.model, checkpoint=args.checkpoint, vocabulary=args.vocabulary,
                                 prompts=args.prompts, points_per_side=args.points_per_side,
                                 precision=args.precision)
        decoded, decode = measure_decode(list(corpus.shard_paths), require_prompts=args.prompts == "sidecar")
        print(f"[bench] decode (1 thread): {decode['images_per_s']:.1f} images/s", flush=True)
        from pipeline.annotate.stages import Annotator

        t = time.perf_counter()
        annotator = Annotator(stage)
        build_s = time.perf_counter() - t
        load = {"before": os.getloadavg()[0]}
        model_before = measure_model_only(annotator, decoded, args.batch_size, cpus, args.warmup_batches)
        print(f"[bench] model-only ({cpus} threads, {annotator.precision}): {model_before['images_per_s']:.2f} "
              "images/s", flush=True)

        started_ray = not ray.is_initialized()
        t = time.perf_counter()
        if started_ray:
            # address="local": a fresh instance of our own, never a cluster some other process left running
            ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        try:
            threads = actor_threads(cpus)
            cfg = AnnotateConfig(inputs=tuple(corpus.shard_paths), output=str(run_dir / "out"), stage=stage,
                                 batch_size=args.batch_size, workers=args.workers, cpus_per_worker=cpus)
            job = measure_job(cfg, args.workers)
        finally:
            if started_ray:
                ray.shutdown()
        job["ray_init_s"] = ray_init_s
        load["after_job"] = os.getloadavg()[0]
        model_after = measure_model_only(annotator, decoded, args.batch_size, cpus, args.warmup_batches)
        print(f"[bench] model-only again ({cpus} threads): {model_after['images_per_s']:.2f} images/s", flush=True)
        model_precision = annotator.precision
        del decoded, annotator
        # The job ran between the two model-only passes; their pooled rate is the reference, so a change of
        # machine load during the run moves both sides alike (their difference is reported as the drift).
        seconds = model_before["seconds"] + model_after["seconds"]
        model_only = {**model_before, "seconds": seconds, "images": model_before["images"] * 2,
                      "cpu_seconds": model_before["cpu_seconds"] + model_after["cpu_seconds"],
                      "prompts": model_before["prompts"] * 2, "instances": model_before["instances"] * 2,
                      "images_per_s": 2 * model_before["images"] / seconds,
                      "boxes_per_s": 2 * model_before["prompts"] / seconds,
                      "images_per_s_before": model_before["images_per_s"],
                      "images_per_s_after": model_after["images_per_s"],
                      "drift": model_after["images_per_s"] / model_before["images_per_s"] - 1.0, "build_s": build_s,
                      "precision": model_precision}
        reference = model_only["images_per_s"] * job["actors"]
        result = {
            "settings": {"model": args.model, "checkpoint": args.checkpoint, "vocabulary": args.vocabulary,
                         "prompts": args.prompts, "shards": args.shards, "images_per_shard": args.images_per_shard,
                         "image_sizes": [f"{w}x{h}" for w, h in sizes], "batch_size": args.batch_size,
                         "workers": args.workers, "cpus_per_worker": cpus, "ray_cpus": ray_cpus,
                         "warmup_batches": args.warmup_batches, "precision": args.precision},
            "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                        "device": "cpu", "load_average_1min": load, "driver_niceness": os.nice(0)},
            "corpus": {"images": corpus.images, "boxes": corpus.boxes, "boxes_per_image": corpus.boxes_per_image,
                       "mean_jpeg_kib": corpus.jpeg_bytes / corpus.images / 1024, "seconds": corpus_s},
            "actor_torch_threads": threads,
            "decode": decode,
            "model_only": model_only,
            "job": job,
            "model_only_reference_images_per_s": reference,
            "ratio": job["images_per_s_steady"] / reference,
            "ratio_wall": job["images_per_s_wall"] / reference,
            # CPU seconds per image: the model stage alone against the job's actors after start-up
            "cpu_ratio": None if not job["actor_cpu_s_steady"] else
            (model_only["cpu_seconds"] / model_only["images"]) / (job["actor_cpu_s_steady"] / job["images"]),
        }
        if threads.get("torch_threads") != cpus:
            logger.warning("a Ray task with %d CPUs runs torch on %s threads, not %d: the comparison is not "
                           "like for like", cpus, threads.get("torch_threads"), cpus)
        return result
    finally:
        if args.keep:
            print(f"[bench] kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)


def format_table(r: dict[str, Any]) -> str:
    s, mo, job = r["settings"], r["model_only"], r["job"]
    lines = [
        f"model {s['model']}  prompts {s['prompts']}  {r['corpus']['images']} images "
        f"({s['shards']} shards, {', '.join(s['image_sizes'])}), {r['corpus']['boxes_per_image']:.1f} boxes/image  "
        f"batch {s['batch_size']}  workers {s['workers']} x {s['cpus_per_worker']} CPUs  "
        f"(actor torch threads {r['actor_torch_threads'].get('torch_threads')})  precision {s.get('precision')} -> "
        f"model-only {mo.get('precision')}, job {', '.join(job.get('precisions', [])) or '?'}",
        f"{'':28}{'images/s':>10}{'boxes/s':>10}{'seconds':>10}",
        f"{'decode only (1 thread)':28}{r['decode']['images_per_s']:10.2f}{'':>10}{r['decode']['seconds']:10.1f}",
        f"{'model only (' + str(mo['torch_threads']) + ' threads)':28}{mo['images_per_s']:10.2f}"
        f"{mo['boxes_per_s']:10.1f}{mo['seconds']:10.1f}   before/after the job: "
        f"{mo['images_per_s_before']:.2f}/{mo['images_per_s_after']:.2f} (drift {100 * mo['drift']:+.0f}%)",
        f"{'job, steady (no start-up)':28}{job['images_per_s_steady']:10.2f}{job['boxes_per_s_steady']:10.1f}"
        f"{job['steady_s']:10.1f}",
        f"{'job, actor pool run':28}{job['images_per_s_run']:10.2f}{'':>10}{job['run_s']:10.1f}",
        f"{'job, wall (run_annotate)':28}{job['images_per_s_wall']:10.2f}{job['boxes_per_s_wall']:10.1f}"
        f"{job['wall_s']:10.1f}",
        "job model thread, ms/image: " + ", ".join(f"{k} {v:.1f} ({100 * job['stage_fraction'].get(k, 0):.0f}%)"
                                                   for k, v in job["stage_ms_per_image"].items()),
        "job helper threads (overlapping), ms/image: " + ", ".join(
            f"{k} {v:.1f}" for k, v in job.get("background_ms_per_image", {}).items()),
        f"job model busy: {job['model_busy_pct']:.0f}% (time inside model calls / actor processing wall)",
        f"model-only ms/image: {1000 * mo['seconds'] / mo['images']:.1f}   "
        f"decode-only ms/image: {1000 * r['decode']['seconds'] / r['decode']['images']:.1f}",
        f"ratio job/model-only: {r['ratio']:.2f} steady, {r['ratio_wall']:.2f} wall",
    ]
    if r["cpu_ratio"] is not None:
        lines.insert(-1, f"CPU s/image: model-only {mo['cpu_seconds'] / mo['images']:.3f}, job actors "
                         f"{job['actor_cpu_s_steady'] / job['images']:.3f} after start-up "
                         f"({job['actor_cpu_s_total'] / job['images']:.3f} with it); "
                         f"CPU ratio {r['cpu_ratio']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except ValueError as e:
        print(f"bench/pipeline.py: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"[bench] wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
