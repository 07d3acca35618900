"""Frozen CLIP visual trunk (four stage maps) and the CLIP text tower, both from ``open_clip``."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ..config import ClipConfig

logger = logging.getLogger(__name__)


def create_clip(cfg: ClipConfig, pretrained: str | None = None) -> nn.Module:
    """Build the open_clip CLIP model named by ``cfg`` (random init unless ``pretrained`` is given).

    ``pretrained`` is an open_clip tag or a local checkpoint path; building a model from a config never downloads.
    """
    import copy

    import open_clip

    if cfg.model_cfg is not None:
        if pretrained is not None:
            raise ValueError(f"CLIP '{cfg.name}' is defined inline (model_cfg); it has no pretrained weights to load")
        model_cfg = copy.deepcopy(dict(cfg.model_cfg))
    else:
        if cfg.name not in open_clip.list_models():
            raise ValueError(f"Unknown open_clip model '{cfg.name}'; see open_clip.list_models()")
        if pretrained is not None:
            return open_clip.create_model(cfg.name, pretrained=pretrained)
        model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.name))
    if model_cfg.pop("custom_text", False):
        return open_clip.CustomTextCLIP(**model_cfg)
    return open_clip.CLIP(**model_cfg)


class ClipBackbone(nn.Module):
    """The frozen CLIP image trunk, returning the four stage outputs (strides 4, 8, 16, 32).

    Works with open_clip's ``ModifiedResNet`` (OpenAI RN models) and ``TimmModel`` ConvNeXt towers. Frozen: in eval
    mode (BatchNorm uses running statistics) with ``requires_grad=False``, and ``.train()`` leaves it in eval. Only
    :meth:`unfreeze` (training a model that has no pretrained CLIP, ``ovsam train --unfreeze clip``) makes it
    trainable like any module.
    """

    def __init__(self, visual: nn.Module, roi_size: int) -> None:
        super().__init__()
        self.visual = visual
        self.roi_size = roi_size
        self.is_resnet = hasattr(visual, "attnpool")
        if not self.is_resnet and not hasattr(visual, "trunk"):
            raise ValueError(f"unsupported CLIP visual tower {type(visual).__name__}; expected ModifiedResNet or TimmModel")
        if self.is_resnet:
            side = int(round((visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5))
            if side != roi_size:
                raise ValueError(f"CLIP roi_size {roi_size} does not match the attention pool grid {side}x{side}")
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def unfreeze(self) -> "ClipBackbone":
        """Make the trunk trainable: gradients flow through :meth:`forward` and ``.train()`` takes effect."""
        self.frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> "ClipBackbone":
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` is ``[B, 3, S, S]`` normalised input; returns ``[C2, C3, C4, C5]`` at strides 4/8/16/32."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._stages(x)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        v = self.visual
        if self.is_resnet:
            x = v.act1(v.bn1(v.conv1(x)))
            x = v.act2(v.bn2(v.conv2(x)))
            x = v.act3(v.bn3(v.conv3(x)))
            x = v.avgpool(x)
            c2 = v.layer1(x)
            c3 = v.layer2(c2)
            c4 = v.layer3(c3)
            c5 = v.layer4(c4)
            return [c2, c3, c4, c5]
        trunk = v.trunk
        x = trunk.stem(x)
        feats = []
        for stage in trunk.stages:
            x = stage(x)
            feats.append(x)
        return feats

    @torch.no_grad()
    def box_embeddings(self, c5: torch.Tensor, rois: torch.Tensor, stride: int = 32) -> torch.Tensor:
        """Frozen-CLIP region embeddings by box RoIAlign on C5 + CLIP's attention pool (RN models).

        ``rois`` is ``[N, 5]`` (batch index, x0, y0, x1, y1) in the network-input frame. Returns ``[N, D]``.
        """
        feats = roi_align(c5, rois, output_size=self.roi_size, spatial_scale=1.0 / stride, sampling_ratio=0,
                          aligned=True)
        return self.visual.attnpool(feats)

    @torch.no_grad()
    def mask_embeddings(self, c5: torch.Tensor, image_index: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """Frozen-CLIP region embeddings by mask pooling on the last stage (ConvNeXt towers).

        ``mask_logits`` ``[N, 1, h, w]`` are resized bilinearly to C5's size and binarised at 0; C5 is averaged inside
        the mask (denominator + 1e-8) and passed through the trunk head and the CLIP projection. Returns ``[N, D]``.
        """
        feats = c5[image_index]
        masks = F.interpolate(mask_logits, size=feats.shape[-2:], mode="bilinear", align_corners=False) > 0
        masks = masks.to(feats.dtype)
        pooled = (feats * masks).sum(dim=(2, 3)) / (masks.sum(dim=(2, 3)) + 1e-8)
        pooled = self.visual.trunk.head(pooled[:, :, None, None])
        return self.visual.head(pooled)

    @property
    def has_box_pool(self) -> bool:
        return self.is_resnet and self.roi_size > 0


class ClipText(nn.Module):
    """CLIP's text tower (open_clip ``CLIP`` with its visual tower removed) and its tokenizer."""

    def __init__(self, clip: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        clip.visual = nn.Identity()
        self.clip = clip
        self.tokenizer = tokenizer
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ClipText":
        return super().train(False)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``tokens`` ``[N, L]`` token ids -> ``[N, D]`` text embeddings (EOT feature x projection)."""
        return self.clip.encode_text(tokens, normalize=normalize)


def get_tokenizer(cfg: ClipConfig) -> Any:
    import open_clip

    if cfg.model_cfg is not None:
        context = int(cfg.model_cfg.get("text_cfg", {}).get("context_length", 77))
        return open_clip.SimpleTokenizer(context_length=context)
    return open_clip.get_tokenizer(cfg.name)
