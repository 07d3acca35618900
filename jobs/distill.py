"""``ovsam distill``: SAM2CLIP distillation (training stage 1) on Ray Train, and the teacher-embedding dump.

Launch:

    ovsam distill --student ovsam-tiny --teacher sam-tiny --input 'shards/train-{000000..000003}.tar' \\
        --heldout 'shards/heldout-000000.tar' --steps 200 --batch-size 2 --num-workers 2 \\
        --name distill-tiny --storage-path runs/ --output student.safetensors --export-released released/
    ovsam distill --dump-teacher --teacher sam-vit-h --teacher-checkpoint sam_vit_h_4b8939.pth \\
        --input 's3://bucket/sa1b/sa1b-{000000..000999}.tar' --output s3://bucket/cache/sam-vit-h/ \\
        --num-workers 8 --use-gpu
    ovsam distill --student ovsam-rn50x16 --student-clip openai --teacher sam-vit-h \\
        --teacher-checkpoint sam_vit_h_4b8939.pth --teacher-cache s3://bucket/cache/sam-vit-h/ \\
        --heldout-cache s3://bucket/cache/sam-vit-h-heldout/ --steps 160000 --batch-size 2 --num-workers 8 \\
        --use-gpu --name sam2clip --storage-path s3://bucket/runs --output sam2clip.safetensors \\
        --export-released released/
    ray job submit --working-dir . -- python -m jobs.distill --student ... (same flags)

Training: the student is an OV-SAM model; only its SAM2CLIP neck trains (``ovsam.training.set_trainable(model,
"sam2clip")``), on the MSE between ``neck(backbone(x))`` and the teacher's image embedding of the same padded
image (mean over all elements, padding included, as published). The teacher runs online (``--input``) or its
embeddings come from a cache written by ``--dump-teacher`` (``--teacher-cache``). Optimiser and schedule are the
published ones (``ovsam.training.published_optim("sam2clip")``: AdamW lr 1e-4 at a total batch of 16, scaled
linearly with the total batch as mmengine's ``auto_scale_lr`` does, weight decay 0.05, clip 5.0, linear warm-up
then cosine to 0.01 x lr per step). The published warm-up is 500 iterations; runs shorter than 10,000 steps warm up
over their first 5 % instead. The neck's fixed positional embedding is copied from the teacher's ViT when shapes
agree (SAM ViT-H -> ovsam-rn50x16), as published.

Ray Train workers (``--num-workers``; gloo on CPU, NCCL with ``--use-gpu``) each read their share of the shards and
average gradients. While it trains, the command prints a progress line at least every ``--progress-every`` seconds
(default 30; also at the first and the last step) and each held-out MSE as it is measured::

    [distill] step 120/1000 (12%)  loss 0.0123  9.8 images/s  elapsed 1m04s  ETA 7m30s
    [distill] step 500: held-out MSE 0.004417, 41.3% below step 0's (6 s)

(the loss is the workers' mean over the steps since the previous line; rank 0 sends the lines to the driver, which
prints them); ``-q`` turns them off, errors and the summary still print; ``--dump-teacher`` prints a line per
committed shard. Rank 0 also logs (at INFO: ``ovsam -v distill``) the loss, lr, gradient norm and images/s every
``--log-every`` steps, and every
``--report-every`` steps a report to Ray Train carries each step's loss since the previous report (Ray Train 2.60's
controller collects one report per worker about every 2 s, ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, and a report
blocks until the previous one was collected, so reporting every short step would stall training). The held-out MSE
is measured before training, every ``--eval-every`` steps and at the end; rank 0 checkpoints every
``--checkpoint-every`` steps. A
failed worker restarts from the latest checkpoint (up to ``--max-failures`` times); a relaunch with the same
``--name`` and ``--storage-path`` resumes where the run stopped, data position included. The finished student is
written in the project format (``--output``, loadable by ``build_ovsam(checkpoint=...)`` and ``ovsam annotate
--checkpoint``) and its neck in the released layout (``--export-released DIR``: ``DIR/sam2clip.pth`` with
``neck_student.*`` keys, as ``sam2clip_vith_rn50x16.pth``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.args import (PRECISIONS, UsageError, add_progress_arguments, add_storage_options, expand_inputs,
                       storage_options)
from jobs.progress import duration, print_line
from jobs.distill_loop import (DEFAULT_PROGRESS_EVERY, RELEASED_DIR, STUDENT_FILE, DistillConfig, InjectedFailure,
                               load_clip_weights, optim_config, train_loop)

__all__ = ["DistillConfig", "DistillSummary", "DumpConfig", "InjectedFailure", "add_arguments", "config_from_args",
           "load_clip_weights", "main", "optim_config", "plan_distill", "run", "run_distill", "run_dump",
           "train_loop"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    """``--dump-teacher``: teacher embeddings of ``inputs`` into the cache at ``output``. ``num_workers`` Ray actors
    (0: in this process)."""

    inputs: tuple[str, ...]
    output: str
    teacher: str = "sam-vit-h"
    teacher_checkpoint: str | None = None
    batch_size: int = 8
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    ray_address: str | None = None
    quiet: bool = False  # no line per committed shard
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


# ----------------------------------------------------------------------------------------------------------------
# Models and checks (driver and workers)


def student_config(cfg: DistillConfig) -> Any:
    """The student's model config: the one a project checkpoint carries, else the named one."""
    from ovsam.checkpoint import is_project_checkpoint, read_config
    from ovsam.config import load_config

    if cfg.student_checkpoint is not None and is_project_checkpoint(cfg.student_checkpoint):
        config = read_config(cfg.student_checkpoint)
    else:
        config = load_config(cfg.student)
    if config.kind != "ovsam":
        raise ValueError(f"--student must be an OV-SAM model (ovsam-*); '{config.name}' is a {config.kind} model")
    return config


