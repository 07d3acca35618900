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


CALIBRATION_BATCH = (8, 3, 128, 128)


@torch.no_grad()
def calibrate_random_trunk(visual: nn.Module, seed: int = 0) -> None:
    """Make a randomly initialised visual trunk a usable frozen feature extractor (``random_init: calibrated``).

    open_clip initialises a ``ModifiedResNet`` for training from scratch: the last BatchNorm of every residual
    branch has weight 0 and all running statistics are the identity, so the frozen stages' outputs are tiny
    (std ~1e-2 at stride 4 down to ~1e-3 at stride 32) and hardly depend on the image. Here every residual branch's
    last BatchNorm weight is set to 1, and every BatchNorm's running statistics are set to the exact statistics of
    a seeded batch of smooth random images (one forward pass in train mode, cumulative averaging), as data-dependent
    initialisation does. The result is deterministic for a given ``seed`` (whatever the thread count) and does not
    touch the global RNG.
    """
    norms = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    first = next(visual.parameters(), None)
    if not norms or first is None or first.is_meta:
        return
    for name, module in visual.named_modules():
        if name.startswith("layer") and hasattr(module, "bn3") and isinstance(module.bn3, nn.BatchNorm2d):
            module.bn3.weight.fill_(1.0)
    generator = torch.Generator().manual_seed(seed)
    b, c, h, w = CALIBRATION_BATCH
    coarse = torch.randn(b, c, h // 16, w // 16, generator=generator, dtype=torch.float64)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 0.25 * torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)).to(first.device)
    momenta = [m.momentum for m in norms]
    was_training, dtype = visual.training, first.dtype
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    # in float64, so that the statistics rounded to the trunk's dtype do not depend on how many threads summed them
    visual.double().train()
    try:
        backbone_forward(visual, x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        visual.to(dtype).train(was_training)


def is_modified_resnet(visual: nn.Module) -> bool:
    """Whether ``visual`` is open_clip's ``ModifiedResNet`` (OpenAI RN models); otherwise a ``TimmModel`` tower."""
    return hasattr(visual, "attnpool")


def backbone_forward(visual: nn.Module, x: torch.Tensor, num_stages: int = 4) -> list[torch.Tensor]:
    """The stage outputs ``[C2, C3, C4, C5]`` (strides 4/8/16/32) of a ``ModifiedResNet`` or a timm ConvNeXt trunk
    for normalised input ``x``; only the first ``num_stages`` stages run."""
    if is_modified_resnet(visual):
        v = visual
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        stages = [v.layer1, v.layer2, v.layer3, v.layer4]
        x = v.avgpool(x)
    else:
        stages = list(visual.trunk.stages)
        x = visual.trunk.stem(x)
    feats = []
    for stage in stages[:num_stages]:
        x = stage(x)
        feats.append(x)
    return feats


def attention_pool_first_token(pool: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """CLIP's ``AttentionPool2d`` output for ``feats`` ``[N, C, h, w]``, computing only what that output needs.

    The pool runs multi-head attention over the ``h*w + 1`` tokens (the mean token first) and keeps the first
    token's output. So only that token's query is needed, and no key or value is ever projected: for head ``h``,
    ``q_h . (W_k,h x_i + b_k,h) = (W_k,h^T q_h) . x_i + q_h . b_k,h``, whose last term is the same for every token
    and cancels in the softmax, and ``sum_i a_hi (W_v,h x_i + b_v,h) = W_v,h (sum_i a_hi x_i) + b_v,h`` since the
    weights sum to one. Equal to ``pool(feats)`` up to float rounding, at about ``4 C^2 + 4 H (h w + 1) C``
    multiply-adds per region instead of ``3 (h w + 1) C^2``. Returns ``[N, output_dim]``.
    """
    n, c = feats.shape[:2]
    heads = pool.num_heads
    d = c // heads
    x = feats.flatten(2).transpose(1, 2)  # [N, hw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
    q = F.linear(x[:, 0], pool.q_proj.weight, pool.q_proj.bias) * d ** -0.5  # [N, C]
    dtype = q.dtype  # the autocast dtype, if any: einsum is not autocast, so its operands are cast here
    x = x.to(dtype)
    u = torch.einsum("nhd,hdc->nhc", q.view(n, heads, d), pool.k_proj.weight.to(dtype).view(heads, d, c))
    attn = torch.einsum("nhc,ntc->nht", u, x).float().softmax(dim=-1).to(dtype)
    z = torch.einsum("nht,ntc->nhc", attn, x)
    out = torch.einsum("nhc,hdc->nhd", z, pool.v_proj.weight.to(dtype).view(heads, d, c)).reshape(n, c)
    return pool.c_proj(out + pool.v_proj.bias.to(dtype))


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
        self.is_resnet = is_modified_resnet(visual)
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

    def freeze(self) -> "ClipBackbone":
        """Undo :meth:`unfreeze`: no gradients, eval mode (BatchNorm on its running statistics)."""
        self.frozen = True
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "ClipBackbone":
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor, num_stages: int = 4) -> list[torch.Tensor]:
        """``x`` is ``[B, 3, S, S]`` normalised input; returns ``[C2, C3, C4, C5]`` at strides 4/8/16/32 (the first
        ``num_stages`` of them: the later stages are not run)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return backbone_forward(self.visual, x, num_stages)

    @torch.no_grad()
    def box_embeddings(self, c5: torch.Tensor, rois: torch.Tensor, stride: int = 32) -> torch.Tensor:
        """Frozen-CLIP region embeddings by box RoIAlign on C5 + CLIP's attention pool (RN models).

        ``rois`` is ``[N, 5]`` (batch index, x0, y0, x1, y1) in the network-input frame. Returns ``[N, D]``.
        """
        feats = roi_align(c5, rois, output_size=self.roi_size, spatial_scale=1.0 / stride, sampling_ratio=0,
                          aligned=True)
        return attention_pool_first_token(self.visual.attnpool, feats)

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
