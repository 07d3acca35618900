"""The SAM2CLIP neck's attention (``RelPosAttention``) against segment_anything's ``Attention`` with shared weights."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from ovsam.config import NeckConfig
from ovsam.modeling.sam2clip_neck import RelPosAttention, Sam2ClipNeck, chunked_attention


def _pair(h: int, w: int, dim: int, heads: int, seed: int = 0) -> tuple[Attention, RelPosAttention]:
    torch.manual_seed(seed)
    ref = Attention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(h, w))
    with torch.no_grad():  # zero-initialised in SAM; random here so the relative terms matter
        ref.rel_pos_h.normal_()
        ref.rel_pos_w.normal_()
    new = RelPosAttention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(h, w))
    new.load_state_dict(ref.state_dict())
    return ref.eval(), new.eval()


@pytest.mark.parametrize(("h", "w", "dim", "heads", "batch"), [
    (14, 14, 64, 4, 3),   # a window (SAM's 14 x 14)
    (16, 16, 96, 3, 1),   # a global block's grid
    (6, 11, 32, 2, 2),    # non-square
])
@pytest.mark.parametrize("chunk", [1 << 22, 5000, 40])
def test_equals_segment_anything_attention_fp32(h: int, w: int, dim: int, heads: int, batch: int, chunk: int) -> None:
    ref, new = _pair(h, w, dim, heads)
    new.chunk_elements = chunk  # whole heads at once, groups of heads, row blocks of one head
    x = torch.randn(batch, h, w, dim)
    with torch.inference_mode():
        expected, got = ref(x), new(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_is_as_close_to_fp32_as_the_reference() -> None:
    ref, new = _pair(14, 14, 64, 4)
    x = torch.randn(2, 14, 14, 64)
    with torch.inference_mode():
        exact = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16, new16 = ref(x), new(x)
    assert new16.dtype == torch.bfloat16
    ref_err = (ref16.float() - exact).abs().max().item()
    new_err = (new16.float() - exact).abs().max().item()
    assert new_err <= 1.5 * ref_err + 1e-3, (new_err, ref_err)


def test_without_relative_positions() -> None:
    torch.manual_seed(1)
    ref = Attention(32, num_heads=2, use_rel_pos=False)
    new = RelPosAttention(32, num_heads=2, use_rel_pos=False)
    new.load_state_dict(ref.state_dict())
    x = torch.randn(1, 5, 7, 32)
    with torch.inference_mode():
        torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-6)


def test_chunked_attention_is_softmax_attention() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(6, 9, 8), torch.randn(6, 13, 8), torch.randn(6, 13, 5)
    expected = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
    for chunk in (1 << 20, 9 * 13 * 2, 13, 1):
        torch.testing.assert_close(chunked_attention(q, k, v, chunk), expected, rtol=1e-6, atol=1e-6)


def test_neck_keeps_the_released_keys_and_equals_segment_anything_blocks() -> None:
    cfg = NeckConfig(strides=(4, 8, 16, 32), embed_dim=64, out_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                     window_size=4, global_attn_indexes=(1,), patch_stride=16)
    torch.manual_seed(3)
    neck = Sam2ClipNeck(cfg, (8, 16, 32, 64), image_size=128).eval()
    sd = neck.state_dict()
    assert sd["blocks.0.attn.rel_pos_h"].shape == (2 * 4 - 1, 16)  # windowed
    assert sd["blocks.1.attn.rel_pos_w"].shape == (2 * 8 - 1, 16)  # global over the 8 x 8 grid
    with torch.no_grad():
        for name, p in neck.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    reference = copy.deepcopy(neck)
    for blk in reference.blocks:  # segment_anything's own attention, same weights
        size = ((blk.attn.rel_pos_h.shape[0] + 1) // 2, (blk.attn.rel_pos_w.shape[0] + 1) // 2)
        plain = Attention(64, num_heads=4, use_rel_pos=True, input_size=size)
        plain.load_state_dict(blk.attn.state_dict())
        blk.attn = plain
    assert all(type(b.attn) is RelPosAttention for b in neck.blocks)
    feats = [torch.randn(2, c, 128 // s, 128 // s) for c, s in zip((8, 16, 32, 64), cfg.strides)]
    with torch.inference_mode():
        torch.testing.assert_close(neck(feats), reference(feats), rtol=1e-5, atol=1e-5)
