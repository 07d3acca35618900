"""Shared test helpers: seeded randomisation of weights and synthetic images."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Fill every float parameter and buffer with seeded noise (norm weights around 1, variances positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name.endswith(("pixel_mean", "pixel_std", "attn_mask")):
                continue
            noise = torch.randn(t.shape, generator=g) * scale
            if name.endswith("running_var"):
                noise = noise.abs() + 0.5
            elif ("norm" in name or ".bn" in name or "ln_" in name) and name.endswith("weight"):
                noise = noise + 1.0
            t.copy_(noise)
    return module


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    img[h // 5 : h // 2, w // 6 : w // 2] = (220, 30, 30)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 2 * h // 3) ** 2 + (xx - 2 * w // 3) ** 2 < (min(h, w) // 6) ** 2] = (30, 30, 220)
    return img
