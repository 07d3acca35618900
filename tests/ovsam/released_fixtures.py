"""Files in the exact layout of the released OV-SAM inputs, filled with seeded random values.

The key names and shapes are written out from OVSAM_SPEC §2.4 and the published architectures (SAM ViT-H, OpenAI
CLIP RN50x16), not read off this project's modules, so a conversion test built on them checks our key layout
against the released one:

- ``sam2clip_vith_rn50x16.pth``: 86 ``neck_student.*`` tensors.
- ``clip2sam_coco_rn50x16.pth``: 16 ``fpn_neck.*`` + 103 ``mask_decoder.*`` tensors.
- ``sam_vit_h_4b8939.pth``: the 17 ``prompt_encoder.*`` tensors of SAM ViT-H plus a sample of its
  ``image_encoder.*`` and ``mask_decoder.*`` tensors (the whole file would be 2.5 GB).
- ``RN50x16_openai_state_dict.pth``: OpenAI CLIP RN50x16 as the state dict of OpenAI's archive (924 entries, the
  layout ``open_clip.model.build_model_from_openai_state_dict`` consumes), float16 where OpenAI's
  ``convert_weights`` leaves float16.
"""

from __future__ import annotations

from pathlib import Path

import torch

Shapes = dict[str, tuple[int, ...]]

NECK_WIDTH, NECK_HEADS, NECK_DEPTH = 1280, 16, 5
CLIP_STAGES = (384, 768, 1536, 3072)
DEC = 256


def sam2clip_shapes() -> Shapes:
    """The 86 ``neck_student.*`` keys of ``sam2clip_vith_rn50x16.pth`` (OVSAM_SPEC §2.4)."""
    w, hd = NECK_WIDTH, NECK_WIDTH // NECK_HEADS
    s: Shapes = {"pos_embed": (1, 64, 64, w)}
    for i, (c, k) in enumerate(zip(CLIP_STAGES[:3], (4, 2, 1))):
        s[f"patch_embeds.{i}.projection.weight"] = (w, c, k, k)
        s[f"patch_embeds.{i}.projection.bias"] = (w,)
    s["patch_embeds.3.projection.weight"] = (CLIP_STAGES[3], w, 2, 2)  # ConvTranspose2d: [in, out, k, k]
    s["patch_embeds.3.projection.bias"] = (w,)
    s["level_encoding.weight"] = (4, w)
    for b in range(NECK_DEPTH):
        p = f"blocks.{b}."
        rel = 127 if b == 4 else 27
        s.update({p + "norm1.weight": (w,), p + "norm1.bias": (w,),
                  p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,),
                  p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
                  p + "attn.rel_pos_h": (rel, hd), p + "attn.rel_pos_w": (rel, hd),
                  p + "norm2.weight": (w,), p + "norm2.bias": (w,),
                  p + "mlp.lin1.weight": (4 * w, w), p + "mlp.lin1.bias": (4 * w,),
                  p + "mlp.lin2.weight": (w, 4 * w), p + "mlp.lin2.bias": (w,)})
    s.update({"neck.0.weight": (DEC, w, 1, 1), "neck.1.weight": (DEC,), "neck.1.bias": (DEC,),
              "neck.2.weight": (DEC, DEC, 3, 3), "neck.3.weight": (DEC,), "neck.3.bias": (DEC,)})
    return {"neck_student." + k: v for k, v in s.items()}


def fpn_shapes() -> Shapes:
    """The 16 ``fpn_neck.*`` keys of ``clip2sam_*_rn50x16.pth``."""
    s: Shapes = {}
    for i, c in enumerate(CLIP_STAGES):
        s[f"fpn_neck.lateral_convs.{i}.conv.weight"] = (DEC, c, 1, 1)
        s[f"fpn_neck.lateral_convs.{i}.conv.bias"] = (DEC,)
    for i in range(4):
        s[f"fpn_neck.fpn_convs.{i}.conv.weight"] = (DEC, DEC, 3, 3)
        s[f"fpn_neck.fpn_convs.{i}.conv.bias"] = (DEC,)
    return s


