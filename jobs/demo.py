"""Demo: build a small corpus of WebDataset shards, annotate it with the annotation job on local Ray, export COCO
and render overlays.

Launch:

    make demo                                  # installs the project into .venv first
    python -m jobs.demo --output demo_out
    ovsam demo --output demo_out --shards 4 --samples-per-shard 16
    python -m jobs.demo --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors   # another model

Steps, all under ``--output``:

* ``shards/shard-NNNNNN.tar`` – synthetic scenes (coloured squares, circles and triangles on textured
  backgrounds, several sizes) with a JSON sidecar of boxes per image, as an upstream detector would give; the
  last shard also holds a truncated JPEG and a sample with a malformed sidecar, to show how bad input is reported.
* ``annotations/`` – the job's output: ``instances/``, ``images/``, ``_manifest/`` per shard and ``run.json``.
  Running the demo again skips the committed shards; a run with another model replaces the old output.
* ``coco.json`` – the annotations as COCO instances JSON (``ovsam export-coco``).
* ``overlays/*.png`` – annotated samples: translucent masks, boxes, "label score" captions (``ovsam show``).

The vocabulary is the twelve colour x shape names. The default model, ``ovsam-tiny``, is randomly initialised
unless ``--checkpoint`` gives it trained weights: without them the run exercises every part of the job on CPU in
well under a minute, but its masks and labels carry no meaning.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

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


def run(args: argparse.Namespace) -> int:
    """Generate shards, annotate them, export COCO, render overlays; print what was written."""
    import ray

    from jobs.annotate import AnnotateConfig, run_annotate
    from pipeline.export import export_coco
    from pipeline.overlay import write_overlays
    from pipeline.stages import ModelStageConfig
    from pipeline.synthetic import CLASS_NAMES, write_shards

    if args.shards < 1 or args.samples_per_shard < 1:
        raise ValueError("--shards and --samples-per-shard must be at least 1")
    out = Path(args.output).resolve()
    shards = write_shards(out / "shards", num_shards=args.shards, samples_per_shard=args.samples_per_shard,
                          seed=args.seed, bad_samples=True)
    vocabulary = out / "classes.txt"
    vocabulary.write_text("\n".join(CLASS_NAMES) + "\n")
    print(f"ovsam demo: wrote {len(shards)} shards of synthetic scenes to {out / 'shards'}")

    annotations = out / "annotations"
    stage = ModelStageConfig(model=args.model, checkpoint=None if args.checkpoint is None else str(args.checkpoint),
                             vocabulary=str(vocabulary), prompts="sidecar", top_k=3)
    config = AnnotateConfig(inputs=(str(out / "shards" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar"),),
                            output=str(annotations), stage=stage, batch_size=4, workers=args.workers,
                            overwrite=True)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
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
    print(f"ovsam demo: {len(coco['images'])} annotated images, {len(coco['annotations'])} instances")
    print(f"  annotations  {annotations}/ (instances/, images/, _manifest/, run.json)")
    print(f"  coco         {out / 'coco.json'}")
    print(f"  overlays     {len(overlays)} PNGs in {out / 'overlays'}")
    if args.checkpoint is None:
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