def teacher_config(name: str) -> Any:
    from ovsam.config import list_models, load_config

    config = load_config(name)
    if config.kind != "sam":
        choices = [n for n in list_models() if load_config(n).kind == "sam"]
        raise ValueError(f"--teacher must be a SAM model; '{name}' is a {config.kind} model (choose one of "
                         f"{', '.join(choices)})")
    return config


def check_teacher_input(student: Any, teacher: Any) -> None:
    """The online teacher sees the student's padded input: sizes and normalisation must agree."""
    from pipeline.training.distill_data import InputSpec

    s, t = InputSpec.of(student), InputSpec.of(teacher, resize=student.resize)
    diff = s.differences(t)
    if diff:
        raise ValueError(f"student '{student.name}' and teacher '{teacher.name}' prepare images differently "
                         f"({'; '.join(diff)}); pick a teacher with the student's input size and normalisation")


# ----------------------------------------------------------------------------------------------------------------
# Driver


def plan_distill(cfg: DistillConfig) -> dict:
    """Resolve shards and check the student against the teacher or cache, before any worker starts."""
    from pipeline.training.distill_data import InputSpec, check_embeddings_match, embedding_shape
    from pipeline.training.teacher_cache import cache_shards, file_identity, read_cache_info

    if bool(cfg.inputs) == bool(cfg.teacher_cache):
        raise ValueError("give the training images either as --input SHARDS (teacher online) or as "
                         "--teacher-cache URL (written by --dump-teacher), not both or neither")
    if cfg.heldout and cfg.heldout_cache:
        raise ValueError("give held-out images as --heldout SHARDS or --heldout-cache URL, not both")
    for flag, value in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--report-every", cfg.report_every)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    student = student_config(cfg)
    if student.clip.pretrained and cfg.student_clip is None and cfg.student_checkpoint is None:
        logger.warning("student '%s' will distil from randomly initialised CLIP towers; pass --student-clip %s "
                       "(or a CLIP file) or --student-checkpoint", student.name, student.clip.pretrained)
    spec = InputSpec.of(student)
    shape = embedding_shape(student)
    teacher_name = cfg.teacher
    caches = {}
    for role, url in (("training", cfg.teacher_cache), ("held-out", cfg.heldout_cache)):
        if url is None:
            continue
        info = read_cache_info(url, cfg.storage_options)
        check_embeddings_match(student.name, shape, info.teacher, info.embedding_shape, f" (teacher cache {url})")
        diff = spec.differences(info.spec)
        if diff:
            raise ValueError(f"teacher cache {url} was prepared for other inputs than student '{student.name}' "
                             f"takes ({'; '.join(diff)}); dump it again for this student's input settings")
        caches[role] = info
    identities = {(i.teacher, i.checkpoint_sha256) for i in caches.values()}
    if len(identities) > 1:
        raise ValueError(f"the training and held-out caches were made by different teachers: {sorted(identities)}")
    needs_teacher = bool(cfg.inputs) or bool(cfg.heldout)
    if caches:
        info = next(iter(caches.values()))
        teacher_name = info.teacher
        if needs_teacher or cfg.teacher_checkpoint is not None:
            if cfg.teacher != info.teacher:
                raise ValueError(f"--teacher {cfg.teacher} differs from the cache's teacher '{info.teacher}'")
            _, sha, _ = file_identity(cfg.teacher_checkpoint)
            if sha != info.checkpoint_sha256:
                raise ValueError(f"--teacher-checkpoint {cfg.teacher_checkpoint} is not the file the cache was made "
                                 f"with ({info.checkpoint or 'no checkpoint'}, SHA-256 "
                                 f"{(info.checkpoint_sha256 or '-')[:12]}...)")
    if needs_teacher:
        teacher = teacher_config(cfg.teacher)
        check_embeddings_match(student.name, shape, teacher.name, embedding_shape(teacher))
        check_teacher_input(student, teacher)
    if cfg.teacher_cache:
        train_urls = cache_shards(cfg.teacher_cache, cfg.storage_options)
    else:
        train_urls = [ref.url for ref in expand_inputs("--input", list(cfg.inputs), cfg.storage_options)]
    if len(train_urls) < cfg.num_workers:
        raise ValueError(f"{len(train_urls)} training shard(s) for {cfg.num_workers} workers: every worker needs at "
                         "least one shard; write more, smaller shards or use fewer --num-workers")
    if cfg.heldout_cache:
        heldout_urls = cache_shards(cfg.heldout_cache, cfg.storage_options)
    elif cfg.heldout:
        heldout_urls = [ref.url for ref in expand_inputs("--heldout", list(cfg.heldout), cfg.storage_options)]
    else:
        heldout_urls = []
        logger.warning("no --heldout or --heldout-cache: the run reports no held-out MSE")
    return {"spec": spec.to_dict(), "train_urls": train_urls, "heldout_urls": heldout_urls,
            "train_cached": cfg.teacher_cache is not None, "heldout_cached": cfg.heldout_cache is not None,
            "needs_teacher": needs_teacher, "teacher": teacher_name, "student": student.name}


