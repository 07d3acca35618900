"""Loading a transformers detector from ``--detector-weights`` and the steps every detector shares after its
model: boxes to original pixels, clipping, the score threshold, class-agnostic NMS and the cap."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.annotate.detectors.spec import OPEN_VOCAB_DETECTORS, DetectorOptions

#: ``model_type`` -> the transformers class of its detection model
MODEL_CLASSES = {
    "owlv2": "Owlv2ForObjectDetection",
    "owlvit": "OwlViTForObjectDetection",
    "grounding-dino": "GroundingDinoForObjectDetection",
    "mm-grounding-dino": "MMGroundingDinoForObjectDetection",
}

INSTALL_HINT = "the open-vocabulary detectors need transformers: pip install 'ovsam[detectors]'"


def is_hub_id(weights: str) -> bool:
    """``org/name`` (a Hugging Face model id) rather than a local path."""
    text = str(weights)
    return (text.count("/") == 1 and not text.startswith((".", "/", "~")) and "://" not in text
            and not os.path.exists(text))


def read_model_type(name: str, weights: str | Path | None) -> str:
    """Check ``--detector-weights`` for ``name`` without building anything: a local directory written by
    ``save_pretrained`` whose ``config.json`` names ``name``'s model type, or a Hugging Face id. Raises
    ``FileNotFoundError`` for a missing path and ``ValueError`` for a directory of another model type."""
    expected = OPEN_VOCAB_DETECTORS[name][0]
    if weights is None or str(weights) == "":
        raise ValueError(f"detector {name!r} needs --detector-weights: a directory written by save_pretrained "
                         "or a Hugging Face model id")
    if is_hub_id(str(weights)):
        return expected  # checked when loaded
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--detector-weights {weights}: no such directory")
    if not path.is_dir():
        raise ValueError(f"--detector-weights {weights} is a file; {name} needs a directory written by "
                         "save_pretrained (config.json, model weights, processor files)")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"--detector-weights {weights} has no config.json; it is not a save_pretrained directory")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"--detector-weights {weights}: config.json is unreadable ({e})") from None
    if model_type != expected:
        raise ValueError(f"--detector-weights {weights} holds a {model_type!r} model, not {expected!r} "
                         f"(as detector:{name} needs)")
    return expected


def load_pretrained(name: str, weights: str | Path, device: str) -> tuple[Any, Any]:
    """``(model, processor)`` of ``name`` from ``weights``, in eval mode on ``device``."""
    model_type = read_model_type(name, weights)
    try:
        import transformers
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    transformers.utils.logging.disable_progress_bar()  # a bar per load would fill every worker's log
    cls = getattr(transformers, MODEL_CLASSES[model_type])
    model = cls.from_pretrained(str(weights))
    if getattr(model.config, "model_type", None) != model_type:
        raise ValueError(f"--detector-weights {weights} holds a {model.config.model_type!r} model, "
                         f"not {model_type!r}")
    processor = transformers.AutoProcessor.from_pretrained(str(weights))
    return model.eval().to(device), processor


def weights_fingerprint(weights: str | Path | None) -> str | None:
    """sha256 over a weights file, or over a directory's files (relative names and bytes); a hub id as given."""
    if weights is None:
        return None
    if is_hub_id(str(weights)):
        return f"hub:{weights}"
    path = Path(weights).expanduser()
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def writable(images: list[np.ndarray]) -> list[np.ndarray]:
    """The images, each copied if read-only (decoded buffers may be): processors hand them to ``torch.from_numpy``,
    which warns on read-only arrays."""
    return [im if im.flags.writeable else im.copy() for im in images]


_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device: Any, precision: str) -> Any:
    """``torch.autocast`` for the device's type at ``precision`` (``fp32``: no autocast)."""
    import torch

    if precision not in _DTYPES:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=getattr(torch, _DTYPES[precision]))


def finish_boxes(boxes: Any, scores: Any, labels: list[str | None] | None, width: int, height: int,
                 options: DetectorOptions, *, strict: bool = True) -> tuple[np.ndarray, list[float], list]:
    """One image's candidates (``boxes`` ``[N, 4]`` xyxy in original pixels, ``scores`` ``[N]``, optional labels)
    -> clipped to the image, scores above the threshold (``>`` when ``strict``, else ``>=``), zero-area boxes
    dropped, class-agnostic NMS unless ``nms_thresh`` is 1.0, the best ``max_detections`` by score."""
    import torch
    import torchvision

    boxes = torch.as_tensor(boxes).detach().float().cpu()
    scores = torch.as_tensor(scores).detach().float().cpu()
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1) if len(boxes) else \
        boxes.reshape(0, 4)
    keep = (scores > options.score_thresh) if strict else (scores >= options.score_thresh)
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    idx = torch.nonzero(keep).flatten()
    if options.nms_thresh < 1.0 and len(idx):
        order = torchvision.ops.nms(boxes[idx], scores[idx], float(options.nms_thresh))
    else:
        order = torch.sort(scores[idx], descending=True, stable=True).indices
    idx = idx[order][: options.max_detections]
    chosen = idx.tolist()
    return (boxes[idx].double().numpy().reshape(-1, 4), [float(scores[i]) for i in chosen],
            [None] * len(chosen) if labels is None else [labels[i] for i in chosen])
