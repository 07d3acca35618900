"""Demo: train ovsam-tiny on a synthetic world with ``ovsam train``, then build a small corpus of WebDataset shards,
annotate it with the annotation job on local Ray, export COCO and render overlays.

Launch:

    make demo                                  # installs the project into .venv first
    python -m jobs.demo --output demo_out
    ovsam demo --output demo_out --shards 4 --samples-per-shard 16
    python -m jobs.demo --no-train             # the random-init model: the job's plumbing only, in a minute
    python -m jobs.demo --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors   # another model

Steps, all under ``--output``:

* ``model/`` – unless ``--checkpoint`` or ``--no-train`` is given: ``ovsam pack synthetic`` writes train and
  held-out shard sets of coloured squares, circles and triangles (``model/data/``), ``ovsam train`` trains the
  random-init ``ovsam-tiny`` on them with 2 Ray Train workers (``jobs.train.SYNTHETIC_RECIPE``, 7-12 min on 2
  cores; checkpoints in ``model/runs/``), evaluates the held-out set before and after, and writes
  ``model/ovsam-tiny-synthetic.safetensors`` with the vocabulary it was trained against
  (``model/ovsam-tiny-synthetic.synthetic.vocab.safetensors``) and ``model/summary.json``. A later demo reuses
  the trained model (an interrupted training resumes from its last checkpoint).
* ``shards/shard-NNNNNN.tar`` – other scenes of the same world with a JSON sidecar of boxes per image, as an
  upstream detector would give; the last shard also holds a truncated JPEG and a sample with a malformed sidecar,
  to show how bad input is reported.
* ``annotations/`` – the job's output: ``instances/``, ``images/``, ``_manifest/`` per shard and ``run.json``.
  Running the demo again skips the committed shards; a run with another model replaces the old output.
* ``coco.json`` – the annotations as COCO instances JSON (``ovsam export-coco``).
* ``overlays/*.png`` – annotated samples: masks lightened and outlined, "label score" captions (``ovsam show``).

The vocabulary is the twelve colour x shape names. The demo starts by saying what it will do and about how long
that takes on this machine (the training time scaled from the measured 400-700 s of the default recipe on 2-core
machines); while it trains it prints ``ovsam train``'s progress lines (step/total, loss, images/s, elapsed, ETA, at
least every ``--progress-every`` seconds, and each held-out evaluation), then the annotation job's, and at the end
where everything went. ``-q`` leaves the progress lines out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from jobs.args import float_in

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (shared by ``python -m jobs.demo`` and ``ovsam demo``)."""
    parser.add_argument("--output", type=Path, default=Path("demo_out"),
                        help="directory for shards, annotations, coco.json and overlays (default: demo_out)")
    parser.add_argument("--model", default="ovsam-tiny",
                        help="model name from `ovsam models` (default: ovsam-tiny)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="project checkpoint to load into the model (e.g. from `ovsam convert-official`)")
    parser.add_argument("--shards", type=int, default=2, help="shards to generate (default: 2)")
    parser.add_argument("--samples-per-shard", type=int, default=8, help="scenes per shard (default: 8)")
    parser.add_argument("--overlays", type=int, default=6, help="overlay PNGs to render (default: 6)")
    parser.add_argument("--workers", type=int, default=None, help="model workers (default: one per CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated scenes (default: 0)")
    parser.add_argument("--no-train", action="store_true",
                        help="annotate with the model as built (random init for ovsam-tiny) instead of training it")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="CLIP2SAM training steps for the demo model (default: the synthetic recipe's)")
    parser.add_argument("--trunk-warmup", type=int, default=None,
                        help="trunk warm-up steps before them (default: the synthetic recipe's; 0 for none)")
    parser.add_argument("--train-workers", type=int, default=2, help="Ray Train workers (default: 2)")
    parser.add_argument("--progress-every", type=float_in(0.0), default=None, metavar="SECONDS",
                        help="seconds between progress lines of the training (default: 30) and of the annotation "
                             "job (default: 5)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines from the training and the annotation job (the demo's own lines, "
                             "the summaries and errors still print)")


TRAIN_SCENES = 256
HELDOUT_SCENES = 48
# Measured wall time of the demo's training with the default recipe (1,200 trunk warm-up + 800 CLIP2SAM steps, the
# held-out evaluations included) on 2 Ray Train workers: 400 s on a 2-core AMD EPYC with AVX-512, 700 s on an
# earlier 2-core machine (README, Training), about 40 s of which do not depend on the steps (starting the workers,
# three held-out evaluations); and of the annotation job on the default 2 x 8 scenes, Ray's start included.
RECIPE_STEPS = 2000
RECIPE_SECONDS = (400.0, 700.0)
FIXED_SECONDS = 40.0
ANNOTATE_SECONDS = (30.0, 60.0)