def _copy_out(src: Path, dst: str, storage_options: dict) -> None:
    import fsspec

    if "://" not in dst or dst.startswith("file://"):
        path = Path(dst.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(path)
        return
    fs, path = fsspec.core.url_to_fs(dst, **storage_options)
    fs.put_file(str(src), path)


@dataclass
class DistillSummary:
    steps: int
    resumed_from: int
    heldout_mse_initial: float | None
    heldout_mse: float | None
    evals: list[dict]
    seconds: float
    checkpoint_path: str
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)  # the final report's


def run_distill(cfg: DistillConfig) -> DistillSummary:
    """Plan, train on Ray Train, then copy the student and its released neck out of the final checkpoint. Prints
    progress lines as the run goes, unless ``cfg.quiet``."""
    from jobs.trainer import TrainerConfig, launch

    start = time.perf_counter()
    plan = plan_distill(cfg)
    show = None if cfg.quiet else print_line
    if show:
        show(f"[distill] starting {cfg.num_workers} Ray Train worker(s) for run {cfg.name!r} "
             f"({len(plan['train_urls'])} training shard(s), {len(plan['heldout_urls'])} held-out; checkpoints "
             f"under {cfg.storage_path})")
    if cfg.ray_address is not None:
        import ray

        ray.init(address=cfg.ray_address, ignore_reinit_error=True)
    trainer_cfg = TrainerConfig(name=cfg.name, storage_path=cfg.storage_path, num_workers=cfg.num_workers,
                                use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                                max_failures=cfg.max_failures, num_to_keep=cfg.num_to_keep,
                                storage_options=cfg.storage_options)
    result = launch(train_loop, {"config": cfg, "plan": plan}, trainer_cfg, on_progress=show)
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or not metrics.get("done"):
        raise ValueError(f"run '{cfg.name}' ended without its final checkpoint (last metrics: {metrics})")
    outputs = {}
    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        if cfg.output is not None:
            _copy_out(directory / STUDENT_FILE, cfg.output, cfg.storage_options)
            outputs["student"] = cfg.output
        if cfg.export_released is not None:
            dst = cfg.export_released.rstrip("/") + "/sam2clip.pth"
            _copy_out(directory / RELEASED_DIR / "sam2clip.pth", dst, cfg.storage_options)
            outputs["released"] = dst
    evals = json.loads(metrics.get("evals", "[]"))
    return DistillSummary(steps=int(metrics["step"]), resumed_from=int(metrics["resumed_from"]),
                          heldout_mse_initial=metrics.get("heldout_mse_initial"),
                          heldout_mse=metrics.get("heldout_mse"), evals=evals, seconds=time.perf_counter() - start,
                          checkpoint_path=str(result.checkpoint.path), outputs=outputs, metrics=metrics)


