"""Stateless recognition functions of CLIP2SAM: box from mask, RoI level rule, multi-level RoIAlign, the cosine
classifier with max over synonyms, and the geometric ensemble with the frozen-CLIP branch (OVSAM_SPEC §1.6–1.9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..config import ROI_BOX_RULES

BASE, NOVEL, EXCLUDED = 1, 2, 0
EXCLUDED_SCORE = -1000.0


def boxes_from_mask_logits(mask_logits: torch.Tensor, scale: float, rule: str = "mask") -> torch.Tensor:
    """Tight boxes of ``sigmoid(mask_logits) > 0.5``, with exclusive max, times ``scale``.

    ``mask_logits`` is ``[N, 1, h, w]`` (or ``[N, h, w]``); returns ``[N, 4]`` float32 xyxy. An empty mask gives
    ``(0, 0, 0, 0)``. ``rule`` is ``RecognitionConfig.roi_box``: ``"mask"`` (published) boxes every positive pixel,
    ``"largest_component"`` only the largest 8-connected component of each mask.
    """
    if mask_logits.dim() == 4:
        mask_logits = mask_logits[:, 0]
    masks = mask_logits.sigmoid() > 0.5
    if rule == "largest_component":
        masks = largest_components(masks)
    elif rule != "mask":
        raise ValueError(f"unknown RoI box rule {rule!r}; expected one of {', '.join(ROI_BOX_RULES)}")
    return boxes_from_masks(masks) * scale


def largest_components(masks: torch.Tensor) -> torch.Tensor:
    """Each boolean mask of ``[N, h, w]`` reduced to its largest 8-connected component (ties: the one whose first
    pixel comes first in raster order); empty masks stay empty. Labelled with OpenCV on the CPU."""
    import cv2
    import numpy as np

    out = masks.clone()
    arr = masks.detach().cpu().numpy().astype(np.uint8)
    for i, m in enumerate(arr):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 2:  # background + more than one component
            keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            out[i] = torch.from_numpy(labels == keep).to(masks.device)
    return out


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (exclusive max) of boolean masks ``[N, h, w]``; empty masks give zeros. ``[N, 4]`` float32."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    x_any = masks.any(dim=1)
    y_any = masks.any(dim=2)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(x_any, xs, w).min(dim=1).values
    x1 = torch.where(x_any, xs, -1).max(dim=1).values + 1
    y0 = torch.where(y_any, ys, h).min(dim=1).values
    y1 = torch.where(y_any, ys, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~x_any.any(dim=1)
    boxes[empty] = 0.0
    return boxes


def roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float) -> torch.Tensor:
    """FPN level per RoI: ``clamp(floor(log2(sqrt(w*h) / finest_scale + 1e-6)), 0, num_levels - 1)``.

    ``rois`` is ``[N, 5]`` (batch index, x0, y0, x1, y1). Returns ``[N]`` int64.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    feats: list[torch.Tensor],
    rois: torch.Tensor,
    strides: tuple[int, ...],
    output_size: int,
    finest_scale: float,
) -> torch.Tensor:
    """RoIAlign each RoI on its FPN level (``aligned=True``, adaptive sampling). Returns ``[N, C, r, r]``."""
    n = rois.shape[0]
    out = feats[0].new_zeros(n, feats[0].shape[1], output_size, output_size)
    if n == 0:
        return out
    levels = roi_levels(rois, len(feats), finest_scale)
    for i, (feat, stride) in enumerate(zip(feats, strides)):
        idx = torch.nonzero(levels == i, as_tuple=True)[0]
        if idx.numel():
            out[idx] = roi_align(feat, rois[idx], output_size=output_size, spatial_scale=1.0 / stride,
                                 sampling_ratio=0, aligned=True)
    return out


@dataclass(frozen=True)
class ClassPrototypes:
    """A vocabulary's text prototypes without padding: ``vectors`` ``[M, D]`` unit-norm, ``owner`` ``[M]`` the
    class of each (int64), ``num_classes`` C. The classifier then costs M dot products per region rather than
    C x P (ImageNet-21k: 40,737 synonyms against 21,841 x 15 padded slots)."""

    vectors: torch.Tensor
    owner: torch.Tensor
    num_classes: int

    @classmethod
    def from_padded(cls, text: torch.Tensor) -> "ClassPrototypes":
        """From ``[C, P, D]`` prototypes whose short classes repeat their first vector: the repeats are dropped
        (a repeated vector cannot change a max)."""
        c, p, _ = text.shape
        keep = torch.ones(c, p, dtype=torch.bool, device=text.device)
        if p > 1:
            keep[:, 1:] = (text[:, 1:] != text[:, :1]).any(dim=-1)
        owner = torch.arange(c, device=text.device)[:, None].expand(c, p)[keep]
        return cls(text[keep], owner, c)

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "ClassPrototypes":
        return ClassPrototypes(self.vectors.to(device=device, dtype=dtype), self.owner.to(device), self.num_classes)


