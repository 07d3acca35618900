"""The ``ovsam`` command.

    ovsam weights                                        # the released weight files and where they come from
    ovsam weights download sam_vit_h_4b8939.pth sam2clip_vith_rn50x16.pth clip2sam_coco_rn50x16.pth --dest weights
    ovsam convert-official --clip openai --sam weights/sam_vit_h_4b8939.pth \\
        --sam2clip weights/sam2clip_vith_rn50x16.pth --clip2sam weights/clip2sam_coco_rn50x16.pth \\
        --vocabulary coco -o ovsam_coco.safetensors
    ovsam models                                         # built-in model configs
    ovsam predict photo.jpg --box 40,30,200,180 -o pred/  # one process: an overlay and a JSON per image
    ovsam pack coco --annotations instances_train2017.json --images train2017/ --output packed/coco
    ovsam eval coco --gt instances_val2017.json --pred out/  # mask and box AP of annotations: all/base/novel
    ovsam eval compare out_fp32/ out_bf16/               # how far two runs of the same input agree
    ovsam serve --model ovsam-tiny --port 8000              # the browser page, the HTTP API, Label Studio
    ovsam demo --output demo_out                         # same as `python -m jobs.demo`

Each subcommand is one function; heavy imports (torch, the model library) happen inside it, so ``ovsam --help``
stays fast. Exit codes: 0 success, 1 a failed command (the message says why), 2 a usage error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jobs.args import UsageError, add_storage_options, check_output_shards, positive_int, storage_options

logger = logging.getLogger(__name__)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovsam")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_weights(args: argparse.Namespace) -> int:
    """List the released files: name, size, publisher, URL, contents and the project models they feed."""
    from ovsam.weights import RELEASED_FILES

    for entry in RELEASED_FILES:
        print(f"{entry.name}  ({entry.approx_size}, {entry.publisher})")
        print(f"    url:    {entry.url}")
        print(f"    holds:  {entry.holds}")
        print(f"    feeds:  {entry.feeds}")
        check = ", ".join(part for part in (
            f"size {entry.size_bytes} bytes" if entry.size_bytes is not None else "",
            "sha256" if entry.sha256 is not None else "") if part)
        print(f"    checks: {check or 'server Content-Length only'}")
    print("\ndownload with: ovsam weights download NAME [NAME ...] [--dest DIR] [--base-url URL]")
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    """Download each named file into ``--dest``; stop at the first failure."""
    from ovsam.weights import download, get_released_file

    entries = [get_released_file(name) for name in args.names]  # every name is checked before any download
    for entry in entries:
        path = download(entry, args.dest, base_url=args.base_url, progress=not args.quiet, force=args.force)
        print(f"{entry.name}: {path}")
    return 0


def _require_file(path: Path, flag: str, hint: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; {hint}")


def cmd_convert_official(args: argparse.Namespace) -> int:
    """Assemble the released OV-SAM files into one project checkpoint (``ovsam.convert.convert_official``)."""
    _require_file(args.sam, "--sam", "get it with `ovsam weights download sam_vit_h_4b8939.pth`")
    _require_file(args.sam2clip, "--sam2clip", "get it with `ovsam weights download sam2clip_vith_rn50x16.pth`")
    _require_file(args.clip2sam, "--clip2sam",
                  "get it with `ovsam weights download clip2sam_coco_rn50x16.pth` (or the _lvis_ file)")
    clip_path = Path(args.clip)
    if (clip_path.suffix or "/" in args.clip) and not clip_path.is_file():
        raise FileNotFoundError(f"--clip {args.clip}: no such file; pass the open_clip tag 'openai' or the path "
                                f"of `ovsam weights download RN50x16.pt`")

    from ovsam.convert import convert_official

    convert_official(clip=args.clip, sam=args.sam, sam2clip=args.sam2clip, clip2sam=args.clip2sam,
                     output=args.output, vocabulary=args.vocabulary, roi_size=args.roi_size)
    print(f"wrote {args.output}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    """Run the annotation job (``jobs.annotate``)."""
    from jobs.annotate import config_from_args, run_annotate

    summary = run_annotate(config_from_args(args))
    return 1 if summary is not None and summary.failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment and name objects in a few images, in this process (``jobs.predict``)."""
    from jobs.predict import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve segment-and-name over HTTP on Ray Serve (``jobs.serve``)."""
    from jobs.serve import run

    return run(args)


def cmd_pack(args: argparse.Namespace) -> int:
    """Pack a dataset into WebDataset training shards (``jobs.pack``)."""
    from jobs.pack import run

    return run(args)


def cmd_distill(args: argparse.Namespace) -> int:
    """SAM2CLIP distillation on Ray Train, or the teacher-embedding dump (``jobs.distill``)."""
    from jobs.distill import run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    """CLIP2SAM co-training on a dataset mixture on Ray Train (``jobs.train``)."""
    from jobs.train import run_from_args

    return run_from_args(args)


def cmd_relabel(args: argparse.Namespace) -> int:
    """Re-label a stored run with a new vocabulary from its region embeddings (``jobs.relabel``)."""
    from jobs.relabel import config_from_args, run_relabel

    summary = run_relabel(config_from_args(args))
    return 1 if summary.failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    """Render annotated samples as PNG overlays (``pipeline.export.overlay.write_overlays``)."""
    from pipeline.export.overlay import write_overlays

    storage = storage_options(args.storage_options)
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    check_output_shards("--shards", args.shards, args.input, storage)
    shown: list = []

    def collect(path: Path, shard: str, key: str, instances: list[dict]) -> None:
        from pipeline.export.gallery import ShownImage

        shown.append(ShownImage(path, shard, key, [{"label_name": r["label_name"], "label_score": r["label_score"]}
                                                   for r in instances]))

    paths = write_overlays(args.input, args.output, limit=args.n, shards=args.shards, storage_options=storage,
                           on_written=collect if args.html else None)
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} overlay(s) to {args.output}")
    if args.html:
        from pipeline.export.gallery import write_html

        page = write_html(shown, Path(args.output) / "index.html", title=f"ovsam annotations of {args.input}")
        print(f"wrote {page}: {len(shown)} images with their labels and scores, filterable")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the committed annotations of an output for a labelling tool (``--format``; ``export-coco`` is
    ``--format coco``), and with ``--images-dir`` the annotated images beside them."""
    import json

    import fsspec

    from pipeline.export.coco import export_coco, write_images
    from pipeline.export.tools import label_studio_tasks, write_yolo_seg

    fmt = getattr(args, "format", "coco")
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0 pixels, got {args.tolerance}")
    storage = storage_options(args.storage_options)
    fs, root = fsspec.core.url_to_fs(args.input, **storage)
    if not fs.exists(f"{root.rstrip('/')}/run.json"):
        raise UsageError(f"--input {args.input} is not the output of `ovsam annotate` (no run.json)")
    check_output_shards("--shards", args.shards, args.input, storage)
    out_fs, out_path = fsspec.core.url_to_fs(str(args.output), **storage)
    if fmt == "yolo-seg" and out_fs.isfile(out_path):
        raise UsageError(f"-o {args.output} is a file; --format yolo-seg writes a directory")
    if fmt != "yolo-seg" and out_fs.isdir(out_path):
        raise UsageError(f"-o {args.output} is a directory; --format {fmt} writes one JSON file")
    coco = export_coco(fs, root, polygons=args.polygons or fmt == "cvat", tolerance=args.tolerance)
    images_dir = args.images_dir or (f"{str(args.output).rstrip('/')}/images" if fmt == "yolo-seg" else None)
    written = 0
    if images_dir:
        written = write_images(args.input, coco["images"], images_dir, storage_options=storage, shards=args.shards)
    if fmt == "yolo-seg":
        write_yolo_seg(coco, str(args.output), storage_options=storage, tolerance=args.tolerance)
    else:
        doc: object = coco
        if fmt == "label-studio":
            doc = label_studio_tasks(coco, image_prefix=args.image_prefix, polygons=args.polygons,
                                     tolerance=args.tolerance)
        with fsspec.open(str(args.output), "w", **storage) as f:  # any fsspec URL (s3://...), like --input
            f.write(json.dumps(doc))
    print(f"wrote {args.output} ({fmt}): {len(coco['images'])} images, {len(coco['annotations'])} annotations"
          + (f"; {written} images to {images_dir}" if images_dir else ""))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the built-in model configs with their descriptions."""
    import ovsam

    names = ovsam.list_models()
    width = max(len(n) for n in names)
    for name in names:
        description = getattr(ovsam.load_config(name), "description", "")
        print(f"{name:<{width}}  {description}".rstrip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``jobs.demo`` with the parsed options."""
    from jobs import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from jobs import demo

    parser = argparse.ArgumentParser(
        prog="ovsam", description="Open-Vocabulary SAM: segment and name objects, from one image to a corpus.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks on error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    weights = sub.add_parser("weights", help="list or download the released weight files",
                             description="List the released weight files OV-SAM is assembled from, or download "
                                         "them from their official locations (or a mirror).")
    weights.set_defaults(func=cmd_weights)
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="{download}")
    dl = weights_sub.add_parser("download", help="download released files into a directory",
                                description="Download released files (names from `ovsam weights`); the file "
                                            "appears under its final name only when complete and verified.")
    dl.add_argument("names", nargs="+", metavar="NAME", help="released file name, e.g. sam_vit_h_4b8939.pth")
    dl.add_argument("--dest", type=Path, default=Path("weights"), help="target directory (default: weights)")
    dl.add_argument("--base-url", default=None,
                    help="mirror to download <base-url>/<NAME> from instead of the official location")
    dl.add_argument("--force", action="store_true", help="download again even if the file exists")
    dl.add_argument("--quiet", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_weights_download)

    conv = sub.add_parser("convert-official", help="convert the released OV-SAM files into one project checkpoint",
                          description="Assemble OpenAI CLIP RN50x16, the SAM ViT-H prompt encoder and the released "
                                      "SAM2CLIP and CLIP2SAM files into one project checkpoint for ovsam-rn50x16.")
    conv.add_argument("--clip", required=True, metavar="PATH_OR_TAG",
                      help="OpenAI CLIP RN50x16: the open_clip pretrained tag 'openai' or a path to RN50x16.pt")
    conv.add_argument("--sam", required=True, type=Path, metavar="PATH", help="sam_vit_h_4b8939.pth")
    conv.add_argument("--sam2clip", required=True, type=Path, metavar="PATH", help="sam2clip_vith_rn50x16.pth")
    conv.add_argument("--clip2sam", required=True, type=Path, metavar="PATH",
                      help="clip2sam_coco_rn50x16.pth or clip2sam_lvis_rn50x16.pth")
    conv.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="checkpoint file to write")
    conv.add_argument("--vocabulary", default=None,
                      help="built-in vocabulary name (e.g. coco, lvis) handed to the conversion")
    conv.add_argument("--roi-size", type=int, default=None,
                      help="head RoIAlign size (default 12; 7 with --vocabulary lvis, as published for LVIS)")
    conv.set_defaults(func=cmd_convert_official)

    from jobs import annotate

    ann = sub.add_parser("annotate", help="annotate WebDataset shards with OV-SAM on Ray, into Parquet",
                         description=annotate.__doc__.split("\n\n")[0])
    annotate.add_arguments(ann)
    ann.set_defaults(func=cmd_annotate)

    from jobs import predict

    prd = sub.add_parser("predict", help="segment and name objects in a few images, in one process (no Ray)",
                         description=predict.__doc__.split("\n\n")[0], epilog=predict.__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_arguments(prd)
    prd.set_defaults(func=cmd_predict)

    from jobs import serve

    srv = sub.add_parser("serve", help="segment and name interactively over HTTP (Ray Serve; browser page, "
                                       "Label Studio backend)",
                         description=serve.__doc__.split("\n\n")[0], epilog=serve.__doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    from jobs import pack

    pk = sub.add_parser("pack", help="pack COCO/LVIS, Objects365/V3Det, class folders, SA-1B or synthetic data "
                                     "into WebDataset training shards",
                        description=pack.__doc__.split("\n\n")[0])
    pack.add_arguments(pk)
    pk.set_defaults(func=cmd_pack)

    from jobs import distill

    dis = sub.add_parser("distill", help="distil SAM's image encoder into the SAM2CLIP neck on Ray Train",
                         description=distill.__doc__.split("\n\n")[0])
    distill.add_arguments(dis)
    dis.set_defaults(func=cmd_distill)

    from jobs import train

    trn = sub.add_parser("train", help="CLIP2SAM co-training on a mixture of packed datasets on Ray Train",
                         description=train.__doc__.split("\n\n")[0])
    train.add_arguments(trn)
    trn.set_defaults(func=cmd_train)

    from jobs import relabel

    rel = sub.add_parser("relabel", help="re-label a stored run with a new vocabulary, without the images",
                         description=relabel.__doc__.split("\n\n")[0])
    relabel.add_arguments(rel)
    rel.set_defaults(func=cmd_relabel)

    show = sub.add_parser("show", help="render annotated samples as PNG overlays",
                          description="Draw N committed images of an annotation output with their masks (lightened, "
                                      "outlined) and label captions, reading the pixels from the original shards.")
    show.add_argument("--input", required=True, help="annotation output URL")
    show.add_argument("--shards", action="append", default=None, metavar="URLS",
                      help="original shard URLs, glob or brace pattern (repeatable; default: the inputs recorded "
                           "in run.json and the manifests)")
    show.add_argument("-n", type=positive_int, default=8, help="number of images to render (default: 8)")
    show.add_argument("--output", type=Path, default=Path("overlays"),
                      help="directory for the PNGs (default: overlays)")
    show.add_argument("--html", action="store_true",
                      help="also write OUTPUT/index.html: one self-contained page of the images with each "
                           "instance's label and score, filterable by label and minimum score")
    add_storage_options(show)
    show.set_defaults(func=cmd_show)

    export_help = ("Write the committed shards of an annotation output as COCO instances JSON, loadable by "
                   "pycocotools.coco.COCO and importable by CVAT (\"COCO 1.0\"), FiftyOne and Label Studio's COCO "
                   "importer. file_name is the image file's path relative to its input, or <shard>/<key>.<ext> for "
                   "a tar sample; --images-dir writes the images there under those names.")
    for name in ("export", "export-coco"):
        exp = sub.add_parser(name, help="committed annotations -> COCO instances JSON" + (
                             " (alias of export --format coco)" if name == "export-coco" else ""),
                             description=export_help)
        if name == "export":
            exp.add_argument("--format", default="coco", choices=("coco", "cvat", "label-studio", "yolo-seg"),
                             help="coco: COCO instances JSON (RLE masks, or polygons with --polygons); cvat: COCO "
                                  "with polygons, for CVAT's \"COCO 1.0\" import; label-studio: tasks JSON with "
                                  "predictions (brush masks, or polygons with --polygons); yolo-seg: -o is a "
                                  "directory of labels/, images/ and data.yaml (default: coco)")
            exp.add_argument("--image-prefix", default="", metavar="URL",
                             help="label-studio: prepended to each file_name in the tasks' data.image (e.g. "
                                  "/data/local-files/?d=photos/ for local storage)")
        exp.add_argument("--input", required=True, help="annotation output URL")
        exp.add_argument("-o", "--output", required=True, help="JSON file to write (local path or any fsspec URL)")
        exp.add_argument("--images-dir", default=None, metavar="DIR",
                         help="also copy the annotated images to DIR/<file_name> (any fsspec URL): the original bytes, or "
                              "for an EXIF-rotated image its pixels upright in the masks' frame, the tag removed")
        exp.add_argument("--shards", action="append", default=None, metavar="URLS",
                         help="where the annotated inputs are now, for --images-dir (default: the inputs recorded "
                              "in run.json)")
        exp.add_argument("--polygons", action="store_true",
                         help="polygons (OpenCV outer contours of each part) instead of RLE masks; an empty mask "
                              "keeps its RLE")
        exp.add_argument("--tolerance", type=float, default=1.0, metavar="PX",
                         help="polygon simplification tolerance in pixels, 0 for none (default: 1)")
        add_storage_options(exp)
        exp.set_defaults(func=cmd_export)

    from jobs import eval as eval_job

    ev = sub.add_parser("eval", help="measure annotations: COCO AP against ground truth, or two runs' agreement",
                        description="Measure annotations. `ovsam eval coco`: COCO mask and box AP of an "
                                    "annotation output against a COCO instances JSON (all, base, novel, per class). "
                                    "`ovsam eval compare A B`: how far two runs of the same input agree.")
    eval_job.add_arguments(ev)

    models = sub.add_parser("models", help="list the built-in model configs")
    models.set_defaults(func=cmd_models)

    demo_parser = sub.add_parser("demo", help="run the demo (same as `python -m jobs.demo`)",
                                 description=demo.__doc__.split("\n\n")[0])
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=cmd_demo)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """``-v`` also after the subcommand (``ovsam annotate ... -v``); SUPPRESS keeps a -v given before it."""
    for parser in set(sub.choices.values()):
        if not any("-v" in a.option_strings for a in parser._actions):
            parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="log progress and show tracebacks on error")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit code.

    Usage errors exit through argparse with code 2; a command that fails with ``ValueError`` or ``OSError``
    prints ``ovsam COMMAND: error: ...`` to stderr and returns 1 (``-v`` re-raises it with the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `ovsam models | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0
    except UsageError as e:
        if args.verbose:
            raise
        print(f"ovsam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if args.verbose:
            raise
        print(f"ovsam {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
