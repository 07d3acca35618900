"""ovsam.losses against direct computations (well under a second)."""

from __future__ import annotations

import math

import pytest
import torch

from ovsam import losses as L


def _direct_ce(logits: torch.Tensor, labels: torch.Tensor, bg_weight: float, loss_weight: float) -> float:
    c = logits.shape[1] - 1
    num = den = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        if y < 0:
            continue
        log_z = math.log(sum(math.exp(v) for v in row))
        w = bg_weight if y == c else 1.0
        num += w * (log_z - row[y])
        den += w
    return loss_weight * num / den


def test_classification_loss_matches_direct_formula(seed):
    logits = torch.randn(9, 6) * 3
    labels = torch.tensor([0, 4, -1, 5, 2, -1, 1, 3, 5])  # 5 = background, -1 = class-agnostic
    got = L.classification_loss(logits, labels, bg_weight=0.1, loss_weight=2.0)
    assert got.item() == pytest.approx(_direct_ce(logits, labels, 0.1, 2.0), rel=1e-5)


def test_classification_loss_ignores_agnostic_and_keeps_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([1, -1, 2])
    L.classification_loss(logits, labels).backward()
    assert torch.all(logits.grad[1] == 0) and torch.any(logits.grad[0] != 0)
    logits.grad = None
    loss = L.classification_loss(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_classification_loss_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be -1 or in"):
        L.classification_loss(torch.zeros(2, 3), torch.tensor([0, 3]))


def _bilinear(img: torch.Tensor, x: float, y: float) -> float:
    """Value of ``img [h, w]`` at normalised (x, y) in [0, 1], pixel centres at (i + 0.5) / w, zero outside."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wx = 1 - abs(px - xi)
            wy = 1 - abs(py - yi)
            if 0 <= xi < w and 0 <= yi < h:
                total += wx * wy * float(img[yi, xi])
    return total


def test_point_sample_is_bilinear_without_corner_alignment(seed):
    img = torch.randn(1, 1, 5, 7)
    coords = torch.rand(1, 20, 2)
    coords[0, 0] = torch.tensor([0.5 / 7, 0.5 / 5])  # the first pixel's centre reads the pixel exactly
    got = L.point_sample(img, coords)[0, 0]
    assert got[0].item() == pytest.approx(img[0, 0, 0, 0].item(), abs=1e-6)
    for k in range(20):
        x, y = coords[0, k].tolist()
        assert got[k].item() == pytest.approx(_bilinear(img[0, 0], x, y), abs=1e-5)


def test_uncertain_points_prefer_logits_near_zero(seed):
    logits = torch.full((2, 1, 32, 32), 20.0)
    logits[:, :, :, 16:] = -20.0
    logits[:, :, :, 10:22] = 0.0  # an uncertain band around the boundary (3/8 of the area)
    coords = L.uncertain_point_coords(logits, 400, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (2, 400, 2)
    x = coords[..., 0]
    in_band = ((x > 9.5 / 32) & (x < 22.5 / 32)).float()
    # 300 importance points should nearly all fall around the band; the 100 uniform ones mostly do not
    assert in_band[:, :300].mean() > 0.9
    assert in_band[:, 300:].mean() < 0.6


def test_mask_loss_matches_direct_computation_at_the_sampled_points(seed):
    logits = torch.randn(3, 1, 16, 16) * 4
    gt = torch.rand(3, 64, 64) > 0.5
    out = L.mask_loss(logits, gt, num_points=50, generator=torch.Generator().manual_seed(7))
    coords = L.uncertain_point_coords(logits, 50, 3.0, 0.75, generator=torch.Generator().manual_seed(7))
    bce = dice = 0.0
    for i in range(3):
        p = [_bilinear(logits[i, 0], *coords[i, k].tolist()) for k in range(50)]
        g = [_bilinear(gt[i].float(), *coords[i, k].tolist()) for k in range(50)]
        bce += sum(max(a, 0) - a * b + math.log1p(math.exp(-abs(a))) for a, b in zip(p, g)) / 50
        s = [1 / (1 + math.exp(-a)) for a in p]
        dice += 1 - (2 * sum(a * b for a, b in zip(s, g)) + 1) / (sum(s) + sum(g) + 1)
    assert out["loss_mask"].item() == pytest.approx(5.0 * bce / 3, rel=1e-4)
    assert out["loss_dice"].item() == pytest.approx(5.0 * dice / 3, rel=1e-4)


def test_mask_loss_normaliser_and_empty_input(seed):
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    gt = torch.rand(2, 8, 8) > 0.5
    a = L.mask_loss(logits, gt, num_points=30, generator=torch.Generator().manual_seed(1))
    b = L.mask_loss(logits, gt, num_points=30, num_masks=4.0, generator=torch.Generator().manual_seed(1))
    assert b["loss_mask"].item() == pytest.approx(a["loss_mask"].item() / 2, rel=1e-6)
    c = L.mask_loss(logits, gt, num_points=30, num_masks=0.0, generator=torch.Generator().manual_seed(1))
    assert c["loss_dice"].item() == pytest.approx(a["loss_dice"].item() * 2, rel=1e-6)  # clamped to 1
    empty = L.mask_loss(logits[:0], gt[:0])
    assert empty["loss_mask"].item() == 0.0 and empty["loss_mask"].requires_grad


def test_mask_loss_is_lower_for_the_right_mask(seed):
    gt = torch.zeros(1, 32, 32, dtype=torch.bool)
    gt[0, 8:24, 8:24] = True
    good = (gt.float() * 20 - 10)[:, None]
    bad = -good
    lg = L.mask_loss(good, gt, num_points=200)
    lb = L.mask_loss(bad, gt, num_points=200)
    assert lg["loss_mask"] < lb["loss_mask"] and lg["loss_dice"] < lb["loss_dice"]