def class_logits(
    embeddings: torch.Tensor, text: torch.Tensor | ClassPrototypes, logit_scale: float, chunk_size: int = 4096
) -> torch.Tensor:
    """Cosine classifier: ``exp(logit_scale) * max_p <normalize(f_n), t_{k,p}>`` plus a background column of 0.

    ``embeddings`` ``[N, D]``; ``text`` ``[C, P, D]`` unit-norm class prototypes (processed in chunks of
    ``chunk_size`` classes), or :class:`ClassPrototypes`, whose dot products are taken in its vectors' dtype
    (float32, or the compute dtype of a reduced precision) and accumulated into float32 logits. Returns
    ``[N, C + 1]`` float32 (background last).
    """
    f = F.normalize(embeddings.float(), dim=-1)
    scale = torch.tensor(logit_scale, dtype=torch.float32, device=f.device).exp()
    if isinstance(text, ClassPrototypes):
        sims = (f.to(text.vectors.dtype) @ text.vectors.T).float()
        n, c = f.shape[0], text.num_classes
        if sims.shape[1] == c:  # one prototype per class, in class order
            best = sims
        else:
            best = sims.new_full((n, c), -torch.inf).scatter_reduce_(
                1, text.owner[None].expand(n, -1), sims, "amax")
        logits = best * scale
        return torch.cat([logits, logits.new_zeros(n, 1)], dim=1)
    text = text.to(device=f.device, dtype=f.dtype)
    parts = [
        torch.einsum("nd,cpd->ncp", f, text[i : i + chunk_size]).max(dim=-1).values
        for i in range(0, text.shape[0], chunk_size)
    ]
    logits = torch.cat(parts, dim=1) * scale
    return torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)


def mask_valid_for_clip(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``v`` per prompt: any mask logit > 0 after bilinear resizing to the CLIP feature size. ``[N]`` bool."""
    if mask_logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=mask_logits.device)
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return (resized > 0).flatten(1).any(dim=1)


def fuse_scores(
    query_logits: torch.Tensor,
    clip_logits: torch.Tensor | None,
    valid: torch.Tensor | None,
    indicator: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Geometric ensemble of the head and frozen-CLIP class distributions, in log space.

    ``s_k = (1 - w_k v) log softmax(q)_k + w_k v log softmax(c)_k`` with ``w = alpha`` for base classes and the
    background, ``beta`` for novel ones; classes with indicator 0 get ``-1000``. Without a CLIP branch
    (``clip_logits`` None) this is ``log softmax(q)`` (with the same exclusion).

    ``query_logits``/``clip_logits`` ``[N, C + 1]``; ``valid`` ``[N]`` bool; ``indicator`` ``[C]`` in {0, 1, 2}.
    Returns ``[N, C + 1]`` log-scores.
    """
    log_q = F.log_softmax(query_logits, dim=-1)
    ind = torch.cat([indicator.to(query_logits.device), indicator.new_full((1,), BASE).to(query_logits.device)])
    if clip_logits is None:
        scores = log_q
    else:
        log_c = F.log_softmax(clip_logits, dim=-1)
        w = torch.where(ind == BASE, alpha, beta).to(log_q.dtype)
        v = valid.to(log_q.dtype)[:, None]
        wv = w[None, :] * v
        scores = (1 - wv) * log_q + wv * log_c
    return scores.masked_fill((ind == EXCLUDED)[None, :], EXCLUDED_SCORE)


def fused_softmax(scores: torch.Tensor) -> torch.Tensor:
    """The published label probabilities: ``softmax(s)`` over the C + 1 fused log-scores, background included
    (OVSAM_SPEC §1.7 step 6, ``softmax(cls_results)``). The fused scores are logs of the weighted geometric mean
    ``q_k^(1 - w v) * c_k^(w v)`` of the head's and the frozen CLIP's class probabilities, which does not sum to one;
    the softmax normalises it, so a row sums to 1 and scores compare across prompts. Where the CLIP branch is off
    or gated this is the head's ``q``. Excluded classes get 0. ``[N, C + 1]`` -> ``[N, C + 1]`` float32: the label
    is the argmax of the first C columns, ``label_scores`` are those columns and ``background_scores`` the last."""
    return torch.softmax(scores.float(), dim=-1)


__all__ = [
    "BASE", "NOVEL", "EXCLUDED", "EXCLUDED_SCORE", "boxes_from_mask_logits", "boxes_from_masks", "largest_components", "roi_levels",
    "multilevel_roi_align", "ClassPrototypes", "class_logits", "mask_valid_for_clip", "fuse_scores", "fused_softmax",
]
