"""Feature pyramid over the four CLIP stages; supplies the RoI features for CLIP2SAM recognition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvUnit(nn.Module):
    """A conv with an optional activation, stored at ``conv`` so keys read ``<name>.conv.weight``."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.activate = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.activate is None else self.activate(x)


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest-neighbour top-down sums, 3x3 output convs; no norm, no activation, no extra
    levels. ``[C2..C5]`` -> ``[P2..P5]`` with ``out_channels`` channels at the input strides."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvUnit(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvUnit(nn.Conv2d(out_channels, out_channels, 3, padding=1)) for _ in in_channels
        )

    def init_weights(self) -> None:
        """Xavier-uniform weights and zero biases (the published training initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
