"""Box proposals for the annotation job: the sample's own sidecar boxes, a torchvision detector, or the whole
image. Open-vocabulary detectors and class-agnostic proposals are in ``pipeline/annotate/detectors/``; point-grid
"everything" mode is run by the model stage through ``ovsam.OvsamMaskGenerator``.

Plain callables: no Ray here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ``--prompts`` is parsed beside the sources it names (pipeline/annotate/detectors/spec.py)
from pipeline.annotate.detectors.spec import PROMPT_MODES, parse_prompt_mode  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class Proposals:
    """Prompts for one image in original pixels. ``boxes`` ``[N, 4]`` xyxy; ``points`` ``[M, 2]`` single clicks;
    ``scores``/``labels`` are the detector's (or the sidecar's) own, aligned with ``boxes``."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float64))
    scores: list[float | None] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0] + self.points.shape[0])


def whole_image(width: int, height: int) -> Proposals:
    return Proposals(boxes=np.array([[0.0, 0.0, float(width), float(height)]]), scores=[None], labels=[None])


class TorchvisionDetector:
    """A ``torchvision.models.detection`` model with local weights, proposing boxes above ``score_thresh``.

    ``weights`` is a state dict file (loaded with ``weights_only=True``; the number of classes is read from it).
    Category names come from ``categories`` or, for 91-class models, torchvision's COCO category list.
    Input: RGB uint8 images; output per image: boxes (original pixels), scores, label names.
    """

    def __init__(
        self,
        name: str,
        weights: str | Path,
        *,
        score_thresh: float = 0.5,
        nms_thresh: float = 1.0,
        max_detections: int = 100,
        categories: list[str] | None = None,
        device: str = "cpu",
    ) -> None:
        import torch
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models.detection)
        if name not in available:
            raise ValueError(f"unknown torchvision detector {name!r}; available: {', '.join(available)}")
        if weights is None:
            raise ValueError(f"detector {name!r} needs --detector-weights (a local state dict file)")
        model, num_classes = load_torchvision_detection(name, weights, device)
        self.model = model
        self.device = device
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        n = num_classes or 91
        if categories is None and n == 91:
            from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

            categories = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
        self.categories = categories
        self._torch = torch

    def __call__(self, images: list[np.ndarray]) -> list[Proposals]:
        torch = self._torch
        if not images:
            return []
        tensors = [torch.as_tensor(np.ascontiguousarray(im)).permute(2, 0, 1).float().div(255).to(self.device)
                   for im in images]
        with torch.no_grad():
            outputs = self.model(tensors)
        result = []
        for out in outputs:
            keep = out["scores"] >= self.score_thresh
            if self.nms_thresh < 1.0:  # class-agnostic, over the per-class NMS the model already ran
                import torchvision

                kept = torch.nonzero(keep).flatten()
                keep = torch.zeros_like(keep)
                keep[kept[torchvision.ops.nms(out["boxes"][kept], out["scores"][kept], self.nms_thresh)]] = True
            boxes = out["boxes"][keep][: self.max_detections].cpu().double().numpy()
            scores = out["scores"][keep][: self.max_detections].cpu().tolist()
            ids = out["labels"][keep][: self.max_detections].cpu().tolist()
            names = [self.categories[i] if self.categories and i < len(self.categories) else str(i) for i in ids]
            result.append(Proposals(boxes=boxes, scores=[float(s) for s in scores], labels=names))
        return result


def load_torchvision_detection(name: str, weights: str | Path, device: str) -> tuple[object, int | None]:
    """``(model in eval mode on device, its class count or None for the builder's default)`` of the torchvision
    detection model ``name`` from a state dict file (loaded with ``weights_only=True``, every key checked)."""
    import torchvision

    from ovsam.checkpoint import load_state_dict_strict, read_state_dict

    state = read_state_dict(weights)
    num_classes = _num_classes(state)
    kwargs = {"weights": None, "weights_backbone": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    load_state_dict_strict(model, state, source=str(weights))
    return model.eval().to(device), num_classes


def _num_classes(state: dict) -> int | None:
    """Class count of an R-CNN state dict (its box predictor's rows); None means the builder's default (91)."""
    weight = state.get("roi_heads.box_predictor.cls_score.weight")
    return None if weight is None else int(weight.shape[0])
