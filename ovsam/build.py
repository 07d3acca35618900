"""``build_ovsam``: resolve a config, build the modules, load weights, move to a device. Nothing else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ModelConfig, SamConfig, list_models, load_config
from .modeling import OvsamModel, SamModel
from .modeling.clip_backbone import calibrate_random_trunk, create_clip, get_tokenizer
from .precision import set_precision

logger = logging.getLogger(__name__)

Model = OvsamModel | SamModel


def build_model(config: ModelConfig, seed: int = 0) -> Model:
    """Random-init model for ``config`` (the published training initialisation for FPN and ``roi_conv``).

    The initialisation is seeded (without touching the global RNG), so every process that builds the same
    config without a checkpoint gets the same weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(config, SamConfig):
            return SamModel(config).eval()
        clip = create_clip(config.clip)
        if config.clip.random_init == "calibrated":
            calibrate_random_trunk(clip.visual, seed)
        model = OvsamModel(config, clip, get_tokenizer(config.clip))
        model.fpn_neck.init_weights()
        model.mask_decoder.init_roi_conv()
    return model.eval()


def build_ovsam(
    name_or_config: str | Path | Mapping[str, Any] | ModelConfig | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
) -> Model:
    """Build a model by name (see :func:`list_models`), JSON path, dict or config object.

    ``checkpoint`` may be the project's own single-file format (which carries its config, so ``name_or_config``
    may then be omitted; given a model name, the file's config wins, e.g. the recognition settings a training run
    wrote; a dict, config object or JSON path of the same model overrides it) or, for ``sam-*`` models, one of
    Meta's SAM checkpoints. Weights load strictly; missing or unexpected keys and shape mismatches raise
    ``ValueError`` naming them. The model is returned in eval mode.

    ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``; see :mod:`ovsam.precision`) is the float type the
    prediction functions compute in; ``auto`` picks bf16 where ``device`` computes it natively and fp32 elsewhere.
    It is recorded as ``model.precision`` (resolved). ``compile`` wraps the image encoder and the prompt decoder
    in ``torch.compile`` with static shapes (prompt chunks are then padded to a fixed size).
    """
    from . import checkpoint as ckpt

    if name_or_config is None and checkpoint is None:
        raise ValueError(f"build_ovsam needs a model name or a checkpoint; available models: {', '.join(list_models())}")
    file_config = None
    if checkpoint is not None and ckpt.is_project_checkpoint(checkpoint):
        file_config = ckpt.read_config(checkpoint)
    if name_or_config is None:
        if file_config is None:
            raise ValueError(
                f"{checkpoint} is not a project checkpoint, so it carries no config; pass the model name too "
                f"(one of: {', '.join(list_models())})"
            )
        config = file_config
    else:
        config = load_config(name_or_config)
        by_name = isinstance(name_or_config, str) and name_or_config in list_models()
        if file_config is not None and (by_name or file_config.name != config.name):
            if file_config.name != config.name:
                logger.info("checkpoint %s holds model '%s'; building that instead of '%s'", checkpoint,
                            file_config.name, config.name)
            config = file_config
    model: nn.Module = build_model(config)
    if checkpoint is not None:
        state = ckpt.read_model_weights(checkpoint, config)
        ckpt.load_state_dict_strict(model, state, source=str(checkpoint))
    model = set_precision(model.to(device).eval(), precision)
    if compile:
        compile_model(model)
    return model


def compile_model(model: Model) -> Model:
    """``torch.compile`` the image encoder and the prompt decoder (static shapes); records ``model.compiled``."""
    model.encode_image = torch.compile(model.encode_image, dynamic=False)
    model.mask_decoder.forward = torch.compile(model.mask_decoder.forward, dynamic=False)
    model.compiled = True
    return model


__all__ = ["Model", "build_model", "build_ovsam", "compile_model", "list_models"]
