"""Class-agnostic box proposals from the region proposal network of a torchvision two-stage detector
(``--prompts proposals:<fasterrcnn_*|maskrcnn_*|keypointrcnn_*>``).

Only the RPN runs, with the model's own parts and settings: its ``transform`` (``GeneralizedRCNNTransform``:
normalise, resize, batch images of any sizes), its ``backbone``, and the ``rpn``'s head, anchor generator,
``box_coder.decode`` and ``filter_proposals``. ``filter_proposals`` is what ``RegionProposalNetwork.forward`` runs
in eval mode (clip, drop tiny boxes, per-level NMS at the RPN's ``nms_thresh`` (0.7 in torchvision), keep its
``post_nms_top_n``) and it returns the objectness probabilities that ``forward`` drops, so the boxes are exactly
``model.rpn``'s and each comes with its score. The class head (``roi_heads``) never runs.

Then, per image: the boxes are mapped back to original pixels as ``transform.postprocess`` does (torchvision's
``resize_boxes``) and clipped to the image; boxes with objectness ``>= score_thresh`` are kept (``>=`` as
torchvision's own RPN and detectors threshold, so the default 0.0 keeps every box); a class-agnostic NMS at
``nms_thresh`` follows unless it is 1.0 (off); the boxes are sorted by objectness, best first (a stable sort, so
the RPN's own order is kept), and the first ``max_detections`` kept. Labels are None: the proposals have no class.

Plain callables: no Ray here.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torchvision

from pipeline.annotate.proposals import Proposals, load_torchvision_detection

_TWO_STAGE_PREFIXES = ("fasterrcnn_", "maskrcnn_", "keypointrcnn_")
#: torchvision detection models with a region proposal network, the ones that can propose class-agnostic boxes
TWO_STAGE = tuple(n for n in torchvision.models.list_models(module=torchvision.models.detection)
                  if n.startswith(_TWO_STAGE_PREFIXES))
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def check_two_stage(name: str) -> str:
    """``name`` if it is a torchvision two-stage detector (:data:`TWO_STAGE`); ``ValueError`` otherwise."""
    if name in TWO_STAGE:
        return name
    available = torchvision.models.list_models(module=torchvision.models.detection)
    what = ("a one-stage torchvision detector with no region proposal network" if name in available
            else "not a torchvision detection model")
    raise ValueError(f"{name!r} is {what}; class-agnostic proposals need a two-stage detector (one with an RPN): "
                     f"{', '.join(TWO_STAGE)}")


class RpnProposals:
    """Class-agnostic proposals of a torchvision two-stage detector's RPN (see the module docstring).

    ``weights`` is a state dict file of the whole detector (read with ``ovsam.checkpoint.read_state_dict``, loaded
    strictly; the number of classes is read from it), as for ``TorchvisionDetector``. ``precision`` ``bf16`` or
    ``fp16`` runs the model under ``torch.autocast`` on ``device``'s type; ``fp32`` runs it without autocast.
    Input: RGB uint8 images ``[H, W, 3]`` of any sizes; output per image: boxes (original pixels, xyxy), the RPN's
    objectness probabilities in [0, 1], best first, and labels None.
    """

    def __init__(self, name: str, weights: str | Path, *, score_thresh: float = 0.0, nms_thresh: float = 1.0,
                 max_detections: int = 100, device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        check_two_stage(name)
        if weights is None:
            raise ValueError(f"proposals of {name!r} need detector weights (a local state dict file)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        for label, value in (("score threshold", score_thresh), ("NMS threshold", nms_thresh)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"proposal {label} must be in [0, 1], got {value}")
        if int(max_detections) < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.model, _ = load_torchvision_detection(name, weights, device)
        self.name = name
        self.device = device
        self.device_type = torch.device(device).type
        self.precision = precision
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        self._torch = torch

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return nullcontext()
        return self._torch.autocast(device_type=self.device_type, dtype=getattr(self._torch, dtype))

    def rpn_boxes(self, tensors: list) -> tuple[list, list, list[tuple[int, int]]]:
        """The RPN's boxes and objectness per image, in the transformed (resized) frame, as ``model.rpn`` in eval
        mode computes them, with the transformed image sizes."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        model = self.model
        rpn = model.rpn
        images, _ = model.transform(tensors)
        features = model.backbone(images.tensors)
        if isinstance(features, self._torch.Tensor):
            features = {"0": features}
        feature_list = list(features.values())
        objectness, deltas = rpn.head(feature_list)
        anchors = rpn.anchor_generator(images, feature_list)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        return boxes, scores, list(images.image_sizes)

    def __call__(self, images: list[np.ndarray]) -> list[Proposals]:
        torch = self._torch
        from torchvision.models.detection.transform import resize_boxes
        from torchvision.ops import clip_boxes_to_image, nms

        if not images:
            return []
        tensors, sizes = [], []
        for im in images:
            arr = np.asarray(im)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            sizes.append((int(arr.shape[0]), int(arr.shape[1])))
            tensors.append(torch.as_tensor(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)
                           .to(self.device))
        with torch.no_grad(), self._autocast():
            boxes, scores, resized = self.rpn_boxes(tensors)
        result = []
        with torch.no_grad():
            for b, s, new_size, size in zip(boxes, scores, resized, sizes):
                b = clip_boxes_to_image(resize_boxes(b.float(), new_size, size), size)
                s = s.float()
                keep = s >= self.score_thresh
                b, s = b[keep], s[keep]
                if self.nms_thresh < 1.0 and len(s):
                    keep = nms(b, s, self.nms_thresh)
                    b, s = b[keep], s[keep]
                order = torch.sort(s, descending=True, stable=True).indices[: self.max_detections]
                b, s = b[order], s[order]
                result.append(Proposals(boxes=b.cpu().double().numpy().reshape(-1, 4),
                                        scores=[float(v) for v in s.cpu().tolist()], labels=[None] * len(s)))
        return result


__all__ = ["PRECISIONS", "TWO_STAGE", "RpnProposals", "check_two_stage"]
