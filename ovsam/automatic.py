""""Everything" mode: a point grid -> masks -> quality filtering -> NMS -> labelled records.

The analogue of ``segment_anything.SamAutomaticMaskGenerator`` (single crop). With an OV-SAM model and a
vocabulary every kept mask is also named.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from . import transforms as T
from .batch import predict_torch_prompts
from .masks import encode_rle, mask_boxes_xyxy, stability_score
from .modeling import OvsamModel, SamModel
from .predictor import OvsamPredictor

OUTPUT_MODES = ("binary_mask", "coco_rle")
# OV-SAM has no IoU head, so its grid masks are filtered by stability alone; SAM's 0.95 then keeps almost nothing
# (0 masks on the demo's scenes). Measured by bench/grid.py with the demo's trained ovsam-tiny on the synthetic
# world's 48 held-out scenes (122 objects, found = IoU >= 0.5): 32 points, stability 0.6, box NMS 0.85 find 91.8%
# of the objects (precision 0.82); SAM's 0.95 / 0.7 find 0%, 0.9 / 0.7 at 16 points 40%.
OVSAM_GRID_DEFAULTS = {"stability_score_thresh": 0.6, "box_nms_thresh": 0.85}
SAM_GRID_DEFAULTS = {"stability_score_thresh": 0.95, "box_nms_thresh": 0.7}


class OvsamMaskGenerator:
    """Segment (and name) everything in an image.

    Arguments:
      model: an OV-SAM or SAM model.
      vocabulary: labels masks when given (OV-SAM only).
      points_per_side: the grid is ``points_per_side`` x ``points_per_side`` single positive clicks.
      points_per_batch: prompts decoded together.
      pred_iou_thresh: SAM models: keep masks whose predicted IoU exceeds this. OV-SAM has no IoU head, so its
        masks are filtered by stability alone.
      stability_score_thresh / stability_score_offset: keep masks whose stability score (IoU of the mask at
        logit thresholds ``+offset`` and ``-offset``) is at least the threshold (default: 0.95 for SAM models, as
        segment-anything; 0.6 for OV-SAM models, measured: ``OVSAM_GRID_DEFAULTS``).
      box_nms_thresh: IoU threshold of the box NMS across all masks (class-agnostic; default: 0.7 for SAM models,
        0.85 for OV-SAM models).
      min_mask_area: drop masks with fewer pixels than this.
      label_score_thresh: with a vocabulary, drop masks whose label probability (``label_score``, see
        ``Prediction.label_scores``) is below this.
      top_k: number of alternative labels kept per record.
      output_mode: ``binary_mask`` (HxW bool array) or ``coco_rle``.
    """

    def __init__(
        self,
        model: OvsamModel | SamModel,
        vocabulary: Any = None,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float | None = None,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float | None = None,
        min_mask_area: int = 0,
        label_score_thresh: float = 0.0,
        top_k: int = 5,
        output_mode: str = "binary_mask",
    ) -> None:
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError(f"points_per_side and points_per_batch must be >= 1, got {points_per_side}, "
                             f"{points_per_batch}")
        self.predictor = OvsamPredictor(model, vocabulary)
        self.model = model
        self.vocabulary = vocabulary
        defaults = SAM_GRID_DEFAULTS if isinstance(model, SamModel) else OVSAM_GRID_DEFAULTS
        if stability_score_thresh is None:
            stability_score_thresh = defaults["stability_score_thresh"]
        if box_nms_thresh is None:
            box_nms_thresh = defaults["box_nms_thresh"]
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_area = min_mask_area
        self.label_score_thresh = label_score_thresh
        self.top_k = top_k
        self.output_mode = output_mode

    def point_grid(self, original_size: tuple[int, int]) -> np.ndarray:
        """``[P, 2]`` (x, y) grid points in original pixels at the centres of a ``points_per_side`` lattice."""
        n = self.points_per_side
        offset = 1 / (2 * n)
        side = np.linspace(offset, 1 - offset, n)
        xs, ys = np.meshgrid(side, side)
        grid = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
        h, w = original_size
        return grid * np.array([[w, h]])

    @torch.no_grad()
    def generate(self, image: np.ndarray, image_format: str = "RGB") -> list[dict[str, Any]]:
        """Masks for ``image`` (``HxWx3`` uint8), best first. Each record has ``segmentation``, ``area``,
        ``bbox`` (XYWH), ``box_xyxy``, ``predicted_iou``, ``stability_score``, ``point_coords`` and, with a
        vocabulary, ``label``, ``label_name``, ``label_score``, ``background_score``, ``top_labels``, ``top_scores``."""
        self.predictor.set_image(image, image_format)
        return self.generate_for_set_image()

    @torch.no_grad()
    def generate_for_set_image(self) -> list[dict[str, Any]]:
        """:meth:`generate` for the image already set on ``self.predictor`` (``set_image``, or
        ``load_features`` with features computed earlier)."""
        self.predictor._require_image()
        original_size = self.predictor.original_size
        input_size = self.predictor.input_size
        points = self.point_grid(original_size)
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in
                                               ("masks", "iou", "stability", "points", "labels", "label_scores",
                                                "background_scores")}
        multimask = isinstance(self.model, SamModel)
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            coords = torch.as_tensor(T.apply_coords(batch, original_size, input_size), dtype=torch.float32,
                                     device=self.model.device)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=self.model.device)
            pred = predict_torch_prompts(
                self.model, self.predictor.features, 0, (coords, labels), None, None, original_size, input_size,
                vocabulary=self.vocabulary, multimask_output=multimask, return_logits=True,
                prompt_chunk=self.points_per_batch,
            )
            logits = pred.masks if multimask else pred.masks[:, None]
            iou = pred.iou_scores if multimask else pred.iou_scores[:, None]
            m = logits.shape[1]
            logits = logits.flatten(0, 1)
            iou = iou.flatten(0, 1)
            pts = torch.as_tensor(batch, dtype=torch.float32).repeat_interleave(m, dim=0)
            keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            if multimask and self.pred_iou_thresh > 0:
                keep &= iou > self.pred_iou_thresh
            threshold = 0.0
            stab = stability_score(logits, threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0:
                keep &= stab >= self.stability_score_thresh
            masks = T.binarize(logits, self.model.config.mask_binarize)
            if self.min_mask_area > 0:
                keep &= masks.flatten(1).sum(dim=1) >= self.min_mask_area
            if self.vocabulary is not None:
                scores = pred.label_scores.repeat_interleave(m, dim=0)
                lab = pred.labels.repeat_interleave(m, dim=0)
                keep &= scores.gather(1, lab[:, None])[:, 0] >= self.label_score_thresh
                kept["labels"].append(lab[keep].cpu())
                kept["label_scores"].append(scores[keep].cpu())
                kept["background_scores"].append(pred.background_scores.repeat_interleave(m, dim=0)[keep].cpu())
            kept["masks"].append(masks[keep].cpu())
            kept["iou"].append(iou[keep].cpu())
            kept["stability"].append(stab[keep].cpu())
            kept["points"].append(pts[keep.cpu()])
        data = {k: torch.cat(v) if v else None for k, v in kept.items()}
        if data["masks"] is None or data["masks"].shape[0] == 0:
            return []
        boxes = mask_boxes_xyxy(data["masks"])
        quality = data["iou"] if multimask else data["stability"]
        order = batched_nms(boxes, quality, torch.zeros(len(boxes), dtype=torch.long), self.box_nms_thresh)
        return self._records(data, boxes, order)

    def _records(self, data: dict[str, torch.Tensor | None], boxes: torch.Tensor, order: torch.Tensor) -> list[dict]:
        masks = data["masks"][order].numpy()
        segs = encode_rle(masks) if self.output_mode == "coco_rle" else list(masks)
        records = []
        for j, i in enumerate(order.tolist()):
            b = boxes[i].tolist()
            rec = {
                "segmentation": segs[j],
                "area": int(masks[j].sum()),
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "box_xyxy": b,
                "predicted_iou": float(data["iou"][i]),
                "stability_score": float(data["stability"][i]),
                "point_coords": [data["points"][i].tolist()],
            }
            if data["labels"] is not None:
                scores = data["label_scores"][i]
                k = min(self.top_k, scores.shape[0])
                top = torch.topk(scores, k)
                label = int(data["labels"][i])
                rec.update(label=label, label_name=self.vocabulary.names[label], label_score=float(scores[label]),
                           background_score=float(data["background_scores"][i]),
                           top_labels=top.indices.tolist(), top_scores=top.values.tolist())
            records.append(rec)
        return records


__all__ = ["OvsamMaskGenerator"]
