"""SAM2CLIP adapter: makes frozen-CLIP features look like SAM's image embedding (OVSAM_SPEC §1.3)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn

from ..config import NeckConfig


class PatchProjection(nn.Module):
    """Projects one CLIP stage to the embedding grid: a strided conv (finer stages), a 1x1 conv (same stride) or a
    transposed conv (coarser stages). The conv sits at ``projection`` to match the released key layout."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, target_stride: int) -> None:
        super().__init__()
        if stride <= target_stride:
            k = target_stride // stride
            self.projection: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=k, stride=k)
        else:
            k = stride // target_stride
            self.projection = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class Sam2ClipNeck(nn.Module):
    """Four CLIP stages ``[B, C_l, S/s_l, S/s_l]`` -> image embedding ``[B, out_dim, S/16, S/16]``.

    Per level: projection to ``embed_dim`` at stride 16 + a learned level encoding; the levels are summed, a fixed
    positional embedding (a buffer, copied from SAM's ViT when distilling) is added, then ``depth`` SAM ViT blocks
    (windowed, with global attention at ``global_attn_indexes``) and SAM's output neck.
    """

    def __init__(self, cfg: NeckConfig, in_channels: tuple[int, ...], image_size: int) -> None:
        super().__init__()
        if image_size % cfg.patch_stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the neck stride {cfg.patch_stride}")
        grid = image_size // cfg.patch_stride
        self.grid_size = grid
        self.patch_embeds = nn.ModuleList(
            PatchProjection(c, cfg.embed_dim, s, cfg.patch_stride) for c, s in zip(in_channels, cfg.strides)
        )
        self.level_encoding = nn.Embedding(len(in_channels), cfg.embed_dim)
        self.register_buffer("pos_embed", torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(cfg.depth):
            is_global = i in cfg.global_attn_indexes
            self.blocks.append(
                Block(
                    dim=cfg.embed_dim,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    act_layer=nn.GELU,
                    use_rel_pos=True,
                    rel_pos_zero_init=True,
                    window_size=0 if is_global else cfg.window_size,
                    input_size=(grid, grid),
                )
            )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_dim, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_dim),
            nn.Conv2d(cfg.out_dim, cfg.out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_dim),
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = None
        for level, (proj, feat) in enumerate(zip(self.patch_embeds, feats)):
            y = proj(feat).permute(0, 2, 3, 1) + self.level_encoding.weight[level]
            x = y if x is None else x + y
        assert x is not None
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
