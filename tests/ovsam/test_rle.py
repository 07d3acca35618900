"""``encode_rle_torch``: device-side COCO RLE, byte-identical to pycocotools and to ``ovsam.masks.encode_rle``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ovsam import rle as rle_module
from ovsam.masks import encode_rle
from ovsam.rle import encode_rle_torch

SHAPES = [(1, 1), (1, 7), (9, 1), (2, 2), (3, 5), (17, 4), (31, 33), (64, 48), (101, 67), (150, 200)]


@contextlib.contextmanager
def _forced_path(sparse: bool):
    saved = rle_module._SPARSE_CHANGES_PER_PIXEL
    rle_module._SPARSE_CHANGES_PER_PIXEL = 2.0 if sparse else -1.0
    try:
        yield
    finally:
        rle_module._SPARSE_CHANGES_PER_PIXEL = saved


def _pycoco(masks: np.ndarray) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _check(masks: np.ndarray, device: str = "cpu") -> list[dict]:
    """Encode bool ``masks`` [N, H, W] on ``device``; assert equality with pycocotools, encode_rle, decode.

    Both ways of finding the runs are checked: sorting sparse row-major changes, and the dense transpose.
    """
    masks = np.asarray(masks, dtype=bool)
    t = torch.from_numpy(masks).to(device)
    with _forced_path(sparse=True):
        got = encode_rle_torch(t)
    with _forced_path(sparse=False):
        got_bytes = encode_rle_torch(t, as_bytes=True)
    assert got == encode_rle_torch(t)  # the default choice
    ref = _pycoco(masks) if masks.shape[0] else []
    assert len(got) == len(got_bytes) == len(ref) == masks.shape[0]
    for g, gb, r in zip(got, got_bytes, ref):
        assert isinstance(gb["counts"], bytes) and gb["counts"] == r["counts"]
        assert isinstance(g["counts"], str) and g["counts"] == r["counts"].decode("ascii")
        assert g["size"] == gb["size"] == [int(s) for s in r["size"]] == list(masks.shape[1:])
    assert got == encode_rle(masks)
    if masks.shape[0] and masks.shape[1] * masks.shape[2]:
        decoded = mask_utils.decode(got_bytes).reshape(masks.shape[1], masks.shape[2], -1)
        assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)
    return got


def _blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Random unions of ellipses and rectangles (object-like masks with few, long runs)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(int(rng.integers(0, 5))):
            cy, cx = rng.uniform(-0.1, 1.1) * h, rng.uniform(-0.1, 1.1) * w
            ry, rx = rng.uniform(0.02, 0.5) * h + 0.5, rng.uniform(0.02, 0.5) * w + 0.5
            if rng.random() < 0.6:
                blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                blob = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            if rng.random() < 0.2:
                out[i] ^= blob  # sometimes cut holes
            else:
                out[i] |= blob
    return out


def _from_runs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A mask built from heavy-tailed random run lengths (column-major), so counts and their deltas span
    several 5-bit groups, both positive and negative."""
    num_px = h * w
    lengths = np.exp(rng.uniform(0, np.log(num_px), size=200)).astype(np.int64) + 1
    values = np.arange(lengths.size) % 2 == (rng.random() < 0.5)
    flat = np.repeat(values, lengths)[:num_px]
    flat = np.pad(flat, (0, num_px - flat.size))
    return flat.reshape(w, h).T[None]


@pytest.mark.parametrize("shape", SHAPES)
def test_random_noise_and_blobs_match_pycocotools(shape):
    h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    noise = rng.random((6, h, w)) < np.array([0.01, 0.1, 0.5, 0.9, 0.99, 0.3])[:, None, None]
    blobs = _blobs(rng, 6, h, w)
    _check(noise)
    _check(blobs)
    _check(np.concatenate([blobs[:3], noise, blobs[3:]]))  # batched mixture in one call