def _minutes(low: float, high: float) -> str:
    lo, hi = max(1, round(low / 60)), max(1, round(high / 60))
    return f"{lo} min" if lo == hi else f"{lo}-{hi} min"


def training_estimate(steps: int, workers: int, cores: int | None = None) -> tuple[float, float]:
    """The range of seconds the demo's training of ``steps`` steps (warm-up included) should take on ``workers``
    workers here: the measured times of the recipe, their per-step part scaled by the steps and, with fewer cores
    than workers, by the workers each core has to run. The progress lines' ETA is the measurement."""
    cores = cores or os.cpu_count() or 1
    scale = steps / RECIPE_STEPS * max(1.0, workers / cores)
    return tuple(FIXED_SECONDS + (t - FIXED_SECONDS) * scale for t in RECIPE_SECONDS)


def demo_train_config(out: Path, steps: int | None, workers: int, trunk_warmup: int | None = None,
                      progress_every: float | None = None, quiet: bool = False) -> Any:
    """The ``ovsam train`` settings of the demo model (``SYNTHETIC_RECIPE`` with the demo's overrides)."""
    from jobs.train import SYNTHETIC_RECIPE, TrainJobConfig
    from pipeline.training.train_specs import DatasetSpec

    recipe = dict(SYNTHETIC_RECIPE)
    if steps is not None:
        recipe["steps"] = steps
    if trunk_warmup is not None:
        recipe["trunk_warmup"] = trunk_warmup
    if progress_every is not None:
        recipe["progress_every"] = progress_every
    data = out / "data" / "synthetic"
    return TrainJobConfig(datasets=(DatasetSpec("synthetic", str(data / "train"), "mask", 1.0),),
                          heldout=(("synthetic", str(data / "heldout")),), name="synthetic",
                          storage_path=str(out / "runs"), eval_at_start=True, eval_samples=HELDOUT_SCENES,
                          checkpoint_every=100, report_every=20, num_workers=workers, quiet=quiet, **recipe)


def _demo_files(out: Path) -> tuple[Path, Path, Path]:
    """The model file, its vocabulary and the summary of the demo model under ``out``."""
    from jobs.train import vocabulary_url

    model_file = out / "ovsam-tiny-synthetic.safetensors"
    return model_file, Path(vocabulary_url(str(model_file), "synthetic")), out / "summary.json"


def trained_summary(out: Path, cfg: Any) -> dict | None:
    """The summary of a finished demo model under ``out`` trained with ``cfg``'s settings, or None."""
    model_file, vocabulary_file, summary_file = _demo_files(out)
    if model_file.exists() and vocabulary_file.exists() and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("training_hash") == cfg.training_hash():
            return summary
    return None


def train_demo_model(out: Path, steps: int | None, workers: int, trunk_warmup: int | None = None,
                     progress_every: float | None = None, quiet: bool = False) -> tuple[Path, Path]:
    """Train ``ovsam-tiny`` on synthetic shard sets under ``out`` (or reuse a finished run); returns the model file
    and the vocabulary ``ovsam train`` wrote beside it (the one the model was trained and evaluated against).

    Runs on the Ray instance this process is connected to; prints the training's progress lines (unless
    ``quiet``) and the held-out metrics before and after."""
    from jobs.train import run_train
    from pipeline.training.packers.synthetic import pack_synthetic

    cfg = demo_train_config(out, steps, workers, trunk_warmup, progress_every, quiet)
    data = out / "data" / "synthetic"
    model_file, vocabulary_file, summary_file = _demo_files(out)
    summary = trained_summary(out, cfg)
    if summary is not None:
        print(f"ovsam demo: reusing {model_file} (trained {summary['step']} steps; delete it to retrain)")
        return model_file, vocabulary_file
    print(f"ovsam demo: packing the synthetic world ({TRAIN_SCENES} training and {HELDOUT_SCENES} held-out scenes) "
          f"to {data}")
    pack_synthetic(str(data), kind="mask", num_train=TRAIN_SCENES, num_heldout=HELDOUT_SCENES,
                   samples_per_shard=32)
    warmup = f"{cfg.trunk_warmup} trunk warm-up steps and " if cfg.trunk_warmup else ""
    low, high = training_estimate(cfg.trunk_warmup + cfg.steps, workers)
    print(f"ovsam demo: training ovsam-tiny for {warmup}{cfg.steps} steps on {workers} Ray Train workers "
          f"(checkpoints in {out / 'runs'}; about {_minutes(low, high)} here)")
    metrics = run_train(cfg, output=str(model_file))
    summary = {"training_hash": cfg.training_hash(), **{k: v for k, v in metrics.items()
                                                         if isinstance(v, (int, float, str))}}
    summary_file.write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(f"ovsam demo: trained {int(metrics['step'])} steps in {metrics['wall_time_s']:.0f} s; held-out scenes, "
          f"untrained -> trained:")
    for prompt in ("box", "point"):
        pairs = [(name, metrics.get(f"initial/synthetic/{prompt}/{key}"), metrics.get(f"eval/synthetic/{prompt}/{key}"))
                 for name, key in (("mask IoU", "miou"), ("top-1 label", "acc"))]
        print(f"  {prompt} prompts: " + ", ".join(f"{name} {a:.2f} -> {b:.2f}" for name, a, b in pairs
                                                 if a is not None and b is not None))
    return model_file, vocabulary_file


