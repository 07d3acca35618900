"""Masks as the instance rows store them: COCO RLE made from the model's dense masks (laid out column-major
on the model's threads so the row thread encodes them without transposing), and areas read from the RLE."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_masks(masks: Any) -> list[dict]:
    """Dense boolean masks ``[N, H, W]`` (a tensor on any device) -> COCO RLE dicts, in the row part.

    The one place where masks become RLE; ``ovsam.rle.encode_rle_torch(masks)`` gives the same dicts on the masks'
    own device and can replace this body (the model part's :func:`rle_layout` is then unnecessary)."""
    from ovsam.masks import encode_rle

    return encode_rle(masks.cpu().numpy() if hasattr(masks, "cpu") else masks)


def rle_layout(masks: Any) -> Any:
    """``masks`` ``[N, H, W]`` with each mask stored column-major: same shape and values, the memory order COCO RLE
    reads. Done by torch on the model's device and threads (a parallel copy), so that ``encode_rle`` on the row
    thread finds its Fortran-order input ready instead of transposing every mask pixel by pixel (on the CPU about
    two thirds of its time)."""
    return masks.transpose(-1, -2).contiguous().transpose(-1, -2)


def rle_areas(rles: list[dict]) -> list[int]:
    """Pixel counts of COCO RLE masks (from the run lengths, without decoding to dense)."""
    from pycocotools import mask as mask_utils

    if not rles:
        return []
    return np.asarray(mask_utils.area(rles), dtype=np.int64).tolist()


