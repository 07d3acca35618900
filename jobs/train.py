"""``ovsam train``: CLIP2SAM co-training (stage 2) on a mixture of packed datasets, on Ray Train.

Launch:

    ovsam pack synthetic --output data/synth --kind mask --num-train 256 --num-heldout 48
    ovsam train --model ovsam-tiny --dataset synth=data/synth/train:mask:1 --heldout synth=data/synth/heldout \\
        --trunk-warmup 1200 --steps 800 --batch-size 4 --num-prompts 10 --lr 2e-3 --warmup-steps 75 \\
        --schedule cosine --clip-grad-norm 0 --templates plain --unfreeze clip,neck --roi-box largest_component \\
        --num-workers 2 --eval-at-start --name synth-run --storage-path runs/ --output synth.safetensors
    python -m jobs.train --model ovsam-rn50x16 --checkpoint distilled.safetensors \\
        --dataset in21k=s3://bucket/in21k/:image:4 --dataset v3det=s3://bucket/v3det/:box:2 \\
        --dataset o365=s3://bucket/o365/:box:1 --dataset lvis=s3://bucket/lvis/:mask:1 \\
        --heldout lvis=s3://bucket/lvis-val/ --steps 90000 --batch-size 2 --num-workers 8 --use-gpu \\
        --mask-points 12544 --name clip2sam-mix --storage-path s3://bucket/runs \\
        --output clip2sam-mix.safetensors --export-released released/
    ray job submit --working-dir . -- python -m jobs.train --dataset ... --storage-path s3://bucket/runs ...

Each ``--dataset name=URL:kind:weight`` is a shard set written by ``ovsam pack`` (a root with ``classes.json`` and
``_index.json``, or a glob of shards) with kind ``image``, ``box`` or ``mask``; at every step one dataset is drawn
with probability ``weight / sum(weights)`` (the same on every worker) and the whole batch comes from it. Each
dataset is classified against its own vocabulary, whose text embeddings are built once and cached under
``<storage-path>/_vocab/``. A relaunch with the same ``--name`` and ``--storage-path`` resumes from the newest
checkpoint (a relaunch with other training settings is refused); a worker that dies is restarted from it up to
``--max-failures`` times. ``--num-workers 0`` runs the loop in this process without Ray (checkpoints in a local
``--storage-path``).

Progress: while it trains, the command prints a line at least every ``--progress-every`` seconds (default 30; also
at the first and the last step), through the trunk warm-up too, and each held-out evaluation as it starts and with
its result::

    [train] step 30/120 (25%)  loss 2.01  22.6 images/s  elapsed 19s  ETA 10s + 60 CLIP2SAM steps  (trunk warm-up)
    [train] trunk warm-up done (step 60): synthetic probe top-1 0.566 (1 s)
    [train] step 92/120 (77%)  loss 12.89  7.5 images/s  elapsed 1m00s  ETA 27s  (CLIP2SAM)
    [train] after training (step 120): synthetic/box mIoU 0.204 top-1 0.270; synthetic/point mIoU 0.205 top-1 ...

The loss is rank 0's, averaged over the steps since the previous line; images/s counts every worker's images; the
ETA is the steps left in the current phase at its pace so far (held-out evaluations not counted), plus the steps of
the phase after it. Rank 0 sends the lines to the driver, which prints them, so they show whether or not Ray
forwards the workers' output (and land in the job log under ``ray job submit``). ``-q`` turns them off; errors and
the final summary still print. The workers log at the command's level: warnings, or with ``-v`` also INFO (every
step's losses, and Ray Train's line per report).

Outputs: checkpoints (``state.pt`` + ``model.safetensors`` in the project format) every ``--checkpoint-every``
steps, the final model file at ``--output`` (usable by ``ovsam annotate --checkpoint``), the released
``fpn_neck.*``/``mask_decoder.*`` layout with ``--export-released DIR``, and a JSON summary with ``--summary``.
Next to ``--output`` go the vocabularies the datasets were classified against
(``<output>.<dataset>.vocab.safetensors``: class names, templates, split): pass one to ``ovsam annotate
--vocabulary`` to label with the classes the model was trained on, scored as it was evaluated.

Defaults are the published recipe (OVSAM_SPEC §4.3): AdamW at 1e-4 per 16 images (scaled to the total batch),
gradient clip 0.01, multistep at 8/12 and 11/12 of the run, 40 prompts per image (21 box, 19 point), the VILD
templates; only the warm-up is scaled (5% of the run, at most 500 steps) and the mask loss samples 1024 points
(``--mask-points 12544`` is the published count, for 256x256 low-res masks). The random-init ``ovsam-tiny`` learns
on synthetic data in minutes only with the short-run settings of the first example above (``SYNTHETIC_RECIPE``). Its
mask decoder starts from random weights (the published one starts from SAM's) and sits on a plateau of
all-background masks for a few hundred steps, which a learning rate of a few 1e-3 after a 75-step warm-up leaves
fastest in our runs. It has no pretrained CLIP and no neck distilled from SAM, so ``--unfreeze clip,neck`` trains
them with the rest: the published head averages its RoI features over space and can only tell shapes apart if the
trunk's channels encode shape, which a random trunk's do not. The CLIP2SAM losses teach the trunk shape slowly (box
top-1 0.57 after 800 steps), so ``--trunk-warmup 1200`` first trains the trunk alone on region classification
(RoIAlign on its stride-16 stage, spatial mean, a linear classifier per dataset that is dropped afterwards); that
works from ``ovsam-tiny``'s calibrated random trunk (``random_init: calibrated``) and not from open_clip's
from-scratch init, whose residual branches start at zero (box top-1 0.53 with the same warm-up). With the trunk
trained, its image features no longer match the text tower, so the trained model classifies with the head alone (no
frozen-CLIP ensemble). ``--roi-box largest_component`` classifies each mask on the box of its largest connected
part: a stray positive pixel of a small model's mask otherwise stretches the RoI far past the object. The random
text tower gives near-parallel class embeddings with the 14 templates (cosine 0.94-0.997 between the 12 synthetic
classes), less so with the bare class name (``--templates plain``: mean cosine 0.32), but even then the three shapes
of one colour stay at 0.93-0.99, which costs the labels a little (the trunk's shape features cost more).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from jobs.args import PRECISIONS, add_progress_arguments, add_storage_options
from jobs.args import storage_options as parse_storage_options
from jobs.progress import print_line
from jobs.train_config import (DEFAULT_MASK_POINTS, DEFAULT_PROGRESS_EVERY, MODEL_FILE, PUBLISHED_BATCH,
                               PUBLISHED_CLIP, PUBLISHED_LR, STAGE, SYNTHETIC_RECIPE, TrainJobConfig)
from ovsam.config import ROI_BOX_RULES
from pipeline.training.train_specs import parse_dataset_spec, parse_heldout_spec

__all__ = ["DEFAULT_MASK_POINTS", "DEFAULT_PROGRESS_EVERY", "MODEL_FILE", "PUBLISHED_BATCH", "PUBLISHED_CLIP",
           "PUBLISHED_LR", "STAGE", "SYNTHETIC_RECIPE", "TrainJobConfig", "add_arguments", "config_from_args",
           "export_outputs", "export_vocabularies", "main", "run_from_args", "run_train", "trainer_config",
           "vocabulary_url"]

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", dest="datasets", action="append", required=True, metavar="NAME=URL:KIND:WEIGHT",
                   help="a packed shard set (root with classes.json and _index.json, or a glob of shards), its kind "
                        "(image, box or mask) and sampling weight; repeatable")
    p.add_argument("--heldout", action="append", default=[], metavar="NAME=URL",
                   help="a held-out shard set evaluated with the OVSAM_SPEC §5 metric (mIoU, top-1 accuracy); "
                        "repeatable")
    p.add_argument("--model", default="ovsam-tiny", help="model name (see `ovsam models`)")
    p.add_argument("--checkpoint", default=None,
                   help="initial weights: a project checkpoint (converted or distilled model)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--batch-size", type=int, default=2, help="images per worker per step (default 2)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default: the published {PUBLISHED_LR} x total batch / "
                        f"{PUBLISHED_BATCH}; a small random-init model learns in minutes only at ~3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    p.add_argument("--clip-grad-norm", type=float, default=PUBLISHED_CLIP,
                   help=f"global gradient-norm clip (default: the published {PUBLISHED_CLIP}; 0 = no clipping)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up from 0.001x (default: 5%% of --steps, at most the published 500)")
    p.add_argument("--schedule", choices=("multistep", "cosine", "constant"), default="multistep",
                   help="multistep = x0.1 at 8/12 and 11/12 of the run, as published (default)")
    p.add_argument("--mask-points", type=int, default=DEFAULT_MASK_POINTS,
                   help=f"points per mask for the mask losses (default {DEFAULT_MASK_POINTS}, a quarter of a tiny "
                        f"model's 64x64 low-res mask; published 12544 for 256x256)")
    p.add_argument("--num-prompts", type=int, default=40, help="prompts per image (published 40: 21 box, 19 point)")
    p.add_argument("--scale-range", type=float, nargs=2, default=(0.9, 2.0), metavar=("LO", "HI"),
                   help="LSJ resize range r ~ U(LO, HI) of the input size (published 0.9 2.0 COCO, 0.1 2.0 LVIS)")
    p.add_argument("--min-area", type=float, default=None,
                   help="drop instances smaller than this after the crop (default: 32 px at 1024, scaled)")
    p.add_argument("--published-truncation", action="store_true",
                   help="keep the first 40 annotations of crowded images (published bug) instead of a random 40")
    p.add_argument("--published-image-box", action="store_true",
                   help="whole-image box [0, 0, h, w] for image-level data (published x/y swap)")
    p.add_argument("--templates", default="vild",
                   help="prompt templates of the class text embeddings: vild (the published 14, default), plain "
                        "(the bare class name), or one template containing {} (e.g. 'a photo of a {}.')")
    p.add_argument("--unfreeze", default="", metavar="PARTS",
                   help="also train these frozen parts, comma-separated: clip (the CLIP image trunk) and/or neck "
                        "(SAM2CLIP). For a model with no pretrained CLIP and no SAM-distilled neck (a random-init "
                        "ovsam-tiny on synthetic data); training the trunk turns the frozen-CLIP ensemble off in "
                        "the trained model, as its image features no longer match the text tower")
    p.add_argument("--trunk-warmup", type=int, default=0, metavar="N",
                   help="first train the CLIP image trunk alone for N steps on region classification (the GT "
                        "boxes' RoIs of its stride-16 stage, averaged, through a linear classifier per dataset "
                        "that is dropped afterwards), then run the --steps CLIP2SAM steps; for a model with no "
                        "pretrained CLIP. Its own AdamW and schedule (the run's settings over N steps); turns the "
                        "frozen-CLIP ensemble off like --unfreeze clip (default 0: none)")
    p.add_argument("--roi-box", choices=ROI_BOX_RULES, default=None,
                   help="the RoI rule the trained model classifies masks on: mask (published: the box of every "
                        "positive low-res pixel) or largest_component (the box of the mask's largest connected "
                        "part); default: the model's own")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0 = at the end)")
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate the initial weights")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate at most this many held-out images")
    p.add_argument("--report-every", type=int, default=10,
                   help="steps between metric reports to Ray Train (every step is also logged at INFO, shown "
                        "with -v; default 10)")
    add_progress_arguments(p, DEFAULT_PROGRESS_EVERY, evaluations="each held-out evaluation's result")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader processes per training worker and dataset (default 0: decode in the loop)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data mixture and the prompts (default: 0)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="float type of the forward pass: fp32, bf16, fp16 (with loss scaling) or auto (bf16 where "
                        "the workers' device computes it natively, else fp32); weights and optimiser state stay "
                        "fp32; the resolved value is reported and saved in the model file (default: fp32)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="Ray Train workers (default 2; 0 = run in this process without Ray)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures survived by restarting")
    p.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--name", required=True, help="run name; a relaunch with the same name resumes")
    p.add_argument("--storage-path", required=True, help="where checkpoints go (local dir or s3://...)")
    p.add_argument("--output", default=None, help="final model file (project format), local path or URL")
    p.add_argument("--export-released", default=None, metavar="DIR",
                   help="also write the released layout (clip2sam.pth: fpn_neck.*, mask_decoder.*) to DIR")
    p.add_argument("--summary", default=None, help="write the final metrics as JSON to this file")
    add_storage_options(p)
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--fault-at", default=None, help=argparse.SUPPRESS)  # tests: "STEP:MARKER" kills rank 1 once


def config_from_args(args: argparse.Namespace) -> TrainJobConfig:
    datasets = tuple(parse_dataset_spec(t) for t in args.datasets)
    heldout = tuple(parse_heldout_spec(t) for t in args.heldout)
    clip = args.clip_grad_norm if args.clip_grad_norm and args.clip_grad_norm > 0 else None
    fault = None
    if args.fault_at:
        step, _, marker = args.fault_at.partition(":")
        fault = (int(step), marker)
    storage = parse_storage_options(args.storage_options)
    return TrainJobConfig(
        datasets=datasets, heldout=heldout, name=args.name, storage_path=args.storage_path, model=args.model,
        checkpoint=args.checkpoint, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, clip_grad_norm=clip, warmup_steps=args.warmup_steps, schedule=args.schedule,
        mask_points=args.mask_points, num_prompts=args.num_prompts, scale_range=tuple(args.scale_range),
        min_area=args.min_area, published_truncation=args.published_truncation,
        published_image_box=args.published_image_box, templates=args.templates,
        unfreeze=tuple(t.strip() for t in args.unfreeze.split(",") if t.strip()), roi_box=args.roi_box,
        trunk_warmup=args.trunk_warmup,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_at_start=args.eval_at_start,
        eval_samples=args.eval_samples, report_every=args.report_every, loader_workers=args.loader_workers,
        seed=args.seed, precision=args.precision, num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, num_to_keep=args.num_to_keep, fault_at=fault,
        progress_every=args.progress_every, quiet=args.quiet, storage_options=storage)


def trainer_config(cfg: TrainJobConfig):
    from jobs.trainer import TrainerConfig

    return TrainerConfig(name=cfg.name, storage_path=cfg.storage_path, num_workers=max(cfg.num_workers, 1),
                         use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                         num_to_keep=cfg.num_to_keep, storage_options=cfg.storage_options)


def run_train(cfg: TrainJobConfig, *, output: str | None = None, export_released: str | None = None,
              ray_address: str | None = None) -> dict[str, Any]:
    """Train (on Ray Train, or in this process with ``num_workers=0``), then write ``output`` and the released
    layout; prints progress lines as the run goes (unless ``cfg.quiet``). Returns the final metrics
    (``eval/<dataset>/<prompt>/<metric>``, ``batches/<dataset>``, ``step``, ..., ``wall_time_s``, ``checkpoint``)."""
    from jobs import trainer
    from jobs.train_loop import train_loop

    if export_released and cfg.trains_trunk():
        raise ValueError("the released layout (sam2clip.pth, clip2sam.pth) has no place for a trained CLIP trunk "
                         "(--unfreeze clip, --trunk-warmup); drop --export-released: the --output file holds the "
                         "whole model")
    tcfg = trainer_config(cfg)
    start = time.time()
    show = None if cfg.quiet else print_line
    if cfg.num_workers == 0:
        result = trainer.run_local(train_loop, cfg.to_dict(), tcfg, on_progress=show)
    else:
        import ray

        if show:
            show(f"[train] starting Ray and {cfg.num_workers} Ray Train worker(s) for run {cfg.name!r} "
                 f"(checkpoints under {cfg.storage_path})")
        if not ray.is_initialized():
            ray.init(address=ray_address)
        result = trainer.launch(train_loop, cfg.to_dict(), tcfg, on_progress=show)
    metrics = dict(result.metrics or {})
    metrics["wall_time_s"] = time.time() - start
    if result.checkpoint is None:
        raise ValueError(f"run {cfg.name!r} ended without a checkpoint; see the worker logs")
    metrics["checkpoint"] = str(result.checkpoint.path)
    with result.checkpoint.as_directory() as d:
        metrics.update(export_outputs(Path(d) / MODEL_FILE, output=output, released_dir=export_released,
                                      storage_options=cfg.storage_options))
        if output:
            metrics["vocabularies"] = export_vocabularies(cfg, Path(d) / MODEL_FILE, output)
    return metrics


def vocabulary_url(output: str, dataset: str) -> str:
    """Where :func:`export_vocabularies` puts ``dataset``'s vocabulary for the model file ``output``."""
    return f"{output.removesuffix('.safetensors')}.{dataset}.vocab.safetensors"


