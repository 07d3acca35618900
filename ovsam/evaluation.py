"""The oracle-prompt segmentation and recognition metric of OV-SAM (OVSAM_SPEC §5, ``InsClsIoUMetric``).

Per ground-truth instance one prompt (its GT box, or one point inside its mask), one prediction: the mask at the
original resolution (``sigmoid > 0.5``) and the top-1 label. Reported values are micro averages over all
instances: ``miou`` (mean IoU with ``1e-8`` in the denominator) and ``acc`` (top-1 accuracy as a fraction; the
published ``score`` is ``100 * acc``), plus ``base_*`` / ``novel_*`` over instances whose GT class is base or
novel when the vocabulary has a split. ``head_acc`` is the accuracy of the CLIP2SAM classifier alone (without the
frozen-CLIP ensemble) on the RoI of the predicted mask's box, as at inference; ``gt_box_acc`` the same classifier on
the GT box's RoI, as in training (OVSAM_SPEC §6.2: a train/test shift), so it does not depend on the masks.

:class:`InstanceMetric` keeps plain sums, so workers can add theirs up before :meth:`InstanceMetric.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from .modeling import recognition as R

BASE, NOVEL = 1, 2


def mask_iou(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> np.ndarray:
    """``|P and G| / (|P or G| + 1e-8)`` per instance for boolean ``[N, H, W]`` masks. Returns ``[N]`` float64."""
    p = torch.as_tensor(pred).bool().flatten(1)
    g = torch.as_tensor(gt).bool().flatten(1)
    if p.shape != g.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    inter = (p & g).sum(1).double()
    union = (p | g).sum(1).double()
    return (inter / (union + 1e-8)).numpy()


def center_points(masks: np.ndarray, input_size: tuple[int, int] | None = None) -> np.ndarray:
    """One point per mask as the published evaluation chooses it (OVSAM_SPEC §1.10, ``get_center_coords``), ``[N, 2]``
    float64 (x, y) in the masks' frame: the mask is resized to the model's input frame ``input_size`` (``(h, w)``;
    nearest neighbour, as mmdet rescales masks; default: the masks' own size), padded by a pixel of background,
    kornia's ``distance_transform`` of its inverse gives each pixel's distance to the background, and the first
    maximum in row-major order is the point, mapped back to the masks' frame. An empty mask gives (0, 0).

    Each mask is transformed on its box plus the background margin, which gives the same distances as the whole
    frame (every background pixel beyond the margin is farther than the margin, and the cascade's replicate
    padding repeats background there too)."""
    import cv2
    import kornia

    n, h, w = masks.shape
    nh, nw = input_size if input_size is not None else (h, w)
    out = np.zeros((n, 2), dtype=np.float64)
    for i, m in enumerate(np.asarray(masks, dtype=bool)):
        r = m if (nh, nw) == (h, w) else \
            cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
        ys, xs = np.nonzero(r)
        if len(ys) == 0:
            continue
        y0, x0 = int(ys.min()), int(xs.min())
        crop = np.pad(r[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1], 1)
        inverse = torch.from_numpy((~crop).astype(np.float32))[None, None]
        dist = kornia.contrib.distance_transform(inverse)[0, 0].numpy()
        idx = int(np.argmax(dist))
        y, x = divmod(idx, crop.shape[1])
        out[i] = ((x0 - 1 + x) * w / nw, (y0 - 1 + y) * h / nh)
    return out


@dataclass
class InstanceMetric:
    """Sums over instances: ``count``, ``iou`` (sum of IoUs over instances with a mask), ``masks`` (how many had
    one), ``correct``, ``head_correct``, and the same per base/novel group."""

    sums: dict[str, float] = field(default_factory=dict)

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def update(self, gt_labels: np.ndarray, pred_labels: np.ndarray, *, ious: np.ndarray | None = None,
               head_labels: np.ndarray | None = None, gt_box_labels: np.ndarray | None = None,
               split: np.ndarray | None = None) -> None:
        """Add N instances: GT labels ``[N]``, predicted labels ``[N]``, optional IoUs ``[N]``, head-only labels
        (RoI of the predicted mask's box, as at inference) and head labels on GT-box RoIs ``[N]``, and the
        vocabulary's split (``[C]``, 1 base / 2 novel / 0 excluded) to group them."""
        gt = np.asarray(gt_labels, dtype=np.int64)
        correct = np.asarray(pred_labels) == gt
        groups = {"": np.ones(len(gt), dtype=bool)}
        if split is not None:
            cls = np.asarray(split)[gt]
            groups.update({"base_": cls == BASE, "novel_": cls == NOVEL})
        for prefix, sel in groups.items():
            self._add(prefix + "count", sel.sum())
            self._add(prefix + "correct", correct[sel].sum())
            if head_labels is not None:
                self._add(prefix + "head_correct", (np.asarray(head_labels) == gt)[sel].sum())
            if gt_box_labels is not None:
                self._add(prefix + "gt_box_correct", (np.asarray(gt_box_labels) == gt)[sel].sum())
            if ious is not None:
                self._add(prefix + "iou", np.asarray(ious, dtype=np.float64)[sel].sum())
                self._add(prefix + "masks", sel.sum())

    @staticmethod
    def summary(sums: dict[str, float]) -> dict[str, float]:
        """``miou``, ``acc``, ``head_acc``, ``gt_box_acc`` and their ``base_``/``novel_`` variants (where defined),
        ``count``."""
        out: dict[str, float] = {}
        for prefix in ("", "base_", "novel_"):
            n = sums.get(prefix + "count", 0.0)
            if n <= 0:
                continue
            out[prefix + "acc"] = sums.get(prefix + "correct", 0.0) / n
            for key in ("head", "gt_box"):
                if prefix + f"{key}_correct" in sums:
                    out[prefix + f"{key}_acc"] = sums[prefix + f"{key}_correct"] / n
            if sums.get(prefix + "masks", 0.0) > 0:
                out[prefix + "miou"] = sums[prefix + "iou"] / sums[prefix + "masks"]
        out["count"] = sums.get("count", 0.0)
        return out


def evaluate_samples(
    model: Any,
    samples: Iterable[tuple[np.ndarray, dict[str, Any]]],
    vocabulary: Any,
    *,
    prompt: str = "box",
    batch_size: int = 4,
    metric: InstanceMetric | None = None,
    published_point_boxes: bool = False,
    observe: Any = None,
) -> InstanceMetric:
    """Run ``model`` on held-out samples with one GT-derived prompt per instance and accumulate the metric.

    Each sample is ``(image HxWx3 uint8 RGB, target)`` with target keys ``labels`` ``[N]`` and, per kind, ``boxes``
    ``[N, 4]`` xyxy original pixels and ``masks`` ``[N, H, W]`` bool (mask data; IoU is measured only then).
    ``prompt``: ``"box"`` (the GT box; image-level targets carry the whole-image box) or ``"point"`` (the mask's
    :func:`center_points` in the model's input frame, as published; needs masks). ``published_point_boxes`` reproduces the released point-prompt evaluation
    (OVSAM_SPEC §6 item 3): the frozen-CLIP branch pools the GT boxes in original-image coordinates, read as if
    they were in the model's 1024 frame, instead of the mask's box. ``observe(target, prediction, ious, prompts)``,
    if given, is called for every image with instances (ious None without masks), after the metric took it."""
    from . import transforms as T
    from .batch import predict_batch

    if prompt not in ("box", "point"):
        raise ValueError(f"prompt must be 'box' or 'point', got {prompt!r}")
    metric = metric if metric is not None else InstanceMetric()
    split = None if vocabulary.split is None else np.asarray(vocabulary.split)
    text = vocabulary.embeddings
    scale = model.config.recognition.logit_scale

    def flush(images: list[np.ndarray], targets: list[dict[str, Any]]) -> None:
        prompts: list[dict[str, Any]] = []
        for t in targets:
            if prompt == "box":
                prompts.append({"box": np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4)})
            else:
                image_hw = np.asarray(t["masks"]).shape[1:]
                pts = center_points(t["masks"], T.preprocess_shape(*image_hw, model.image_size)).astype(np.float32)
                p = {"point_coords": pts[:, None, :], "point_labels": np.ones((len(pts), 1))}
                if published_point_boxes:
                    p["clip_boxes"] = np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4)
                prompts.append(p)
        preds = predict_batch(model, images, prompts, vocabulary)
        gt_box_labels = _gt_box_head_labels(model, images, targets, text)
        for pred, t, gt_box, p in zip(preds, targets, gt_box_labels, prompts):
            if len(t["labels"]) == 0:
                continue
            head = R.class_logits(torch.as_tensor(pred.head_embeddings), text, scale)[:, :-1].argmax(1).numpy()
            ious = mask_iou(pred.masks, t["masks"]) if t.get("masks") is not None else None
            metric.update(np.asarray(t["labels"]), np.asarray(pred.labels), ious=ious, head_labels=head,
                          gt_box_labels=gt_box, split=split)
            if observe is not None:
                observe(t, pred, ious, p)

    images: list[np.ndarray] = []
    targets: list[dict[str, Any]] = []
    for image, target in samples:
        if prompt == "point" and target.get("masks") is None:
            raise ValueError("point prompts need mask targets; evaluate box- or image-level data with prompt='box'")
        images.append(image)
        targets.append(target)
        if len(images) == batch_size:
            flush(images, targets)
            images, targets = [], []
    if images:
        flush(images, targets)
    return metric


