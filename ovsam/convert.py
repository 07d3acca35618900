"""Assembling the published OV-SAM from its released files (``ovsam convert-official``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import torch

from .build import build_model
from .checkpoint import (RELEASED_PARTS, _check_part, _prefix_summary, _strip_prefix, load_state_dict_strict,
                         read_clip_state_dict, read_state_dict, save_checkpoint)
from .config import OvsamConfig, list_models, load_config
from .modeling import OvsamModel

logger = logging.getLogger(__name__)


def convert_official(
    *,
    clip: str | Path,
    sam: str | Path,
    sam2clip: str | Path,
    clip2sam: str | Path,
    output: str | Path | None = None,
    model: str = "ovsam-rn50x16",
    roi_size: int | None = None,
    vocabulary: str | None = None,
) -> OvsamModel:
    """Assemble the published OV-SAM from its released files and optionally save it in the project format.

    Arguments:
      clip: OpenAI CLIP RN50x16: an open_clip tag (``openai``) or a local file (see :func:`read_clip_state_dict`).
        Its ``visual.*`` keys become ``backbone.visual.*``, the rest (text tower) ``text.clip.*``.
      sam: a SAM ViT-H checkpoint (``sam_vit_h_4b8939.pth``); its ``prompt_encoder.*`` keys are used, the rest
        ignored.
      sam2clip: ``sam2clip_vith_rn50x16.pth``; ``neck_student.*`` becomes ``neck.*``.
      clip2sam: ``clip2sam_{coco,lvis}_rn50x16.pth``; ``fpn_neck.*`` and ``mask_decoder.*`` are used as they are.
        A ``pe.*`` copy of the prompt encoder, if present, is compared with the SAM file's and not used.
      output: where to write the project checkpoint (config + weights), or None. ``build_ovsam(checkpoint=output)``
        rebuilds the returned model from it alone.
      model: the model config to build (``ovsam-rn50x16``; other OV-SAM configs for files in the same layout).
      roi_size: the head's RoIAlign output size. None keeps the config's (12, the CLIP2SAM training size and the
        published COCO test setting), except with ``vocabulary='lvis'``, which selects 7 as the published LVIS
        test configuration does. The changed config is what gets saved.
      vocabulary: a vocabulary name recorded in the saved checkpoint's metadata, or None.

    Every released file may be a bare state dict or wrapped as ``{'state_dict': ...}``. Checks are strict and all
    run before anything is built: each part must hold every expected key with the expected shape and no other key
    under its prefix; the ``ValueError`` lists every problem by file, prefix and key. Returns the model in eval mode.
    """
    config = load_config(model)
    if not isinstance(config, OvsamConfig):
        choices = [n for n in list_models() if load_config(n).kind == "ovsam"]
        raise ValueError(f"convert_official builds OV-SAM models; '{model}' is a {config.kind} model "
                         f"(OV-SAM models: {', '.join(choices)})")
    if roi_size is None and vocabulary == "lvis":
        roi_size = 7
    if roi_size is not None:
        if int(roi_size) < 1:
            raise ValueError(f"roi_size must be a positive integer, got {roi_size}")
        config = dataclasses.replace(
            config, recognition=dataclasses.replace(config.recognition, roi_size=int(roi_size)))
    elif "lvis" in f"{vocabulary or ''} {Path(clip2sam).name}".lower():
        logger.warning("converting for LVIS with the %dx%d head RoI; the published LVIS test configuration uses "
                       "7x7 (pass roi_size=7)", config.recognition.roi_size, config.recognition.roi_size)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        expected = build_model(config).state_dict()

    files = {"sam": Path(sam), "sam2clip": Path(sam2clip), "clip2sam": Path(clip2sam)}
    states = {}
    for role, path in files.items():
        states[role] = read_state_dict(path)
        logger.info("%s (%s): %d tensors under %s", path, role, len(states[role]), _prefix_summary(states[role]))
    merged: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for role, file_prefix, module in RELEASED_PARTS:
        part = _strip_prefix(states[role], file_prefix)
        if not part:
            problems.append(f"{files[role]}: no '{file_prefix}.*' keys (found {_prefix_summary(states[role])}); "
                            f"is this the {role} file?")
            continue
        problems.append(_check_part(_strip_prefix(expected, module), part, f"{files[role]} ['{file_prefix}.*']"))
        merged.update({f"{module}.{k}": v for k, v in part.items()})
    _compare_pe_copy(states, files)

    clip_state = read_clip_state_dict(clip, config)
    visual = _strip_prefix(clip_state, "visual")
    text = {k: v for k, v in clip_state.items() if not k.startswith("visual.")}
    problems.append(_check_part(_strip_prefix(expected, "backbone.visual"), visual, f"CLIP {clip} ['visual.*']"))
    problems.append(_check_part(_strip_prefix(expected, "text.clip"), text, f"CLIP {clip} [text tower]"))
    merged.update({f"backbone.visual.{k}": v for k, v in visual.items()})
    merged.update({f"text.clip.{k}": v for k, v in text.items()})
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("cannot assemble the published model:\n" + "\n".join(problems))
    del states, clip_state

    net = build_model(config)
    load_state_dict_strict(net, merged, source="released OV-SAM files")
    net.eval()
    if output is not None:
        extra = {"source_" + role: path.name for role, path in files.items()}
        extra["source_clip"] = Path(str(clip)).name
        save_checkpoint(net, output, vocabulary=None if vocabulary is None else {"name": vocabulary}, extra=extra)
        logger.info("wrote %s (model '%s', head RoI %d)", output, config.name, config.recognition.roi_size)
    return net


def _compare_pe_copy(states: Mapping[str, Mapping[str, torch.Tensor]], files: Mapping[str, Path]) -> None:
    pe = _strip_prefix(states["clip2sam"], "pe")
    if not pe:
        return
    sam_pe = _strip_prefix(states["sam"], "prompt_encoder")
    differ = sorted(set(pe) ^ set(sam_pe)) + sorted(
        k for k in set(pe) & set(sam_pe) if pe[k].shape != sam_pe[k].shape or not torch.equal(pe[k], sam_pe[k]))
    if differ:
        logger.warning("%s holds a prompt encoder copy ('pe.*') that differs from %s ['prompt_encoder.*'] at %s; "
                       "using the SAM file's, as the published model does", files["clip2sam"], files["sam"],
                       ", ".join(differ[:10]) + (f", ... ({len(differ) - 10} more)" if len(differ) > 10 else ""))
    else:
        logger.info("%s: its 'pe.*' copy equals the SAM prompt encoder", files["clip2sam"])


__all__ = ["convert_official"]
