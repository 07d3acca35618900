"""COCO RLE encoding (strings that pycocotools decodes back to the same masks) and the RoI box rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ovsam.masks import decode_rle, encode_rle


def test_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 80, 100)) > 0.5
    masks[2] = False
    rles = encode_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [80, 100] for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)
    assert np.array_equal(decode_rle(rles), masks)


def test_roi_box_rules():
    from ovsam.modeling.recognition import boxes_from_mask_logits, largest_components

    logits = torch.full((3, 1, 64, 64), -10.0)
    logits[0, 0, 5:15, 5:20] = 10.0  # the object
    logits[0, 0, 40, 50] = 10.0  # one stray pixel
    logits[1, 0, 10:12, 10:12] = 10.0
    logits[1, 0, 12:20, 12:20] = 10.0  # touches the first square at a corner only: 8-connected, one part
    logits[1, 0, 0:3, 60:63] = 10.0
    published = boxes_from_mask_logits(logits, scale=4.0)
    largest = boxes_from_mask_logits(logits, scale=4.0, rule="largest_component")
    assert published[0].tolist() == [20.0, 20.0, 204.0, 164.0]
    assert largest[0].tolist() == [20.0, 20.0, 80.0, 60.0]
    assert published[1].tolist() == [40.0, 0.0, 252.0, 80.0]
    assert largest[1].tolist() == [40.0, 40.0, 80.0, 80.0]
    assert published[2].tolist() == largest[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # empty mask
    parts = largest_components(logits[:, 0] > 0)
    assert parts.dtype == torch.bool and int(parts[0].sum()) == 150 and int(parts[1].sum()) == 68
    with pytest.raises(ValueError, match="largest_component"):
        boxes_from_mask_logits(logits, scale=4.0, rule="biggest")
