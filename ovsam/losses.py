"""CLIP2SAM training losses (OVSAM_SPEC §4.3), written against the published mmdet semantics.

- :func:`classification_loss`: softmax cross-entropy over ``C + 1`` classes (background last) with class weights
  ``[1] * C + [bg_weight]``; labels ``-1`` (class-agnostic data) weigh 0; averaged over the sum of the class
  weights of the targets (the number of labelled prompts), times ``loss_weight``.
- :func:`mask_loss`: Mask2Former-style point-sampled sigmoid BCE and dice. Points are drawn uniformly, the most
  uncertain ones (``-|logit|``) are kept and topped up with fresh uniform points; prediction and target are read at
  those points with ``grid_sample`` (bilinear, ``align_corners=False``), so their resolutions need not match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PUBLISHED_NUM_POINTS = 12544  # 112 x 112


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    bg_weight: float = 0.1,
    loss_weight: float = 2.0,
) -> torch.Tensor:
    """``loss_weight * sum_i w_i * CE_i / sum_i w_i`` over labelled prompts.

    Arguments:
      logits: ``[N, C + 1]`` class logits, background last.
      labels: ``[N]`` int64 class indices in ``[0, C]``; ``-1`` marks class-agnostic prompts (weight 0).

    ``w_i`` is the class weight of the target (1 for foreground, ``bg_weight`` for the background index ``C``).
    With no labelled prompt the loss is a zero that keeps the graph (``logits.sum() * 0``).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C+1] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = logits.shape[1] - 1
    if labels.numel() and (labels.min() < -1 or labels.max() > num_classes):
        raise ValueError(f"labels must be -1 or in [0, {num_classes}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    class_weight = logits.new_ones(num_classes + 1)
    class_weight[num_classes] = bg_weight
    valid = labels >= 0
    target = labels.clamp(min=0)
    ce = F.cross_entropy(logits, target, reduction="none")
    weight = class_weight[target] * valid.to(logits.dtype)
    total = weight.sum()
    if total <= 0:
        return logits.sum() * 0.0
    return loss_weight * (weight * ce).sum() / total


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Point coordinates ``[N, num_points, 2]`` in ``[0, 1]`` (x, y), biased towards uncertain logits.

    Draws ``oversample_ratio * num_points`` uniform points, keeps the ``importance_sample_ratio * num_points``
    with the largest ``-|logit|`` and adds uniform points up to ``num_points``. ``logits`` is ``[N, 1, h, w]``."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    point_logits = point_sample(logits, coords)  # [N, 1, num_sampled]
    uncertainty = -point_logits.abs()[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # [N, k]
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(n, num_random, 2, device=logits.device, generator=generator)
        picked = torch.cat([picked, extra], dim=1)
    return picked


def point_sample(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values ``[N, C, P]`` of ``values`` ``[N, C, h, w]`` at ``coords`` ``[N, P, 2]`` in ``[0, 1]``
    (x, y), with ``align_corners=False`` (a coordinate of 0 is the left edge of the first pixel)."""
    grid = 2.0 * coords[:, :, None, :] - 1.0  # [N, P, 1, 2]
    return F.grid_sample(values, grid, mode="bilinear", align_corners=False)[..., 0]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, eps: float = 1.0) -> torch.Tensor:
    """Naive dice on ``sigmoid(logits)``: ``sum_i (1 - (2 sum p g + eps) / (sum p + sum g + eps)) / num_masks``.
    ``logits``/``targets`` ``[N, P]``."""
    p = logits.sigmoid()
    numerator = 2 * (p * targets).sum(-1) + eps
    denominator = p.sum(-1) + targets.sum(-1) + eps
    return (1 - numerator / denominator).sum() / num_masks


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """BCE-with-logits averaged over points, summed over masks, divided by ``num_masks``. ``[N, P]`` inputs."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def mask_loss(
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    *,
    num_points: int = PUBLISHED_NUM_POINTS,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    bce_weight: float = 5.0,
    dice_weight: float = 5.0,
    num_masks: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Point-sampled mask losses ``{"loss_mask": bce, "loss_dice": dice}`` (already multiplied by their weights).

    Arguments:
      mask_logits: ``[N, 1, h, w]`` predicted logits over the padded input frame.
      gt_masks: ``[N, H, W]`` binary targets over the same frame (any resolution).
      num_masks: the normaliser (default N; the published code averages it over workers); clamped at >= 1.

    The points are chosen without gradient; with N = 0 both losses are zeros that keep the graph.
    """
    n = mask_logits.shape[0]
    if gt_masks.shape[0] != n:
        raise ValueError(f"expected one target per mask, got {n} predictions and {gt_masks.shape[0]} targets")
    if n == 0:
        zero = mask_logits.sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero.clone()}
    denom = max(float(n if num_masks is None else num_masks), 1.0)
    with torch.no_grad():
        coords = uncertain_point_coords(mask_logits, num_points, oversample_ratio, importance_sample_ratio,
                                        generator=generator)
        target = point_sample(gt_masks[:, None].to(mask_logits.dtype), coords)[:, 0]
    pred = point_sample(mask_logits, coords)[:, 0]
    return {"loss_mask": bce_weight * sigmoid_bce_loss(pred, target, denom),
            "loss_dice": dice_weight * dice_loss(pred, target, denom)}


__all__ = ["PUBLISHED_NUM_POINTS", "classification_loss", "dice_loss", "mask_loss", "point_sample",
           "sigmoid_bce_loss", "uncertain_point_coords"]