class _DumpWorker:
    """Holds one teacher; dumps shards handed to it (a Ray actor, or used directly with ``--num-workers 0``)."""

    def __init__(self, cfg: DumpConfig, spec: dict) -> None:
        import torch

        from ovsam import build_ovsam
        from pipeline.training.distill_data import InputSpec

        device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.spec = InputSpec.from_dict(spec)
        self.teacher = build_ovsam(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device=device)

    def dump(self, shard: Any) -> Any:
        from pipeline.training.teacher_cache import dump_shard

        return dump_shard(self.teacher, self.spec, shard, self.cfg.output, batch_size=self.cfg.batch_size,
                          storage_options=self.cfg.storage_options)


def run_dump(cfg: DumpConfig) -> dict:
    """Dump teacher embeddings for every input shard not yet in the cache; returns a summary."""
    from pipeline.training.distill_data import InputSpec, embedding_shape
    from pipeline.training.teacher_cache import CacheInfo, committed, file_identity, open_cache, write_index

    start = time.perf_counter()
    teacher = teacher_config(cfg.teacher)
    if cfg.teacher_checkpoint is None:
        logger.warning("no --teacher-checkpoint: '%s' is used with its seeded random initialisation", teacher.name)
    # the published dump resizes with mmdet's (OpenCV) Resize, whatever the SAM predictor uses
    spec = InputSpec.of(teacher, resize="cv2")
    name, sha, size = file_identity(cfg.teacher_checkpoint)
    info = CacheInfo(teacher=teacher.name, checkpoint=name, checkpoint_sha256=sha, checkpoint_bytes=size, spec=spec,
                     embedding_shape=embedding_shape(teacher))
    shards = expand_inputs("--input", list(cfg.inputs), cfg.storage_options)
    open_cache(cfg.output, info, cfg.storage_options)
    done = committed(cfg.output, cfg.storage_options)
    todo = [s for s in shards if s.name not in done]
    logger.info("teacher dump: %d shard(s), %d already committed, %d to do", len(shards), len(shards) - len(todo),
                len(todo))
    results = []

    def committed_line(result: Any) -> None:
        if cfg.quiet:
            return
        elapsed = time.perf_counter() - start
        eta = (len(todo) - len(results)) * elapsed / len(results)
        print_line(f"[distill] teacher dump: shard {len(results)}/{len(todo)} committed ({result.name}, "
                   f"{result.num_samples} samples in {result.seconds:.1f} s)  elapsed {duration(elapsed)}  "
                   f"ETA {duration(eta)}")

    if todo and not cfg.quiet:
        print_line(f"[distill] teacher dump: {len(todo)} shard(s) to do, {len(shards) - len(todo)} already "
                   f"committed; {teacher.name} on {max(cfg.num_workers, 1)} worker(s)")
    if todo and cfg.num_workers == 0:
        worker = _DumpWorker(cfg, spec.to_dict())
        for shard in todo:
            results.append(worker.dump(shard))
            write_index(cfg.output, cfg.storage_options)
            committed_line(results[-1])
    elif todo:
        import ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            ray.init(address=cfg.ray_address)
        actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)(_DumpWorker)
        actors = [actor.remote(cfg, spec.to_dict()) for _ in range(min(cfg.num_workers, len(todo)))]
        pool = ActorPool(actors)
        for result in pool.map_unordered(lambda a, shard: a.dump.remote(shard), todo):
            results.append(result)
            write_index(cfg.output, cfg.storage_options)
            logger.info("committed %s: %d samples in %.1f s", result.name, result.num_samples, result.seconds)
            committed_line(result)
        for a in actors:
            ray.kill(a)
    index = write_index(cfg.output, cfg.storage_options)
    return {"shards": len(shards), "skipped_shards": len(shards) - len(todo), "written_shards": len(results),
            "samples": sum(r.num_samples for r in results), "left_out": sum(len(r.skipped) for r in results),
            "index_samples": sum(e.num_samples for e in index.values()), "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dump-teacher", action="store_true",
                   help="write teacher embeddings of --input into a cache at --output instead of training")
    p.add_argument("--student", default="ovsam-rn50x16", help="OV-SAM model to distil into (default: ovsam-rn50x16)")
    p.add_argument("--student-checkpoint", default=None, help="project checkpoint to start the student from")
    p.add_argument("--student-clip", default=None, metavar="PATH_OR_TAG",
                   help="CLIP weights for the student's frozen towers (open_clip tag such as 'openai', or a file)")
    p.add_argument("--teacher", default="sam-vit-h", help="SAM model giving the targets (default: sam-vit-h)")
    p.add_argument("--teacher-checkpoint", default=None, help="Meta SAM checkpoint of the teacher")
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="SHARDS",
                   help="image shards: glob, brace range or list file; repeatable")
    p.add_argument("--teacher-cache", default=None, metavar="URL",
                   help="train on a cache written by --dump-teacher instead of running the teacher")
    p.add_argument("--heldout", action="append", default=[], metavar="SHARDS", help="held-out image shards")
    p.add_argument("--heldout-cache", default=None, metavar="URL", help="held-out teacher cache")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per worker and step (default: 2 for training, as published; 8 for the dump)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4 x total batch / 16, the published auto-scaled rate)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: 500, or 5%% of runs under 10,000 steps)")
    p.add_argument("--eval-every", type=int, default=500, help="held-out MSE every N steps (0: start and end only)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10,
                   help="rank 0 logs the training loss every N steps (at INFO: `ovsam -v distill`; default: 10)")
    p.add_argument("--report-every", type=int, default=20,
                   help="report metrics to Ray Train every N steps, each report carrying the per-step losses since "
                        "the previous one (default: 20; Ray Train 2.60 takes about one report per 2 s)")
    add_progress_arguments(p, DEFAULT_PROGRESS_EVERY, evaluations="each held-out MSE",
                           also_quiet=", and no line per shard of --dump-teacher")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="float type of the student's forward pass: fp32, bf16, fp16 (with loss scaling) or auto "
                        "(bf16 where the workers' device computes it natively); the neck's weights and optimiser "
                        "state stay fp32; the resolved value is saved in the student file (default: fp32)")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="samples held for shuffling per loader")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per training worker")
    p.add_argument("--name", default="distill", help="run name; a relaunch with the same name resumes")
    p.add_argument("--storage-path", default="runs", help="where Ray Train keeps checkpoints (path or URL)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="Ray Train workers (default 2); for --dump-teacher, teacher actors (0: in this process; "
                        "default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    p.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--output", default=None,
                   help="training: the student file (project format); --dump-teacher: the cache URL")
    p.add_argument("--export-released", default=None, metavar="DIR",
                   help="write DIR/sam2clip.pth with the neck in the released neck_student.* layout")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    add_storage_options(p)
    p.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> DistillConfig | DumpConfig:
    storage = storage_options(args.storage_options)
    if args.dump_teacher:
        if not args.inputs or args.output is None:
            raise ValueError("--dump-teacher needs --input SHARDS and --output URL (the cache to write)")
        return DumpConfig(inputs=tuple(args.inputs), output=args.output, teacher=args.teacher,
                          teacher_checkpoint=args.teacher_checkpoint, batch_size=args.batch_size or 8,
                          num_workers=1 if args.num_workers is None else args.num_workers, use_gpu=args.use_gpu,
                          cpus_per_worker=args.cpus_per_worker, ray_address=args.ray_address, quiet=args.quiet,
                          storage_options=storage)
    return DistillConfig(
        student=args.student, student_checkpoint=args.student_checkpoint, student_clip=args.student_clip,
        teacher=args.teacher, teacher_checkpoint=args.teacher_checkpoint, inputs=tuple(args.inputs),
        teacher_cache=args.teacher_cache, heldout=tuple(args.heldout), heldout_cache=args.heldout_cache,
        steps=args.steps, batch_size=args.batch_size or 2, lr=args.lr, warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        report_every=args.report_every, progress_every=args.progress_every, quiet=args.quiet, seed=args.seed, precision=args.precision,
        shuffle_buffer=args.shuffle_buffer, loader_workers=args.loader_workers, name=args.name,
        storage_path=args.storage_path, num_workers=2 if args.num_workers is None else args.num_workers,
        use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
        num_to_keep=args.num_to_keep, output=args.output, export_released=args.export_released,
        ray_address=args.ray_address, fail_at_step=args.fail_at_step, storage_options=storage)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command and print a short summary."""
    cfg = config_from_args(args)
    if isinstance(cfg, DumpConfig):
        s = run_dump(cfg)
        print(f"teacher cache {cfg.output}: {s['written_shards']} shard(s) written ({s['samples']} samples, "
              f"{s['left_out']} left out), {s['skipped_shards']} already committed; {s['index_samples']} samples "
              f"in the index; {s['seconds']:.1f} s")
        return 0
    s = run_distill(cfg)
    print(f"distilled into {cfg.student}: step {s.steps}"
          + (f" (resumed from step {s.resumed_from})" if s.resumed_from else "") + f", {s.seconds:.1f} s")
    if s.heldout_mse is not None:
        drop = 100 * (1 - s.heldout_mse / s.heldout_mse_initial) if s.heldout_mse_initial else float("nan")
        print(f"held-out MSE {s.heldout_mse_initial:.6f} -> {s.heldout_mse:.6f} ({drop:.1f}% lower)")
    for role, path in s.outputs.items():
        print(f"wrote {role}: {path}")
    print(f"checkpoint: {s.checkpoint_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovsam distill", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (as `ovsam -v distill`)")
    args = parser.parse_args(argv)
    # as `ovsam distill`: warnings and errors (-v: info); the progress lines and the summary are printed
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UsageError as e:  # exit 2, as `ovsam distill` does
        print(f"ovsam distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
