"""Mask utilities: COCO RLE encoding/decoding (pycocotools), boxes from masks, stability score."""

from __future__ import annotations

import numpy as np
import torch


def encode_rle(masks: np.ndarray) -> list[dict]:
    """Boolean masks ``[N, H, W]`` -> COCO RLE dicts ``{"size": [H, W], "counts": str}`` (compressed)."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape [N, H, W], got {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for rle in rles:
        counts = rle["counts"]
        out.append({"size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def decode_rle(rles: list[dict]) -> np.ndarray:
    """COCO RLE dicts -> boolean masks ``[N, H, W]``."""
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    objs = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
             else r["counts"]} for r in rles]
    return mask_utils.decode(objs).transpose(2, 0, 1).astype(bool)


def mask_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``[..., 4]`` (exclusive max, pixel edges) of boolean masks ``[..., H, W]``; empty -> 0."""
    from .modeling.recognition import boxes_from_masks

    lead = masks.shape[:-2]
    flat = masks.reshape(-1, *masks.shape[-2:])
    return boxes_from_masks(flat).reshape(*lead, 4)


def stability_score(logits: torch.Tensor, threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """IoU between the masks at ``logit > threshold + offset`` and ``> threshold - offset`` (SAM's definition).

    ``logits`` ``[..., h, w]`` -> ``[...]``; 0 for an empty mask.
    """
    from segment_anything.utils.amg import calculate_stability_score

    lead = logits.shape[:-2]
    flat = logits.reshape(-1, *logits.shape[-2:])
    if flat.shape[0] == 0:
        return logits.new_zeros(lead)
    score = calculate_stability_score(flat, threshold, offset)
    return torch.nan_to_num(score, nan=0.0).reshape(lead)
