"""Demo: segment and name three generated shapes from box prompts; write an overlay and the predictions.

Launch:

    make demo                                  # installs the project into .venv first
    python -m jobs.demo --output demo_out
    ovsam demo --output demo_out
    python -m jobs.demo --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors   # the published model

The scene is drawn here (a red square, a blue circle and a green triangle on a textured background) and each
shape's box is one prompt. The vocabulary is the three shape names. Outputs in ``--output``:

* ``image.png`` – the generated input image.
* ``overlay.png`` – the image with translucent masks, prompt boxes and "label score" captions.
* ``predictions.json`` – per prompt: prompt box, mask box, label index and name, label score, all class scores,
  mask quality, area and the mask as COCO RLE (``{"size": [H, W], "counts": str}``).

The default model, ``ovsam-tiny``, is randomly initialised: the run exercises the whole path on CPU in seconds, but
its masks and labels carry no meaning. Meaningful output needs ``ovsam-rn50x16`` with weights converted by
``ovsam convert-official``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHAPE_NAMES: tuple[str, ...] = ("red square", "blue circle", "green triangle")
_COLOURS = {"red square": (220, 40, 40), "blue circle": (40, 80, 225), "green triangle": (40, 190, 70)}
_MASK_COLOURS = ((255, 200, 0), (0, 230, 230), (240, 0, 240), (255, 255, 255))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (shared by ``python -m jobs.demo`` and ``ovsam demo``)."""
    parser.add_argument("--output", type=Path, default=Path("demo_out"),
                        help="directory for image.png, overlay.png and predictions.json (default: demo_out)")
    parser.add_argument("--model", default="ovsam-tiny",
                        help="model name from `ovsam models` (default: ovsam-tiny, random weights)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="project checkpoint to load into the model (e.g. from `ovsam convert-official`)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the scene and the random weights")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def make_scene(seed: int = 0, height: int = 384, width: int = 512) -> tuple[Any, Any, list[str]]:
    """Draw the demo scene.

    Returns ``(image, boxes_xyxy, names)``: ``image`` ``[H, W, 3]`` uint8 RGB; ``boxes_xyxy`` ``[3, 4]`` float32,
    each shape's box in pixels with a small margin, clipped to the image; ``names`` the shape of each box.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    stripes = 18.0 * np.sin(xx / 9.0 + yy / 23.0) + 10.0 * np.sin(yy / 5.0)
    noise = rng.normal(0.0, 9.0, size=(height, width, 3))
    base = np.array([120.0, 112.0, 98.0]) + stripes[..., None] + noise
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    s = min(height, width)
    square = (0.08 * width, 0.20 * height, 0.08 * width + 0.32 * s, 0.20 * height + 0.32 * s)
    cx, cy, r = 0.52 * width, 0.62 * height, 0.17 * s
    circle = (cx - r, cy - r, cx + r, cy + r)
    tri_pts = [(0.80 * width, 0.10 * height), (0.97 * width, 0.52 * height), (0.63 * width, 0.52 * height)]
    draw.rectangle(square, fill=_COLOURS["red square"])
    draw.ellipse(circle, fill=_COLOURS["blue circle"])
    draw.polygon(tri_pts, fill=_COLOURS["green triangle"])

    tri_box = (min(p[0] for p in tri_pts), min(p[1] for p in tri_pts),
               max(p[0] for p in tri_pts), max(p[1] for p in tri_pts))
    margin = 0.015 * s
    boxes = np.array([square, circle, tri_box], dtype=np.float32)
    boxes[:, :2] -= margin
    boxes[:, 2:] += margin
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return np.asarray(image), boxes, list(SHAPE_NAMES)


def render_overlay(image: Any, prompt_boxes: Any, masks: Any, captions: list[str], alpha: float = 0.45) -> Any:
    """The image (``[H, W, 3]`` uint8) with each mask blended in ``alpha``, its prompt box and a caption.

    Returns a ``PIL.Image``."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    out = np.asarray(image, dtype=np.float32).copy()
    for i, mask in enumerate(np.asarray(masks, dtype=bool)):
        colour = np.array(_MASK_COLOURS[i % len(_MASK_COLOURS)], dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    canvas = Image.fromarray(out.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    for i, (box, caption) in enumerate(zip(np.asarray(prompt_boxes).tolist(), captions, strict=True)):
        colour = _MASK_COLOURS[i % len(_MASK_COLOURS)]
        draw.rectangle(box, outline=colour, width=2)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        x, y = box[0], max(0.0, box[1] - (bottom - top) - 6)
        draw.rectangle((x, y, x + right - left + 6, y + bottom - top + 6), fill=(0, 0, 0))
        draw.text((x + 3 - left, y + 3 - top), caption, fill=colour, font=font)
    return canvas


def run(args: argparse.Namespace) -> int:
    """Build the model and vocabulary, predict for the scene's boxes, write the outputs, print a summary."""
    import numpy as np
    import torch
    from PIL import Image

    import ovsam
    from ovsam.masks import encode_rle

    torch.manual_seed(args.seed)
    model = ovsam.build_ovsam(args.model, checkpoint=args.checkpoint, device=args.device)
    vocabulary = ovsam.Vocabulary.from_names(list(SHAPE_NAMES), model, progress=False)
    image, boxes, truth = make_scene(args.seed)

    predictor = ovsam.OvsamPredictor(model, vocabulary)
    predictor.set_image(image)
    pred = predictor.predict(box=boxes)

    names = list(vocabulary.names)
    masks = np.asarray(pred.masks, dtype=bool)
    labels = np.asarray(pred.labels).astype(int)
    label_scores = np.asarray(pred.label_scores, dtype=np.float64)
    scores = label_scores[np.arange(len(labels)), labels]
    iou_scores = np.asarray(pred.iou_scores, dtype=np.float64)
    rles = encode_rle(masks)

    instances = []
    for i in range(len(labels)):
        instances.append({
            "prompt_box_xyxy": [round(float(v), 2) for v in boxes[i]],
            "drawn_shape": truth[i],
            "box_xyxy": [round(float(v), 2) for v in np.asarray(pred.boxes_xyxy[i])],
            "label": int(labels[i]),
            "label_name": names[labels[i]],
            "label_score": float(scores[i]),
            "label_scores": [float(v) for v in label_scores[i]],
            "iou_score": float(iou_scores[i]),
            "area": int(masks[i].sum()),
            "mask_rle": rles[i],
        })
    record = {
        "model": args.model,
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "seed": args.seed,
        "image": {"file": "image.png", "height": int(image.shape[0]), "width": int(image.shape[1])},
        "vocabulary": names,
        "instances": instances,
    }

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out_dir / "image.png")
    captions = [f"{names[labels[i]]} {scores[i]:.2f}" for i in range(len(labels))]
    render_overlay(image, boxes, masks, captions).save(out_dir / "overlay.png")
    (out_dir / "predictions.json").write_text(json.dumps(record, indent=2) + "\n")

    print(f"ovsam demo: model {args.model}, {len(boxes)} box prompts on a {image.shape[1]}x{image.shape[0]} image")
    for inst in instances:
        print(f"  {inst['drawn_shape']:<15} -> {inst['label_name']:<15} score {inst['label_score']:.2f}  "
              f"mask {inst['area']} px  quality {inst['iou_score']:.2f}")
    if args.checkpoint is None:
        print(f"  (no --checkpoint: {args.model} is randomly initialised, so these labels and masks mean nothing)")
    print(f"wrote {out_dir / 'overlay.png'}, {out_dir / 'predictions.json'}, {out_dir / 'image.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