def plan_line(args: argparse.Namespace, out: Path, train: bool) -> str:
    """What the demo is about to do and about how long it takes on this machine."""
    cores = os.cpu_count() or 1
    scenes = args.shards * args.samples_per_shard
    annotate = f"annotates {scenes} scenes (about {_minutes(*ANNOTATE_SECONDS)})"
    if not train:
        return f"ovsam demo: {annotate} with {args.model}, on {cores} CPU core(s); outputs under {out}"
    cfg = demo_train_config(out / "model", args.train_steps, args.train_workers, args.trunk_warmup)
    if trained_summary(out / "model", cfg) is not None:
        return (f"ovsam demo: reuses the model trained by an earlier demo, then {annotate}, on {cores} CPU core(s); "
                f"outputs under {out}")
    low, high = training_estimate(cfg.trunk_warmup + cfg.steps, args.train_workers, cores)
    return (f"ovsam demo: trains ovsam-tiny ({cfg.trunk_warmup + cfg.steps} steps on {args.train_workers} Ray Train "
            f"workers: about {_minutes(low, high)} on this machine, {cores} CPU core(s)), then {annotate}; outputs "
            f"under {out}" + ("" if args.quiet else "; progress lines give the ETA as it goes"))


def run(args: argparse.Namespace) -> int:
    """Generate shards, annotate them, export COCO, render overlays; print what was written."""
    import ray

    from jobs.annotate import AnnotateConfig, run_annotate
    from pipeline.export.coco import export_coco
    from pipeline.export.overlay import write_overlays
    from pipeline.annotate.stages import ModelStageConfig
    from pipeline.training.synthetic import CLASS_NAMES, write_shards

    if args.shards < 1 or args.samples_per_shard < 1:
        raise ValueError("--shards and --samples-per-shard must be at least 1")
    train = args.checkpoint is None and not args.no_train
    if train and args.model != "ovsam-tiny":
        raise ValueError(f"the demo trains ovsam-tiny only; give {args.model} a --checkpoint or use --no-train")
    out = Path(args.output).resolve()
    print(plan_line(args, out, train), flush=True)
    shards = write_shards(out / "shards", num_shards=args.shards, samples_per_shard=args.samples_per_shard,
                          seed=args.seed, bad_samples=True)
    vocabulary = out / "classes.txt"
    vocabulary.write_text("\n".join(CLASS_NAMES) + "\n")
    print(f"ovsam demo: wrote {len(shards)} shards of synthetic scenes to {out / 'shards'}")

    annotations = out / "annotations"
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        checkpoint = args.checkpoint
        if train:
            checkpoint, vocabulary = train_demo_model(out / "model", args.train_steps, args.train_workers,
                                                      args.trunk_warmup, args.progress_every, args.quiet)
        stage = ModelStageConfig(model=args.model, checkpoint=None if checkpoint is None else str(checkpoint),
                                 vocabulary=str(vocabulary), prompts="sidecar", top_k=3)
        config = AnnotateConfig(inputs=(str(out / "shards" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar"),),
                                output=str(annotations), stage=stage, batch_size=4, workers=args.workers,
                                overwrite=True, quiet=args.quiet,
                                progress_every_s=5.0 if args.progress_every is None else max(args.progress_every, 0.1))
        summary = run_annotate(config)
    finally:
        if started:
            ray.shutdown()
    if summary is None or summary.failed:
        return 1

    import fsspec

    fs = fsspec.filesystem("file")
    coco = export_coco(fs, str(annotations))
    (out / "coco.json").write_text(json.dumps(coco))
    overlays = write_overlays(str(annotations), out / "overlays", limit=args.overlays)
    print(f"ovsam demo: {len(coco['images'])} annotated images, {len(coco['annotations'])} instances; the outputs:")
    if train:
        print(f"  model        {checkpoint} (vocabulary {Path(vocabulary).name}, training summary "
              f"{Path(checkpoint).parent / 'summary.json'})")
    print(f"  annotations  {annotations}/ (instances/, images/, _manifest/, run.json)")
    print(f"  coco         {out / 'coco.json'}")
    print(f"  overlays     {len(overlays)} PNGs in {out / 'overlays'}")
    if checkpoint is None:
        print(f"  ({args.model} without --checkpoint is randomly initialised: its masks and labels mean nothing)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as e:
        print(f"ovsam demo: error: {e}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
