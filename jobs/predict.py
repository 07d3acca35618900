"""``ovsam predict``: segment and name objects in a few images, in one process (no Ray), for one-off use and scripts.

    ovsam predict photo.jpg --box 40,30,200,180 --box 220,40,380,200 -o pred/
    ovsam predict photo.jpg --point 120,90 --point 300,40,0 -o -          # JSON on stdout
    ovsam predict a.jpg b.png --everything --points-per-side 16 -o pred/ --model ovsam-tiny \\
        --checkpoint demo_out/model/ovsam-tiny-synthetic.safetensors \\
        --vocabulary demo_out/model/ovsam-tiny-synthetic.synthetic.vocab.safetensors
    ovsam predict street.jpg --text "traffic cone,pastry" --detector owlv2 --detector-weights owlv2-base/ -o -

Prompts are in original-image pixels. Each ``--box`` is one instance; ``--point X,Y[,LABEL]`` (LABEL 1, the
default, for foreground, 0 for background) adds a click to every box's prompt, or, without boxes, all points form
one prompt. ``--everything`` prompts a point grid instead (``ovsam.OvsamMaskGenerator``). ``--text`` names classes
instead: an open-vocabulary detector (``--detector``, default owlv2) finds them, each of its boxes is a box prompt,
and OV-SAM names every mask among the same classes (the detector's own label and score are kept beside). Per
image, ``-o DIR`` gets ``<stem>.json`` (the instances: COCO RLE mask, box, area, quality, label, score, top-k) and
``<stem>.png`` (the overlay); ``-o -`` prints one JSON document with every image to stdout instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.args import (UsageError, add_detector_arguments, add_grid_arguments, add_model_arguments,
                       check_ovsam_model, positive_int)


def _numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def box_arg(text: str) -> list[float]:
    x0, y0, x1, y1 = _numbers(text, (4,), "X0,Y0,X1,Y1 (four numbers)")
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"needs X1 > X0 and Y1 > Y0, got {text!r}")
    return [x0, y0, x1, y1]


def point_arg(text: str) -> list[float]:
    values = _numbers(text, (2, 3), "X,Y or X,Y,LABEL")
    if len(values) == 2:
        values.append(1.0)
    if values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"LABEL must be 1 (foreground) or 0 (background), got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or fsspec URLs)")
    p.add_argument("--box", action="append", type=box_arg, default=[], metavar="X0,Y0,X1,Y1",
                   help="a box prompt in original pixels; each box is one instance (repeatable)")
    p.add_argument("--point", action="append", type=point_arg, default=[], metavar="X,Y[,LABEL]",
                   help="a click (LABEL 1 foreground, the default, or 0 background), added to every box's prompt, "
                        "or, without boxes, all clicks form one prompt (repeatable)")
    p.add_argument("--everything", action="store_true", help="prompt a point grid and keep the stable masks")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for <stem>.json and <stem>.png per image, or - for JSON on stdout")
    add_model_arguments(p, "the labels' vocabulary")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--top-k", type=positive_int, default=5, help="alternative labels per instance (default: 5)")
    p.add_argument("--max-pixels", type=positive_int, default=64 * 1024 * 1024,
                   help="larger images are refused (default: 67108864)")
    add_grid_arguments(p.add_argument_group("--everything"))
    from pipeline.annotate.detectors.spec import OPEN_VOCAB_DETECTORS

    t = p.add_argument_group("--text", "find every instance of typed classes: an open-vocabulary detector's boxes "
                                       "are OV-SAM's box prompts, and OV-SAM names each mask among the same classes")
    t.add_argument("--text", default=None, metavar="CLASSES",
                   help="comma-separated class names, e.g. 'traffic cone,pastry': the detector's queries and the "
                        "labels' vocabulary (instead of --vocabulary)")
    t.add_argument("--detector", default=None, choices=list(OPEN_VOCAB_DETECTORS),
                   help="the open-vocabulary detector --detector-weights holds (default: owlv2)")
    add_detector_arguments(t)
    # None tells an explicit --vocabulary (refused with --text) from the default, coco
    p.set_defaults(vocabulary=None)


#: --text's detector when --detector is not given
DEFAULT_DETECTOR = "owlv2"
#: the detector options that mean nothing without --text (the others have non-None defaults)
_DETECTOR_FLAGS = (("detector", "--detector"), ("detector_weights", "--detector-weights"),
                   ("detector_score_thresh", "--detector-score-thresh"),
                   ("detector_nms_thresh", "--detector-nms-thresh"), ("detector_template", "--detector-template"))


def _prompts(args: argparse.Namespace) -> dict[str, Any]:
    """The predictor's keyword prompts for every image, from ``--box`` and ``--point``."""
    import numpy as np

    if args.text is not None:
        if args.box or args.point or args.everything:
            raise UsageError("--text finds its own boxes; leave out --box, --point and --everything")
        return {}
    given = [flag for name, flag in _DETECTOR_FLAGS if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only work with --text CLASSES")
    if args.everything:
        if args.box or args.point:
            raise UsageError("--everything prompts a point grid; leave out --box and --point")
        return {}
    if not args.box and not args.point:
        raise UsageError("give a prompt: --box X0,Y0,X1,Y1, --point X,Y[,LABEL] or --everything")
    out: dict[str, Any] = {}
    n = max(1, len(args.box))
    if args.box:
        out["box"] = np.asarray(args.box, dtype=float)
    if args.point:
        pts = np.asarray(args.point, dtype=float)
        out["point_coords"] = np.repeat(pts[None, :, :2], n, axis=0)
        out["point_labels"] = np.repeat(pts[None, :, 2], n, axis=0)
    if not args.box:  # one prompt of all the points: the single-prompt shapes
        out["point_coords"] = out["point_coords"][0]
        out["point_labels"] = out["point_labels"][0]
    return out


@dataclass(frozen=True)
class TextPrompt:
    """What ``--text`` resolved to, all of it checked before anything is built: the detector (``source``), its
    weights and options, and the typed classes as its queries (``queries.names`` are the classes)."""

    source: Any
    weights: str
    options: Any
    queries: Any

    @property
    def names(self) -> list[str]:
        return list(self.queries.names)


def text_prompt(args: argparse.Namespace) -> TextPrompt | None:
    """``--text`` and its detector options, checked (weights there and of the detector's type, a class to query,
    a valid template); None without ``--text``. Raises :class:`UsageError`."""
    if args.text is None:
        return None
    from pipeline.annotate.detectors.build import check_source
    from pipeline.annotate.detectors.queries import TextQueries
    from pipeline.annotate.detectors.spec import parse_prompt_source, resolve_options

    if args.vocabulary is not None:
        raise UsageError("--text is the labels' vocabulary too; leave out --vocabulary")
    name = args.detector or DEFAULT_DETECTOR
    source = parse_prompt_source(f"detector:{name}")
    try:
        options = resolve_options(source, score_thresh=args.detector_score_thresh,
                                  nms_thresh=args.detector_nms_thresh, max_detections=args.max_detections,
                                  template=args.detector_template, batch_size=args.detector_batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        queries = TextQueries.from_text(args.text, template=options.template)
    except ValueError:
        raise UsageError(f"--text {args.text!r}: no class names; give comma-separated names, e.g. "
                         "'traffic cone,pastry'") from None
    if not args.detector_weights:
        raise UsageError(f"--text needs --detector-weights: the {name} detector's save_pretrained directory")
    try:
        check_source(source, args.detector_weights, names=list(queries.names), options=options)
    except FileNotFoundError:
        raise UsageError(f"--detector-weights {args.detector_weights}: no such directory") from None
    except ValueError as e:
        raise UsageError(f"--detector {name}: {e}") from None
    return TextPrompt(source, args.detector_weights, options, queries)


def read_image(url: str, max_pixels: int) -> Any:
    """An image file (any fsspec URL) -> ``HxWx3`` uint8 RGB, decoded as the annotation job does."""
    import fsspec

    from pipeline.inputs.decode import ImageDecodeError, decode_image

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"IMAGE {url}: no such file") from None
    try:
        image, _, _ = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ValueError(f"IMAGE {url}: {e}") from None
    return image


def _instances(pred: Any, names: list[str] | None, top_k: int, prompts: list[dict]) -> list[dict[str, Any]]:
    """``Prediction`` -> instance dicts: ``Prediction.to_records`` (the overlay's row layout) plus each prompt and
    its top-k ``[name, score]``."""
    import numpy as np

    out = []
    for i, rec in enumerate(pred.to_records()):
        inst = {"prompt": prompts[i], **rec}
        if pred.labels is not None:
            order = np.argsort(-np.asarray(pred.label_scores[i], dtype=np.float64), kind="stable")[:top_k]
            inst["topk"] = [[names[int(k)], float(pred.label_scores[i, int(k)])] for k in order]
        out.append(inst)
    return out


def _everything_instances(records: list[dict], names: list[str] | None, top_k: int) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        x, y = rec["point_coords"][0]
        inst: dict[str, Any] = {"prompt": {"points": [[float(x), float(y), 1]]}, "mask_rle": rec["segmentation"],
                                "area": rec["area"], "box_xyxy": [float(v) for v in rec["box_xyxy"]],
                                "quality": rec["stability_score"]}
        if "label" in rec:
            inst.update(label=rec["label"], label_name=rec["label_name"], label_score=rec["label_score"],
                        background_score=rec["background_score"], topk=[[names[k], float(s)] for k, s in zip(rec["top_labels"][:top_k],
                                                                  rec["top_scores"][:top_k])])
        out.append(inst)
    return out


def _detected_instances(predictor: Any, found: Any, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """The detector's boxes of one image as box prompts (one instance each, in the detector's order): the instance
    dicts of box prompts plus the detector's ``detector_label`` and ``detector_score``."""
    if len(found.boxes) == 0:
        return []
    pred = predictor.predict(box=found.boxes)
    prompts = [{"box": [float(v) for v in box]} for box in found.boxes]
    out = _instances(pred, names, top_k, prompts)
    for inst, label, score in zip(out, found.labels, found.scores):
        inst["detector_label"] = label
        inst["detector_score"] = float(score)
    return out


def _stem(url: str, seen: dict[str, int]) -> str:
    stem = Path(url.rstrip("/").rsplit("/", 1)[-1]).stem or "image"
    count = seen.get(stem, 0)
    seen[stem] = count + 1
    return stem if count == 0 else f"{stem}-{count}"


def run(args: argparse.Namespace) -> int:
    prompts = _prompts(args)  # usage errors before anything is built
    to_stdout = args.output == "-"
    out_dir = None if to_stdout else Path(args.output)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output {out_dir} is a file; pass a directory or -")
    check_ovsam_model(args.model, args.checkpoint)
    text = text_prompt(args)
    vocabulary_spec = args.vocabulary or "coco"
    import torch

    import ovsam
    from ovsam.automatic import OvsamMaskGenerator
    from pipeline.export.overlay import render_overlay

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ovsam.build_ovsam(args.model, checkpoint=args.checkpoint, device=device, precision=args.precision)
    if text is None:
        vocabulary = ovsam.Vocabulary.resolve(vocabulary_spec, model, progress=False)
    else:
        vocabulary = ovsam.Vocabulary.from_names(text.names, model, progress=False)
    trained = args.checkpoint is not None
    if not trained:
        print(f"ovsam predict: WARNING: no --checkpoint: {args.model}'s neck and head are randomly initialised, so "
              "its masks and labels mean nothing", file=sys.stderr)
    predictor = ovsam.OvsamPredictor(model, vocabulary)
    generator = None
    if args.everything:
        generator = OvsamMaskGenerator(model, vocabulary, points_per_side=args.points_per_side,
                                       pred_iou_thresh=args.pred_iou_thresh,
                                       stability_score_thresh=args.stability_score_thresh,
                                       box_nms_thresh=args.box_nms_thresh, min_mask_area=args.min_mask_area,
                                       top_k=args.top_k, output_mode="coco_rle")
    pixels, detected = {}, None
    if text is not None:  # every image through the detector first, --detector-batch-size at a time
        from ovsam.precision import model_precision
        from pipeline.annotate.detectors.build import build_proposer

        pixels = {i: read_image(url, args.max_pixels) for i, url in enumerate(args.images)}
        detector = build_proposer(text.source, text.weights, options=text.options, vocabulary=vocabulary,
                                  device=device, precision=model_precision(model))
        detected = detector.detect(list(pixels.values()), text.queries, options=text.options)
    documents, seen = [], {}
    for i, url in enumerate(args.images):
        image = pixels.pop(i) if i in pixels else read_image(url, args.max_pixels)
        h, w = image.shape[:2]
        if generator is not None:
            instances = _everything_instances(generator.generate(image), vocabulary.names, args.top_k)
        elif detected is not None:
            if len(detected[i].boxes):
                predictor.set_image(image)
            instances = _detected_instances(predictor, detected[i], vocabulary.names, args.top_k)
            if not instances:
                print(f"ovsam predict: {url}: nothing scored above --detector-score-thresh "
                      f"{text.options.score_thresh:g} for {', '.join(text.names)}", file=sys.stderr)
        else:
            predictor.set_image(image)
            try:
                pred = predictor.predict(**prompts)
            except ValueError as e:
                raise UsageError(f"--box/--point for {url} ({w}x{h}): {e}") from None
            instances = _instances(pred, vocabulary.names, args.top_k, _prompt_records(args, len(pred)))
        doc = {"image": url, "width": w, "height": h, "model": args.model, "checkpoint": args.checkpoint,
               "trained": trained, "precision": model.precision,
               "vocabulary": vocabulary_spec if text is None else text.names, "instances": instances}
        if text is not None:
            o = text.options
            doc["detector"] = {"name": text.source.name, "weights": text.weights, "score_thresh": o.score_thresh,
                               "nms_thresh": o.nms_thresh, "max_detections": o.max_detections,
                               "template": o.template}
        if out_dir is None:
            documents.append(doc)
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = _stem(url, seen)
        (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
        render_overlay(image, instances).save(out_dir / f"{stem}.png")
        print(f"{url}: {len(instances)} instance(s) -> {out_dir / stem}.json, .png")
    if to_stdout:
        json.dump(documents if len(documents) != 1 else documents[0], sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def _prompt_records(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    points = [[p[0], p[1], int(p[2])] for p in args.point]
    if args.box:
        return [{"box": box, **({"points": points} if points else {})} for box in args.box]
    return [{"points": points}] * n


__all__ = ["TextPrompt", "add_arguments", "box_arg", "point_arg", "read_image", "run", "text_prompt"]
