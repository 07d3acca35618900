"""COCO RLE encoding: strings that pycocotools decodes back to the same masks."""

from __future__ import annotations

import numpy as np
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