def test_edge_cases_in_one_batch():
    h, w = 13, 8
    cases = []
    cases.append(np.zeros((h, w), bool))  # empty
    cases.append(np.ones((h, w), bool))  # full
    for y, x in [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (6, 3)]:  # single pixels (first/last/...)
        m = np.zeros((h, w), bool)
        m[y, x] = True
        cases.append(m)
        cases.append(~m)  # full but one pixel
    m = np.zeros((h, w), bool)
    m[:, 0] = True  # first column: the first run of zeros is 0
    cases.append(m)
    m = np.zeros((h, w), bool)
    m[0, :] = True  # first row: alternating 1/12 runs
    cases.append(m)
    cases.append(np.indices((h, w)).sum(0) % 2 == 0)  # checkerboard starting with 1
    cases.append(np.indices((h, w)).sum(0) % 2 == 1)  # checkerboard starting with 0
    masks = np.stack(cases)
    batch = _check(masks)
    singles = [_check(m[None])[0] for m in masks]
    assert batch == singles
    assert batch[0]["counts"] == "X3"  # one run of 104 zeros: groups 8 (+continuation) and 3
    assert batch[1]["counts"][0] == "0"  # zero leading zeros


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (3, 3)])
def test_tiny_masks_exhaustive(shape):
    h, w = shape
    num_px = h * w
    bits = (np.arange(2 ** num_px)[:, None] >> np.arange(num_px)) & 1
    _check(bits.astype(bool).reshape(-1, h, w))  # every possible mask of this size


def test_long_runs():
    h, w = 2000, 3000
    full = np.ones((1, h, w), bool)
    got = _check(full)
    assert len(got[0]["counts"]) > 3  # 6e6 needs several 5-bit groups
    rng = np.random.default_rng(5)
    big = np.zeros((4, h, w), bool)
    big[0, :, : w // 2] = True  # left half
    big[1, h // 3:, :] = True
    big[2, 5, 7] = True
    big[3, : h // 2, w - 1] = True
    _check(np.concatenate([full, big]))
    _check(np.concatenate([_from_runs(rng, 700, 900) for _ in range(4)]))


def test_heavy_tailed_runs():
    rng = np.random.default_rng(7)
    for h, w in [(50, 70), (129, 257), (1, 4000), (4000, 1)]:
        _check(np.concatenate([_from_runs(rng, h, w) for _ in range(5)]))


def test_empty_batch_and_zero_sized_masks():
    assert encode_rle_torch(torch.zeros((0, 5, 7), dtype=torch.bool)) == []
    assert encode_rle_torch(torch.zeros((0, 0, 0), dtype=torch.bool)) == []
    for shape in [(2, 0, 5), (3, 4, 0)]:
        got = encode_rle_torch(torch.zeros(shape, dtype=torch.bool), as_bytes=True)
        ref = _pycoco(np.zeros(shape, bool))
        assert [g["counts"] for g in got] == [r["counts"] for r in ref]
        assert [g["size"] for g in got] == [list(r["size"]) for r in ref]


def test_uint8_and_other_inputs():
    rng = np.random.default_rng(3)
    masks = _blobs(rng, 5, 37, 53) | (rng.random((5, 37, 53)) < 0.05)
    expected = encode_rle(masks)
    assert encode_rle_torch(torch.from_numpy(masks.astype(np.uint8))) == expected
    assert encode_rle_torch(torch.from_numpy(masks.astype(np.uint8) * 255)) == expected  # nonzero is fg
    assert encode_rle_torch(torch.from_numpy(masks.astype(np.float32))) == expected
    assert encode_rle_torch(masks) == expected  # numpy input
    # non-contiguous input (a transposed view)
    t = torch.from_numpy(np.ascontiguousarray(masks.transpose(0, 2, 1))).transpose(1, 2)
    assert not t.is_contiguous() and encode_rle_torch(t) == expected


def test_bad_shape_raises():
    with pytest.raises(ValueError):
        encode_rle_torch(torch.zeros((4, 4), dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_pycocotools():
    rng = np.random.default_rng(11)
    for h, w in [(1, 1), (3, 5), (101, 67), (240, 320)]:
        noise = rng.random((4, h, w)) < np.array([0.02, 0.5, 0.98, 0.3])[:, None, None]
        _check(np.concatenate([_blobs(rng, 4, h, w), noise, np.zeros((1, h, w), bool),
                               np.ones((1, h, w), bool)]), device="cuda")
    _check(np.ones((1, 2000, 3000), bool), device="cuda")
    _check(np.concatenate([_from_runs(rng, 700, 900) for _ in range(3)]), device="cuda")
    masks = _blobs(rng, 3, 64, 48)
    assert encode_rle_torch(torch.from_numpy(masks.astype(np.uint8)).cuda()) == encode_rle(masks)