@torch.no_grad()
def _gt_box_head_labels(model: Any, images: list[np.ndarray], targets: list[dict[str, Any]],
                        text: torch.Tensor) -> list[np.ndarray]:
    """Top-1 labels of the CLIP2SAM classifier alone on RoIs of the GT boxes (the training protocol), per image."""
    from . import precision as P
    from . import transforms as T
    from .batch import encode_images, prepare_image

    prepared = [prepare_image(model, image) for image in images]
    features = encode_images(model, torch.stack([p.tensor for p in prepared]))
    boxes, index = [], []
    for i, (p, t) in enumerate(zip(prepared, targets)):
        b = torch.as_tensor(T.apply_boxes(np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4), p.original_size,
                                          p.input_size), dtype=torch.float32)
        boxes.append(b)
        index.append(torch.full((len(b),), i, dtype=torch.long))
    rec = model.config.recognition
    all_boxes = torch.cat(boxes).to(model.device)
    rois = torch.cat([torch.cat(index).to(model.device)[:, None].float(), all_boxes], dim=1)
    with P.autocast(model, all_boxes):  # at the model's precision, as the prediction functions run
        feats = R.multilevel_roi_align(features.fpn_feats, rois, model.config.neck.strides, rec.roi_size,
                                       rec.finest_scale)
        embeddings = model.mask_decoder.roi_embeddings(feats).float()
    labels = R.class_logits(embeddings, text, rec.logit_scale)[:, :-1].argmax(1)
    return np.split(labels.cpu().numpy(), np.cumsum([len(b) for b in boxes])[:-1])


__all__ = ["InstanceMetric", "center_points", "evaluate_samples", "mask_iou"]