def _attention(prefix: str, internal: int) -> Shapes:
    s: Shapes = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        s[f"{prefix}.{proj}.weight"] = (internal, DEC)
        s[f"{prefix}.{proj}.bias"] = (internal,)
    s[f"{prefix}.out_proj.weight"] = (DEC, internal)
    s[f"{prefix}.out_proj.bias"] = (DEC,)
    return s


def sam_decoder_shapes(prefix: str, num_mask_tokens: int, iou_head: bool) -> Shapes:
    """SAM's two-way mask decoder keys: 1 mask token and no IoU head in OV-SAM's head, 4 and an IoU head in SAM."""
    s: Shapes = {}
    t = f"{prefix}.transformer"
    for j in range(2):
        lp = f"{t}.layers.{j}"
        s.update(_attention(f"{lp}.self_attn", DEC))
        s.update(_attention(f"{lp}.cross_attn_token_to_image", DEC // 2))
        s.update(_attention(f"{lp}.cross_attn_image_to_token", DEC // 2))
        for n in range(1, 5):
            s[f"{lp}.norm{n}.weight"] = s[f"{lp}.norm{n}.bias"] = (DEC,)
        s.update({f"{lp}.mlp.lin1.weight": (2048, DEC), f"{lp}.mlp.lin1.bias": (2048,),
                  f"{lp}.mlp.lin2.weight": (DEC, 2048), f"{lp}.mlp.lin2.bias": (DEC,)})
    s.update(_attention(f"{t}.final_attn_token_to_image", DEC // 2))
    s[f"{t}.norm_final_attn.weight"] = s[f"{t}.norm_final_attn.bias"] = (DEC,)
    if iou_head:
        s[f"{prefix}.iou_token.weight"] = (1, DEC)
    s[f"{prefix}.mask_tokens.weight"] = (num_mask_tokens, DEC)
    s.update({f"{prefix}.output_upscaling.0.weight": (DEC, 64, 2, 2), f"{prefix}.output_upscaling.0.bias": (64,),
              f"{prefix}.output_upscaling.1.weight": (64,), f"{prefix}.output_upscaling.1.bias": (64,),
              f"{prefix}.output_upscaling.3.weight": (64, 32, 2, 2), f"{prefix}.output_upscaling.3.bias": (32,)})
    for m in range(num_mask_tokens):
        mp = f"{prefix}.output_hypernetworks_mlps.{m}.layers"
        s.update({f"{mp}.0.weight": (DEC, DEC), f"{mp}.0.bias": (DEC,), f"{mp}.1.weight": (DEC, DEC),
                  f"{mp}.1.bias": (DEC,), f"{mp}.2.weight": (32, DEC), f"{mp}.2.bias": (32,)})
    if iou_head:
        hp = f"{prefix}.iou_prediction_head.layers"
        s.update({f"{hp}.0.weight": (DEC, DEC), f"{hp}.0.bias": (DEC,), f"{hp}.1.weight": (DEC, DEC),
                  f"{hp}.1.bias": (DEC,), f"{hp}.2.weight": (num_mask_tokens, DEC), f"{hp}.2.bias": (num_mask_tokens,)})
    return s


def head_shapes() -> Shapes:
    """The 103 ``mask_decoder.*`` keys of ``clip2sam_*_rn50x16.pth`` (OVSAM_SPEC §2.4)."""
    s = sam_decoder_shapes("mask_decoder.mask_decoder", num_mask_tokens=1, iou_head=False)
    s["mask_decoder.label_token.weight"] = (1, DEC)
    s.update({"mask_decoder.label_mlp.layers.0.weight": (DEC, DEC), "mask_decoder.label_mlp.layers.0.bias": (DEC,),
              "mask_decoder.label_mlp.layers.1.weight": (DEC, DEC), "mask_decoder.label_mlp.layers.1.bias": (DEC,),
              "mask_decoder.label_mlp.layers.2.weight": (768, DEC), "mask_decoder.label_mlp.layers.2.bias": (768,)})
    s["mask_decoder.roi_conv.0.conv.weight"] = (768, DEC, 1, 1)
    return s


def prompt_encoder_shapes(prefix: str = "prompt_encoder") -> Shapes:
    """SAM ViT-H's 17 prompt-encoder keys."""
    s: Shapes = {"pe_layer.positional_encoding_gaussian_matrix": (2, 128)}
    s.update({f"point_embeddings.{i}.weight": (1, DEC) for i in range(4)})
    s.update({"not_a_point_embed.weight": (1, DEC),
              "mask_downscaling.0.weight": (4, 1, 2, 2), "mask_downscaling.0.bias": (4,),
              "mask_downscaling.1.weight": (4,), "mask_downscaling.1.bias": (4,),
              "mask_downscaling.3.weight": (16, 4, 2, 2), "mask_downscaling.3.bias": (16,),
              "mask_downscaling.4.weight": (16,), "mask_downscaling.4.bias": (16,),
              "mask_downscaling.6.weight": (DEC, 16, 1, 1), "mask_downscaling.6.bias": (DEC,),
              "no_mask_embed.weight": (1, DEC)})
    return {f"{prefix}.{k}": v for k, v in s.items()}


#: A sample of SAM ViT-H's other tensors, as in ``sam_vit_h_4b8939.pth``.
SAM_VIT_H_SAMPLE: Shapes = {
    "image_encoder.pos_embed": (1, 64, 64, 1280),
    "image_encoder.patch_embed.proj.weight": (1280, 3, 16, 16),
    "image_encoder.patch_embed.proj.bias": (1280,),
    "image_encoder.blocks.0.norm1.weight": (1280,),
    "image_encoder.blocks.0.attn.rel_pos_h": (27, 80),
    "image_encoder.blocks.7.attn.rel_pos_h": (127, 80),
    "image_encoder.blocks.31.mlp.lin2.bias": (1280,),
    "image_encoder.neck.0.weight": (256, 1280, 1, 1),
    "image_encoder.neck.3.bias": (256,),
    "mask_decoder.iou_token.weight": (1, DEC),
    "mask_decoder.mask_tokens.weight": (4, DEC),
    "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (32, DEC),
    "mask_decoder.iou_prediction_head.layers.2.weight": (4, DEC),
}


def sam_vit_h_shapes() -> Shapes:
    """The SAM file: every prompt-encoder key plus :data:`SAM_VIT_H_SAMPLE`."""
    return {**SAM_VIT_H_SAMPLE, **prompt_encoder_shapes()}


def openai_rn_clip_shapes(
    width: int = 96, layers: tuple[int, ...] = (6, 8, 18, 8), grid: int = 12, embed_dim: int = 768,
    text_width: int = 768, text_layers: int = 12, context: int = 77, vocab: int = 49408,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """OpenAI CLIP ResNet keys, shapes and stored dtypes; the defaults are RN50x16 (924 entries).

    Float16 for conv/linear/attention weights and biases and ``text_projection`` (what OpenAI's ``convert_weights``
    converts), float32 for norms, embeddings, the attention-pool positional embedding and ``logit_scale``; int64
    for BatchNorm counters and the three integer entries.
    """
    half, full = torch.float16, torch.float32
    s: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def bn(prefix: str, c: int) -> None:
        for n in ("weight", "bias", "running_mean", "running_var"):
            s[f"{prefix}.{n}"] = ((c,), full)
        s[f"{prefix}.num_batches_tracked"] = ((), torch.int64)

    stem = width // 2
    s["visual.conv1.weight"] = ((stem, 3, 3, 3), half)
    bn("visual.bn1", stem)
    s["visual.conv2.weight"] = ((stem, stem, 3, 3), half)
    bn("visual.bn2", stem)
    s["visual.conv3.weight"] = ((width, stem, 3, 3), half)
    bn("visual.bn3", width)
    inplanes = width
    for li, blocks in enumerate(layers, start=1):
        planes = width * 2 ** (li - 1)
        for b in range(blocks):
            p = f"visual.layer{li}.{b}"
            cin = inplanes if b == 0 else 4 * planes
            s[f"{p}.conv1.weight"] = ((planes, cin, 1, 1), half)
            bn(f"{p}.bn1", planes)
            s[f"{p}.conv2.weight"] = ((planes, planes, 3, 3), half)
            bn(f"{p}.bn2", planes)
            s[f"{p}.conv3.weight"] = ((4 * planes, planes, 1, 1), half)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                s[f"{p}.downsample.0.weight"] = ((4 * planes, cin, 1, 1), half)
                bn(f"{p}.downsample.1", 4 * planes)
        inplanes = 4 * planes
    c5 = 32 * width
    s["visual.attnpool.positional_embedding"] = ((grid * grid + 1, c5), full)
    for proj in ("q_proj", "k_proj", "v_proj"):
        s[f"visual.attnpool.{proj}.weight"] = ((c5, c5), half)
        s[f"visual.attnpool.{proj}.bias"] = ((c5,), half)
    s["visual.attnpool.c_proj.weight"] = ((embed_dim, c5), half)
    s["visual.attnpool.c_proj.bias"] = ((embed_dim,), half)

    w = text_width
    s["positional_embedding"] = ((context, w), full)
    s["text_projection"] = ((w, embed_dim), half)
    s["logit_scale"] = ((), full)
    s["token_embedding.weight"] = ((vocab, w), full)
    for i in range(text_layers):
        p = f"transformer.resblocks.{i}"
        s.update({f"{p}.attn.in_proj_weight": ((3 * w, w), half), f"{p}.attn.in_proj_bias": ((3 * w,), half),
                  f"{p}.attn.out_proj.weight": ((w, w), half), f"{p}.attn.out_proj.bias": ((w,), half),
                  f"{p}.ln_1.weight": ((w,), full), f"{p}.ln_1.bias": ((w,), full),
                  f"{p}.mlp.c_fc.weight": ((4 * w, w), half), f"{p}.mlp.c_fc.bias": ((4 * w,), half),
                  f"{p}.mlp.c_proj.weight": ((w, 4 * w), half), f"{p}.mlp.c_proj.bias": ((w,), half),
                  f"{p}.ln_2.weight": ((w,), full), f"{p}.ln_2.bias": ((w,), full)})
    s["ln_final.weight"] = ((w,), full)
    s["ln_final.bias"] = ((w,), full)
    for k in ("input_resolution", "context_length", "vocab_size"):
        s[k] = ((), torch.int64)
    return s


def random_tensors(
    shapes: dict[str, tuple[int, ...]] | dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Seeded values for ``shapes`` (``{key: shape}`` or ``{key: (shape, dtype)}``): N(0, 0.02) floats, positive
    BatchNorm variances, counters and OpenAI's integer entries at plausible values."""
    g = torch.Generator().manual_seed(seed)
    ints = {"input_resolution": 384, "context_length": 77, "vocab_size": 49408}
    out: dict[str, torch.Tensor] = {}
    for key, spec in shapes.items():
        shape, dt = spec if isinstance(spec[0], tuple) else (spec, dtype)
        if not dt.is_floating_point:
            out[key] = torch.tensor(ints.get(key, 0), dtype=dt).reshape(shape)
            continue
        value = torch.randn(shape, generator=g) * 0.02
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        out[key] = value.to(dt)
    return out


RELEASED_NAMES = {
    "sam": "sam_vit_h_4b8939.pth",
    "sam2clip": "sam2clip_vith_rn50x16.pth",
    "clip2sam": "clip2sam_coco_rn50x16.pth",
    "clip": "RN50x16_openai_state_dict.pth",
}


def released_states(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The four released inputs as state dicts: ``sam``, ``sam2clip``, ``clip2sam`` and ``clip``."""
    return {
        "sam": random_tensors(sam_vit_h_shapes(), seed + 1),
        "sam2clip": random_tensors(sam2clip_shapes(), seed + 2),
        "clip2sam": random_tensors({**fpn_shapes(), **head_shapes()}, seed + 3),
        "clip": random_tensors(openai_rn_clip_shapes(), seed + 4),
    }


def write_released_files(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the four released inputs under ``root`` with their published names (bare state dicts, as released);
    returns ``{role: path}``."""
    paths = {}
    for role, state in released_states(seed).items():
        paths[role] = root / RELEASED_NAMES[role]
        torch.save(state, paths[role])
    return paths