def export_vocabularies(cfg: TrainJobConfig, model_file: Path, output: str) -> dict[str, str]:
    """Write the vocabulary each dataset was classified against (its classes, the run's templates, unsplit classes
    as base) next to ``output`` (:func:`vocabulary_url`), for ``ovsam annotate --vocabulary``: annotating with the
    same class names under other templates or another split does not give the labels the run was evaluated on.
    Returns ``{dataset: url}``."""
    import tempfile

    import fsspec

    from jobs.train_loop import vocabulary_for
    from ovsam import build_ovsam
    from pipeline.training.train_data import open_shard_set

    model = None
    urls = {}
    for d in cfg.datasets:
        classes = open_shard_set(d.url, cfg.storage_options).classes
        if classes is None or classes.class_agnostic:
            continue
        model = model or build_ovsam(checkpoint=model_file)
        vocabulary = vocabulary_for(classes, model, cfg.storage_path, cfg.storage_options,
                                    templates=cfg.template_list())
        urls[d.name] = vocabulary_url(output, d.name)
        with tempfile.TemporaryDirectory() as tmp:
            saved = vocabulary.save(Path(tmp) / "vocabulary.safetensors")
            with open(saved, "rb") as src, fsspec.open(urls[d.name], "wb", **cfg.storage_options) as dst:
                dst.write(src.read())
    return urls


