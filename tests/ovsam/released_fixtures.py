"""Synthesize files with the exact key names and shapes of the released OV-SAM checkpoints (random values)."""

from __future__ import annotations

from pathlib import Path

import torch

from ovsam.build import build_model
from ovsam.config import load_config
from ovsam.modeling.clip_backbone import create_clip


def _random_like(shapes: dict[str, torch.Size], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(0, dtype=torch.long)
        else:
            out[k] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return out


def write_released_files(root: Path, model_name: str = "ovsam-rn50x16", wrap_state_dict: bool = False) -> dict:
    """Write sam / sam2clip / clip2sam / clip files for ``model_name`` in the released layout.

    The SAM file holds the full SAM ViT-H key set for the prompt encoder plus a sample of image-encoder and
    decoder keys (as a real SAM checkpoint would); the CLIP file is an OpenAI-layout state dict in fp16 with the
    ``input_resolution``/``context_length``/``vocab_size`` entries OpenAI's files carry.
    """
    config = load_config(model_name)
    with torch.device("meta"):
        model = build_model(config)
        clip = create_clip(config.clip)
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    def part(prefix: str, new_prefix: str, seed: int) -> dict[str, torch.Tensor]:
        sub = {k[len(prefix) + 1:]: s for k, s in shapes.items() if k.startswith(prefix + ".")}
        return {f"{new_prefix}.{k}": v for k, v in _random_like(sub, seed).items()}

    sam = part("prompt_encoder", "prompt_encoder", 1)
    sam["image_encoder.pos_embed"] = torch.randn(1, 4, 4, 8)
    sam["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    sam2clip = part("neck", "neck_student", 2)
    clip2sam = {**part("fpn_neck", "fpn_neck", 3), **part("mask_decoder", "mask_decoder", 4)}
    clip_state = _random_like({k: v.shape for k, v in clip.state_dict().items()}, 5, dtype=torch.float16)
    clip_state.update(input_resolution=torch.tensor(384), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    files = {}
    for name, state in (("sam", sam), ("sam2clip", sam2clip), ("clip2sam", clip2sam), ("clip", clip_state)):
        path = root / f"{name}.pth"
        torch.save({"state_dict": state} if wrap_state_dict and name != "clip" else state, path)
        files[name] = path
    return files
