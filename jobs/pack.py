"""``ovsam pack``: public dataset formats -> WebDataset training shards + classes.json + _index.json.

Launch:

    ovsam pack coco --annotations annotations/instances_train2017.json --images train2017/ --output packed/coco \\
        --base-only                                     # OV-COCO: the 48 base classes only
    ovsam pack coco --annotations lvis_v1_train.json --images coco2017_images/ --output s3://bucket/lvis/ \\
        --base-only --storage-options '{"client_kwargs": {"endpoint_url": "https://s3.example.com"}}'
    ovsam pack detection --annotations zhiyuan_objv2_train.json --images objects365/ --output packed/o365 \\
        --dataset objects365 --max-shard-bytes 1GB
    ovsam pack folders --root imagenet21k/ --output packed/in21k    # root/<wnid>/*.JPEG
    ovsam pack sa1b --root sa1b/ --output packed/sa1b               # sa_N.jpg + sa_N.json
    ovsam pack synthetic --output packed/synthetic --kind mask --num-train 2000 --num-heldout 200
    python -m jobs.pack coco ...                                   # the same without the ovsam entry point
    ray job submit --working-dir . -- python -m jobs.pack folders --root s3://bucket/in21k --output s3://...

Packing is streaming (one shard in memory at most) and resumable: run the same command again after an
interruption and it continues after the last shard recorded in ``_index.json``. A different source or different
settings into the same output is refused. The format is documented in ``schemas/training.py``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any

from jobs.args import add_storage_options, storage_options

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """``"500MB"``, ``"1GiB"``, ``"1e9"`` or ``"4096"`` -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 1000000, 500MB or 1GiB, got {text!r}")
    unit = (m.group(2) or "").lower()
    unit = unit[:-1] if unit.endswith("b") else unit
    return int(float(m.group(1)) * _UNITS[unit])


def _common(p: argparse.ArgumentParser, *, dataset_default: str | None) -> None:
    p.add_argument("--output", required=True, help="output URL (local path, s3://, gs://, ...)")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="close a shard after this many samples (default 1000; 0 = no count limit)")
    p.add_argument("--max-shard-bytes", type=parse_size, default=None,
                   help="close a shard before it would grow past this size (e.g. 1GB); whichever limit comes first")
    p.add_argument("--prefix", default=None, help="shard names <prefix>-NNNNNN.tar (default: the dataset name)")
    p.add_argument("--dataset", default=dataset_default,
                   help="dataset name in every sidecar and classes.json" +
                        (f" (default: {dataset_default})" if dataset_default else " (default: from the source)"))
    p.add_argument("--io-threads", type=int, default=8, help="threads reading and converting items (default 8)")
    add_storage_options(p, help="fsspec options as a JSON object, for inputs and output")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pack`` subcommands (coco, detection, folders, sa1b, synthetic) on ``p``."""
    sub = p.add_subparsers(dest="pack_format", required=True, metavar="FORMAT")
    for name, kind_help in (("coco", "COCO / LVIS instances JSON + image folder: masks, boxes, labels"),
                            ("detection", "COCO-style detection JSON (Objects365, V3Det) + image folder: boxes, "
                                          "labels")):
        q = sub.add_parser(name, help=kind_help, description=kind_help + ".")
        q.add_argument("--annotations", required=True, help="the instances JSON (any fsspec URL)")
        q.add_argument("--images", required=True, help="folder holding the images' file_name paths")
        q.add_argument("--base-only", action="store_true",
                       help="keep only base-class annotations (COCO 48/17 split, LVIS frequent+common, or "
                            "--split-file) and drop images left empty")
        q.add_argument("--split-file", default=None,
                       help='JSON {"base": [category ids or names], "novel": [...]}; other classes are excluded')
        q.add_argument("--keep-empty", action="store_true", help="also pack images without annotations")
        _common(q, dataset_default=None)
    q = sub.add_parser("folders", help="root/<class>/<image> (ImageNet-21k/22k): image-level labels",
                       description="Class folders named by WordNet ids (names from timm's synset data); any "
                                   "other folder name is used as the class name.")
    q.add_argument("--root", required=True, help="folder of class folders")
    _common(q, dataset_default="imagenet21k")
    q = sub.add_parser("sa1b", help="SA-1B style image + JSON pairs: class-agnostic masks",
                       description="sa_N.jpg + sa_N.json (annotations[].segmentation RLE, bbox xywh) under --root.")
    q.add_argument("--root", required=True, help="folder of image + JSON pairs")
    q.add_argument("--keep-empty", action="store_true", help="also pack images without usable masks")
    _common(q, dataset_default="sa1b")
    q = sub.add_parser("synthetic", help="coloured shapes on textures: train/ and heldout/ shard sets",
                       description="Scenes of coloured shapes (4 colours x 3 shapes) on textured backgrounds with "
                                   "occlusion and varied sizes, written to <output>/train and <output>/heldout.")
    q.add_argument("--kind", required=True, choices=("image", "box", "mask"), help="label level")
    q.add_argument("--num-train", type=int, required=True, help="training scenes")
    q.add_argument("--num-heldout", type=int, required=True, help="held-out scenes")
    q.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    q.add_argument("--max-objects", type=int, default=None,
                   help="objects per scene, at most (default 1 for --kind image, else 4)")
    _common(q, dataset_default="synthetic")


def _write_options(args: argparse.Namespace, storage: dict[str, Any], dataset: str) -> dict[str, Any]:
    from pipeline.training.packers.common import dataset_prefix

    if args.samples_per_shard < 0:
        raise ValueError(f"--samples-per-shard must be >= 0, got {args.samples_per_shard}")
    return {"storage_options": storage, "samples_per_shard": args.samples_per_shard or None,
            "max_shard_bytes": args.max_shard_bytes, "prefix": args.prefix or dataset_prefix(dataset),
            "io_threads": args.io_threads}


def run(args: argparse.Namespace) -> int:
    """Plan and write what ``args`` (from :func:`add_arguments`) ask for; print a summary; return 0."""
    from pipeline.training.packers.coco import plan_coco, plan_detection
    from pipeline.training.packers.folders import plan_folders
    from pipeline.training.packers.sa1b import plan_sa1b
    from pipeline.training.packers.synthetic import pack_synthetic
    from pipeline.training.packers.writer import write_plan

    storage = storage_options(args.storage_options)
    fmt = args.pack_format
    if fmt == "synthetic":
        summaries = pack_synthetic(args.output, kind=args.kind, num_train=args.num_train,
                                   num_heldout=args.num_heldout, seed=args.seed, max_objects=args.max_objects,
                                   **_write_options(args, storage, args.dataset))
        for summary in summaries.values():
            print(f"[pack] {summary.describe()}")
        return 0
    if fmt in ("coco", "detection"):
        planner = plan_coco if fmt == "coco" else plan_detection
        plan = planner(args.annotations, args.images, base_only=args.base_only, split_file=args.split_file,
                       dataset=args.dataset, keep_empty=args.keep_empty, storage_options=storage)
    elif fmt == "folders":
        plan = plan_folders(args.root, dataset=args.dataset, storage_options=storage)
    elif fmt == "sa1b":
        plan = plan_sa1b(args.root, dataset=args.dataset, keep_empty=args.keep_empty, storage_options=storage)
    else:  # argparse restricts the choices
        raise ValueError(f"unknown pack format {fmt!r}")
    summary = write_plan(plan, args.output, **_write_options(args, storage, plan.classes.dataset))
    print(f"[pack] {summary.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovsam pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks on error")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"ovsam pack: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
