"""``ovsam eval``: measure annotations.

    ovsam eval coco --gt instances_val2017.json --pred out/            # mask and box AP, all / base / novel
    ovsam eval coco --gt gt.json --pred out/ --vocabulary coco --json ap.json
    ovsam eval coco --gt gt.json --pred out/ --label-source detector   # the detector's labels on OV-SAM's masks
    ovsam eval compare out_fp32/ out_bf16/                             # how far two runs of one input agree
    ovsam eval prompts --checkpoint ovsam_coco.safetensors --vocabulary coco \
        --gt instances_val2017.json --images val2017/ --output eval_out/   # the paper's box and point protocol

``eval coco`` scores an annotation job's output against COCO-format ground truth with pycocotools' ``COCOeval``
(``pipeline/evaluation/coco.py`` says how images and categories are matched). ``--label-source`` picks whose labels
are scored on the output's masks: ``ovsam`` (default) OV-SAM's own ``label_name``/``label_score``; ``detector`` the
``detector_label``/``detector_score`` of the detector that made each prompt (instances without one are skipped and
counted; an output with none at all is a usage error). It prints a table and with ``--json`` writes the whole
report, with the label source. ``eval compare`` pairs the instances of two runs of the same input by image and prompt
(``pipeline/evaluation/compare.py``) and reports label agreement, mask IoU and the score shift. ``eval prompts`` runs
the paper's interactive protocol (every ground-truth instance prompted by its box or centre point; mask IoU and
top-1 accuracy, all / base / novel) on Ray actors, resumable (``pipeline/evaluation/prompts.py``). Exit codes: 0 success, 1 a failed evaluation (the message says why), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json

from jobs.args import (UsageError, add_storage_options, check_output_shards, float_in, non_negative_int,
                       positive_int, storage_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{coco,compare,prompts}")
    coco = sub.add_parser(
        "coco", help="COCO mask and box AP of an annotation output against ground truth",
        description="COCO mask (segm) and box AP of an annotation output against a COCO instances JSON, with "
                    "pycocotools' COCOeval: all, base and novel categories (the vocabulary's split; OV-COCO reports "
                    "novel AP50) and a per-class table. Images are matched by file name (the image's path "
                    "relative to the annotated input, or its tar member name), categories by name and synonyms.")
    coco.add_argument("--gt", required=True, metavar="URL", help="ground truth: a COCO instances JSON (any fsspec URL)")
    coco.add_argument("--pred", required=True, metavar="OUT", help="the output of `ovsam annotate` or `ovsam relabel`")
    coco.add_argument("--vocabulary", default=None, metavar="SPEC",
                      help="take the classes' synonyms and base/novel split from this vocabulary (built-in name, "
                           "class list, classes.json or saved vocabulary) instead of the run's own record")
    coco.add_argument("--label-source", default="ovsam", choices=("ovsam", "detector"),
                      help="whose labels are scored on the output's masks: ovsam (default) OV-SAM's own "
                           "(label_name, score label_score); detector the detector's that made each prompt "
                           "(detector_label, a class of the run's vocabulary, score detector_score), for comparing "
                           "OV-SAM's recognition with the detector's on the same masks. With detector, instances "
                           "without a detector label are skipped and counted; none at all is an error")
    coco.add_argument("--iou-types", default="segm,bbox", metavar="TYPES",
                      help="comma-separated: segm, bbox (default: segm,bbox)")
    coco.add_argument("--per-class", type=positive_int, default=20, metavar="N",
                      help="rows of the per-class table printed, worst AP first (default: 20; all are in --json)")
    _report_arguments(coco, "the AP table, per-class AP bars and the worst ground-truth instances (lowest IoU, "
                            "confident wrong categories), ground truth beside prediction")
    _json_and_storage(coco, cmd_eval_coco, "report")

    cmp = sub.add_parser(
        "compare", help="how far two annotation runs of the same input agree",
        description="Pair the instances of two annotation outputs of the same input (by shard, image and prompt, "
                    "then by mask IoU) and report label agreement, the distribution of mask IoU, the shift of "
                    "label_score (B - A) and the worst pairs: for precision, model and version regressions.")
    cmp.add_argument("a", metavar="A", help="the first annotation output (the reference)")
    cmp.add_argument("b", metavar="B", help="the second annotation output")
    cmp.add_argument("--min-iou", type=float_in(0.0, 1.0, low_open=True), default=0.5, metavar="IOU",
                     help="instances whose prompts differ are paired by mask IoU down to this (default: 0.5)")
    cmp.add_argument("--worst", type=positive_int, default=10, metavar="N",
                     help="pairs listed with the lowest IoU and with changed labels (default: 10; 100 in --json)")
    _report_arguments(cmp, "the agreement table, the IoU histogram and the pairs with the lowest IoU and with "
                           "changed labels, A beside B")
    _json_and_storage(cmp, cmd_eval_compare, "report")

    pr = sub.add_parser(
        "prompts", help="the paper's interactive protocol: box and point prompts per GT instance, IoU and accuracy",
        description="OV-SAM's open-vocabulary interactive segmentation protocol (OVSAM_SPEC §5): every ground-truth "
                    "instance is one prompt, its GT box or its centre point (the mask pixel farthest from the "
                    "background, by kornia's distance transform in the model's input frame, as published); mask IoU and top-1 accuracy are micro-averaged over all, base and novel instances. "
                    "The set is split into units (a packed shard, or --images-per-unit COCO images) evaluated on "
                    "Ray actors; a killed evaluation resumes with the units left.")
    data = pr.add_argument_group("evaluation set (one of)")
    data.add_argument("--shards", action="append", default=None, metavar="URLS",
                      help="packed shards (`ovsam pack`; a root with _index.json or a glob; repeatable); the "
                           "vocabulary defaults to their classes.json")
    data.add_argument("--gt", default=None, metavar="URL", help="a COCO instances JSON (any fsspec URL)")
    data.add_argument("--images", default=None, metavar="DIR",
                      help="with --gt: the directory its file_name entries are relative to (any fsspec URL)")
    pr.add_argument("--output", required=True, metavar="URL", help="where unit results and summary.json go")
    pr.add_argument("--model", default="ovsam-tiny", help="model name or config JSON (default: ovsam-tiny)")
    pr.add_argument("--checkpoint", default=None, help="weights (the project's single-file format)")
    pr.add_argument("--vocabulary", default=None, metavar="SPEC",
                    help="built-in name (coco, lvis), class list, classes.json or saved vocabulary; needed with "
                         "--gt (categories are matched to its classes by name and synonyms)")
    pr.add_argument("--prompt", default="box,point", metavar="TYPES",
                    help="comma-separated prompt types: box, point (default: box,point, both in one run)")
    pr.add_argument("--published-point-boxes", action="store_true",
                    help="reproduce the released point-prompt evaluation for parity: its frozen-CLIP branch pooled "
                         "the GT boxes in original-image coordinates as if they were in the 1024 frame (OVSAM_SPEC "
                         "§6 item 3; oracle boxes in point mode). Off by default: the mask's box is pooled")
    pr.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                    help="compute precision (default: fp32)")
    pr.add_argument("--batch-size", type=positive_int, default=4, help="images per model call (default: 4)")
    pr.add_argument("--images-per-unit", type=positive_int, default=200,
                    help="with --gt: images per unit of work and of resume (default: 200)")
    pr.add_argument("--limit", type=positive_int, default=None, metavar="N",
                    help="with --gt: only the first N images by id")
    pr.add_argument("--workers", type=non_negative_int, default=None,
                    help="Ray actors (default: as many as fit; 0 runs in this process without Ray)")
    pr.add_argument("--num-gpus-per-worker", type=float_in(0.0), default=None, metavar="G",
                    help="GPUs per actor (default: 1 where the cluster has GPUs, else 0)")
    pr.add_argument("--cpus-per-worker", type=float_in(0.0, low_open=True), default=None, metavar="C",
                    help="CPUs per actor (default: a share of a GPU node's CPUs, or 1)")
    pr.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    pr.add_argument("--overwrite", action="store_true",
                    help="discard an evaluation with another configuration in --output and start over")
    pr.add_argument("--report", default=None, metavar="DIR",
                    help="also write DIR/index.html, one self-contained page: the summary, per-class bars and the "
                         "worst instances (lowest IoU, most confident wrong labels), ground truth beside prediction")
    _json_and_storage(pr, cmd_eval_prompts, "summary")


def _report_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--report", default=None, metavar="DIR",
                        help=f"also write DIR/index.html, one self-contained page: {what}")
    parser.add_argument("--shards", action="append", default=None, metavar="URLS",
                        help="where the annotated inputs are now, for --report's pictures (default: the inputs "
                             "recorded in run.json)")


def _json_and_storage(parser: argparse.ArgumentParser, func, what: str) -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help=f"also write the {what} as JSON (any fsspec URL)")
    add_storage_options(parser)
    parser.set_defaults(func=func)


def _iou_types(text: str) -> tuple[str, ...]:
    from pipeline.evaluation.coco import IOU_TYPES

    types = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in types if t not in IOU_TYPES]
    if not types or bad:
        raise UsageError(f"--iou-types: expected a comma-separated subset of {', '.join(IOU_TYPES)}, got {text!r}")
    return types


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import fsspec

    from pipeline.evaluation.coco import NoDetectorLabels, eval_coco, format_report

    types = _iou_types(args.iou_types)
    storage = storage_options(args.storage_options)
    fs, root = fsspec.core.url_to_fs(args.pred, **storage)
    if not fs.exists(f"{root.rstrip('/')}/run.json"):
        raise UsageError(f"--pred {args.pred} is not the output of `ovsam annotate` (no run.json)")
    check_output_shards("--shards", args.shards, args.pred, storage)
    try:
        report = eval_coco(args.pred, args.gt, vocabulary=args.vocabulary, iou_types=types, storage_options=storage,
                           label_source=args.label_source)
    except NoDetectorLabels as e:
        raise UsageError(str(e)) from None
    print(format_report(report, per_class=args.per_class))
    if args.report:
        from pipeline.evaluation.report import write_coco_report

        labels = "" if args.label_source == "ovsam" else ", the detector's labels"
        page = write_coco_report(report, args.report, args.pred, shards=args.shards, storage_options=storage,
                                 title=f"ovsam eval coco: {args.pred} against {args.gt}{labels}")
        print(f"wrote {page}")
    if args.json:
        with fsspec.open(args.json, "w", **storage) as f:
            json.dump({"gt": args.gt, "pred": args.pred, "label_source": args.label_source, **report}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    import fsspec

    from pipeline.evaluation.compare import compare_outputs, format_compare

    storage = storage_options(args.storage_options)
    for flag, url in (("A", args.a), ("B", args.b)):
        fs, root = fsspec.core.url_to_fs(url, **storage)
        if not fs.exists(f"{root.rstrip('/')}/run.json"):
            raise UsageError(f"{flag} {url} is not the output of `ovsam annotate` (no run.json)")
    check_output_shards("--shards", args.shards, args.a, storage)
    report = compare_outputs(args.a, args.b, min_iou=args.min_iou, worst=max(100, args.worst),
                             storage_options=storage)
    print(format_compare(report, rows=args.worst))
    if args.report:
        from pipeline.evaluation.report import write_compare_report

        page = write_compare_report(report, args.report, shards=args.shards, storage_options=storage,
                                    title=f"ovsam eval compare: {args.a} and {args.b}")
        print(f"wrote {page}")
    if args.json:
        with fsspec.open(args.json, "w", **storage) as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_prompts(args: argparse.Namespace) -> int:
    import fsspec

    from pipeline.evaluation.prompts import PROMPTS, EvalPromptsConfig, format_summary, plan_units, run_eval_prompts

    prompts = tuple(t.strip() for t in args.prompt.split(",") if t.strip())
    if not prompts or any(p not in PROMPTS for p in prompts) or len(set(prompts)) != len(prompts):
        raise UsageError(f"--prompt: expected a comma-separated subset of {', '.join(PROMPTS)}, got {args.prompt!r}")
    if bool(args.shards) == bool(args.gt):
        raise UsageError("give the evaluation set as --shards URLS, or as --gt instances.json with --images DIR")
    if args.gt and not args.images:
        raise UsageError("--gt needs --images DIR (the directory its file_name entries are relative to)")
    if args.gt and not args.vocabulary:
        raise UsageError("--gt needs --vocabulary (e.g. coco or lvis, or a class list naming its categories)")
    if args.shards and (args.images or args.limit or args.images_per_unit != 200):
        raise UsageError("--images, --limit and --images-per-unit go with --gt; a packed shard is one unit")
    storage = storage_options(args.storage_options)
    cfg = EvalPromptsConfig(
        output=args.output, model=args.model, checkpoint=args.checkpoint, vocabulary=args.vocabulary,
        shards=tuple(args.shards or ()), gt=args.gt, images=args.images, prompts=prompts,
        published_point_boxes=args.published_point_boxes,
        images_per_unit=args.images_per_unit, limit=args.limit, batch_size=args.batch_size,
        precision=args.precision, workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, ray_address=args.ray_address, storage_options=storage)
    units = None
    if cfg.shards:  # listed here, so that shards that are not there are a usage error found before any output
        try:
            units = plan_units(cfg)
        except (ValueError, FileNotFoundError) as e:
            text = str(e) if "--shards" in str(e) else f"--shards: {e}"
            raise UsageError(text) from None
    summary = run_eval_prompts(cfg, overwrite=args.overwrite, units=units)
    print(format_summary(summary))
    if args.report:
        from pipeline.evaluation.report import write_report

        page = write_report(summary, args.report, images=args.images, storage_options=storage,
                            title=f"ovsam eval prompts: {args.gt or ', '.join(args.shards)}")
        print(f"wrote {page}")
    if args.json:
        with fsspec.open(args.json, "w", **storage) as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.json}")
    return 0
