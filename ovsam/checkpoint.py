"""Every state-dict conversion and the project's single-file checkpoint format.

Project format: one safetensors file whose metadata holds ``format``, ``format_version``, the model config JSON,
and optionally a vocabulary reference; tensors are the model's state dict. Foreign files (Meta's SAM checkpoints,
the released OV-SAM ``.pth`` files) load through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ModelConfig, config_from_dict

logger = logging.getLogger(__name__)

FORMAT = "ovsam-checkpoint"
FORMAT_VERSION = "1"


def _is_safetensors(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def is_project_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a safetensors file written by :func:`save_checkpoint`."""
    if not Path(path).is_file() or not _is_safetensors(path):
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("format") == FORMAT


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_config(path: str | Path) -> ModelConfig:
    """The model config stored in a project checkpoint."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ovsam checkpoint (metadata format={meta.get('format')!r})")
    return config_from_dict(json.loads(meta["config"]))


def save_checkpoint(
    model: nn.Module, path: str | Path, *, vocabulary: Mapping[str, Any] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` (config + weights, + optional vocabulary reference) to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    if vocabulary is not None:
        meta["vocabulary"] = json.dumps(dict(vocabulary))
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a pickle read with ``weights_only=True``.

    A ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code objects are refused by weights_only
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def read_model_weights(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """State dict for ``config`` from a project checkpoint or (for SAM configs) a Meta SAM checkpoint.

    A released OV-SAM part or a SAM checkpoint given for an OV-SAM model is refused with a pointer to
    :func:`convert_official`.
    """
    state = read_state_dict(path)
    if config.kind == "ovsam" and not is_project_checkpoint(path):
        prefixes = {k.split(".", 1)[0] for k in state}
        if "image_encoder" in prefixes:
            raise ValueError(f"{path} is a SAM checkpoint (image_encoder.*); load it into a sam-* model, or "
                             "assemble OV-SAM from the released files with `ovsam convert-official`")
        if prefixes & {"neck_student", "fpn_neck", "mask_decoder"}:
            raise ValueError(f"{path} is a released OV-SAM part ({', '.join(sorted(prefixes))}); assemble the "
                             "model with `ovsam convert-official` first")
    return state


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; raise ``ValueError`` naming missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise ValueError(_key_report(source, missing, unexpected, mismatched))
    model.load_state_dict(state, strict=True)


def _key_report(source: str, missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 20) -> str:
    lines = [f"{source}: state dict does not match the model"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"  {len(keys)} {title}: {shown}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The released OV-SAM files (OVSAM_SPEC §2)
# ---------------------------------------------------------------------------------------------------------------

#: (file role, prefix inside the released file, submodule of OvsamModel)
RELEASED_PARTS = (
    ("sam", "prompt_encoder", "prompt_encoder"),
    ("sam2clip", "neck_student", "neck"),
    ("clip2sam", "fpn_neck", "fpn_neck"),
    ("clip2sam", "mask_decoder", "mask_decoder"),
)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def _check_part(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str) -> list[str]:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        return [_key_report(source, missing, unexpected, mismatched)]
    return []


def read_clip_state_dict(clip: str | Path, config: Any) -> dict[str, torch.Tensor]:
    """CLIP weights in open_clip's layout (which for OpenAI RN models is OpenAI's own) as float32.

    ``clip`` is an open_clip pretrained tag (e.g. ``openai``; open_clip downloads into its cache) or a local file:
    an OpenAI TorchScript archive (``RN50x16.pt``; its tensors are read with ``torch.jit.load``, which runs no
    pickled Python), a safetensors file or a plain state dict (read with ``weights_only=True``).
    """
    path = Path(str(clip))
    if path.is_file():
        import zipfile

        state: Mapping[str, torch.Tensor] | None = None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                is_torchscript = any(n.endswith("/code/__torch__.py") or "/code/" in n for n in z.namelist())
            if is_torchscript:
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        if state is None:
            state = read_state_dict(path)
    else:
        from .modeling.clip_backbone import create_clip

        if config.clip.model_cfg is not None:
            raise ValueError(f"--clip {clip!r} is not a file, and CLIP '{config.clip.name}' has no pretrained tags")
        state = create_clip(config.clip, pretrained=str(clip)).state_dict()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}


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
) -> nn.Module:
    """Assemble the published OV-SAM from its released files and optionally save it in the project format.

    Arguments:
      clip: OpenAI CLIP RN50x16: an open_clip tag (``openai``) or a local file (see :func:`read_clip_state_dict`).
      sam: a SAM ViT-H checkpoint; its ``prompt_encoder.*`` keys are used.
      sam2clip: ``sam2clip_vith_rn50x16.pth`` (``neck_student.*``).
      clip2sam: ``clip2sam_{coco,lvis}_rn50x16.pth`` (``fpn_neck.*`` and ``mask_decoder.*``).
      output: where to write the project checkpoint (config + weights), or None.
      roi_size: the head's RoIAlign size; default 12, or 7 with ``vocabulary='lvis'`` (the published LVIS test
        configuration; the CLIP2SAM heads were trained at 12).
      vocabulary: the default vocabulary recorded in the checkpoint (a built-in name or a path), or None.

    Every file may be a bare state dict or wrapped as ``{'state_dict': ...}``. Loading is strict per file: missing,
    unexpected and mis-shaped keys are reported with the file's name. Returns the model in eval mode.
    """
    import dataclasses

    from .build import build_model
    from .config import OvsamConfig, load_config

    config = load_config(model)
    if not isinstance(config, OvsamConfig):
        raise ValueError(f"convert_official builds OV-SAM models; '{model}' is a {config.kind} model")
    if roi_size is None and vocabulary == "lvis":
        roi_size = 7
    if roi_size is not None:
        config = dataclasses.replace(config, recognition=dataclasses.replace(config.recognition, roi_size=roi_size))
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    files = {"sam": Path(sam), "sam2clip": Path(sam2clip), "clip2sam": Path(clip2sam)}
    states = {role: read_state_dict(path) for role, path in files.items()}
    for role, state in states.items():
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        logger.info("%s (%s): %d tensors under prefixes %s", files[role], role, len(state), prefixes)

    merged: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for role, file_prefix, module in RELEASED_PARTS:
        part = _strip_prefix(states[role], file_prefix)
        want = _strip_prefix(expected, module)
        if not part:
            found = sorted({k.split(".", 1)[0] for k in states[role]})
            problems.append(f"{files[role]}: no '{file_prefix}.*' keys (found prefixes {found}); is this the "
                            f"{role} file?")
            continue
        problems += _check_part(want, part, f"{files[role]} ['{file_prefix}.*']")
        merged.update({f"{module}.{k}": v for k, v in part.items()})
    pe = _strip_prefix(states["clip2sam"], "pe")
    if pe:
        sam_pe = _strip_prefix(states["sam"], "prompt_encoder")
        same = set(pe) == set(sam_pe) and all(torch.equal(pe[k], sam_pe[k]) for k in pe)
        if not same:
            logger.warning("%s holds a prompt encoder ('pe.*') that differs from %s; using the SAM one, as "
                           "published", files["clip2sam"], files["sam"])

    clip_state = read_clip_state_dict(clip, config)
    visual = {k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
    text = {k: v for k, v in clip_state.items() if not k.startswith("visual.")}
    problems += _check_part(_strip_prefix(expected, "backbone.visual"), visual, f"CLIP {clip} ['visual.*']")
    problems += _check_part(_strip_prefix(expected, "text.clip"), text, f"CLIP {clip} [text tower]")
    merged.update({f"backbone.visual.{k}": v for k, v in visual.items()})
    merged.update({f"text.clip.{k}": v for k, v in text.items()})
    if problems:
        raise ValueError("cannot assemble the published model:\n" + "\n".join(problems))
    net = build_model(config)
    load_state_dict_strict(net, merged, source="released OV-SAM files")
    net.eval()
    if output is not None:
        extra = {"source_" + role: path.name for role, path in files.items()}
        extra["source_clip"] = str(clip) if not Path(str(clip)).is_file() else Path(str(clip)).name
        save_checkpoint(net, output, vocabulary=None if vocabulary is None else {"name": vocabulary}, extra=extra)
    return net


def export_released(model: nn.Module, out_dir: str | Path, stem: str = "") -> dict[str, Path]:
    """Write ``model``'s neck, FPN and head in the released layout: ``sam2clip{stem}.pth`` (``neck_student.*``)
    and ``clip2sam{stem}.pth`` (``fpn_neck.*``, ``mask_decoder.*``), as bare float32 state dicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {"sam2clip": {}, "clip2sam": {}}
    for role, file_prefix, module in RELEASED_PARTS:
        if role == "sam":
            continue
        for k, v in _strip_prefix(state, module).items():
            groups[role][f"{file_prefix}.{k}"] = v.detach().cpu().clone()
    paths = {}
    for role, tensors in groups.items():
        path = out_dir / f"{role}{stem}.pth"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(tensors, tmp)
        tmp.replace(path)
        paths[role] = path
    return paths
