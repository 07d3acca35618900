"""SAM2CLIP adapter: makes frozen-CLIP features look like SAM's image embedding (OVSAM_SPEC §1.3)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
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


class RelPosAttention(Attention):
    """SAM's windowed/global attention with decomposed relative positions (segment_anything ``Attention``, same
    parameters and results up to float rounding), computed without the attention map's broadcast additions.

    ``scale * q.k + q.Rh[i_q, i_k] + q.Rw[j_q, j_k]`` is one dot product of augmented vectors: the query
    ``[scale * q, q.Rh[i_q, :], q.Rw[j_q, :]]`` against the key ``[k, onehot(i_k), onehot(j_k)]``. The map is then
    a single matrix product, and it is made and consumed in chunks of at most ``chunk_elements`` entries (a global
    block's map is 16 x 4096 x 4096), so it stays in cache and its buffers are reused instead of page-faulted.
    """

    chunk_elements = 1 << 22

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        heads = B * self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, heads, H * W, -1).unbind(0)
        if self.use_rel_pos:
            rel_h = torch.einsum("bhwc,hkc->bhwk", q.reshape(heads, H, W, -1), get_rel_pos(H, H, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", q.reshape(heads, H, W, -1), get_rel_pos(W, W, self.rel_pos_w))
            dtype = rel_h.dtype
            q = torch.cat([(q * self.scale).to(dtype), rel_h.reshape(heads, H * W, H),
                           rel_w.reshape(heads, H * W, W)], -1)
            eye_h = torch.eye(H, dtype=dtype, device=x.device).repeat_interleave(W, 0)  # key (i, j) -> e_i
            eye_w = torch.eye(W, dtype=dtype, device=x.device).repeat(H, 1)  # key (i, j) -> e_j
            keys = torch.cat([eye_h, eye_w], 1).expand(heads, -1, -1)
            k = torch.cat([k.to(dtype), keys], -1)
            pad = -q.shape[-1] % 16  # zero columns change nothing and keep the matrix products on aligned kernels
            if pad:
                q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        else:
            q = q * self.scale
        out = chunked_attention(q, k, v, self.chunk_elements)
        x = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``softmax(q @ k^T) @ v`` for ``[N, L, E]`` inputs (q already scaled), building at most ``chunk_elements``
    entries of the map at a time: whole heads together where one fits, else row blocks of one head."""
    n, length, _ = q.shape
    keys = k.shape[1]
    kt = k.transpose(1, 2)
    out: torch.Tensor | None = None
    per_head = length * keys
    if per_head <= chunk_elements:
        step = max(1, chunk_elements // per_head)
        for h in range(0, n, step):
            block = torch.bmm(q[h : h + step], kt[h : h + step]).softmax(dim=-1)
            res = torch.bmm(block, v[h : h + step])
            if out is None:
                out = res.new_empty(n, length, res.shape[-1])
            out[h : h + step] = res
    else:
        rows = max(1, chunk_elements // keys)
        for h in range(n):
            for r in range(0, length, rows):
                block = torch.mm(q[h, r : r + rows], kt[h]).softmax(dim=-1)
                res = torch.mm(block, v[h])
                if out is None:
                    out = res.new_empty(n, length, res.shape[-1])
                out[h, r : r + rows] = res
    assert out is not None
    return out


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
            # the same module, parameters and initialisation, with the faster forward
            self.blocks[-1].attn.__class__ = RelPosAttention
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