def export_outputs(model_file: Path, *, output: str | None = None, released_dir: str | None = None,
                   storage_options: dict | None = None) -> dict[str, Any]:
    """Copy the trained model file to ``output`` (local path or URL) and export the released layout."""
    out: dict[str, Any] = {}
    if output:
        import fsspec

        with open(model_file, "rb") as src, fsspec.open(output, "wb", **(storage_options or {})) as dst:
            dst.write(src.read())
        out["output"] = output
    if released_dir:
        from ovsam import build_ovsam
        from ovsam.checkpoint import export_released

        paths = export_released(build_ovsam(checkpoint=model_file), released_dir)
        out["released"] = {k: str(v) for k, v in paths.items()}
    return out


def _summary_lines(metrics: dict[str, Any]) -> list[str]:
    lines = [f"trained {int(metrics.get('step', 0))} steps in {metrics.get('wall_time_s', 0.0):.0f} s "
             f"({metrics.get('samples_per_s', 0.0):.1f} samples/s in the last steps)"]
    batches = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("batches/")}
    if batches:
        total = sum(batches.values()) or 1
        lines.append("batches per dataset: " + ", ".join(f"{k} {int(v)} ({v / total:.0%})" for k, v in
                                                          sorted(batches.items())))
    for prefix, title in (("initial/", "untrained"), ("eval/", "held-out")):
        evals = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        for key in sorted(evals):
            if key.endswith(("/miou", "/acc", "/head_acc")):
                lines.append(f"{title} {key}: {evals[key]:.3f}")
    for key in ("output", "vocabularies", "released", "checkpoint"):
        if key in metrics:
            lines.append(f"{key}: {metrics[key]}")
    return lines


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job for parsed arguments (``ovsam train`` and :func:`main`); prints a summary."""
    cfg = config_from_args(args)
    metrics = run_train(cfg, output=args.output, export_released=args.export_released,
                        ray_address=args.ray_address)
    if args.summary:
        Path(args.summary).write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))
    print("\n".join(_summary_lines(metrics)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ovsam train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO, every step included (as `ovsam -v "
                                                                     "train`)")
    args = p.parse_args(argv)
    # as `ovsam train`: warnings and errors (-v: info); the progress lines and the summary are printed
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except ValueError as e:
        print(f"ovsam train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
