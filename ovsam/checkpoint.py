"""Every state-dict conversion and the project's single-file checkpoint format.

Project format: one safetensors file whose metadata holds ``format``, ``format_version``, the model config JSON,
and optionally a vocabulary reference; tensors are the model's state dict. Foreign files (Meta's SAM checkpoints,
the released OV-SAM ``.pth`` files, CLIP weights) are read with safetensors or ``torch.load(weights_only=True)``,
never with plain pickle; OpenAI's TorchScript CLIP archives are read with ``torch.jit.load`` (OVSAM_SPEC §2).
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import ClipConfig, ModelConfig, OvsamConfig, SamConfig, config_from_dict, list_models, load_config

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
    """The string metadata of a safetensors file (empty if it has none)."""
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
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        storage = v.untyped_storage()
        # safetensors refuses tensors that share memory; copy only views and aliases (the usual state dict has none)
        if storage.data_ptr() in storages or storage.nbytes() != v.numel() * v.element_size():
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a pickle read with ``weights_only=True``.

    A ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped. A pickle holding anything but tensors and
    plain containers (custom classes, code) is refused with ``ValueError`` before any of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        raise ValueError(f"{path} is a TorchScript archive, not a weights-only checkpoint; only CLIP weights are "
                         "accepted in that form (OpenAI's RN50x16.pt, see read_clip_state_dict)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickles that would construct arbitrary objects
        raise ValueError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {e}). Only tensors in plain "
            "dicts are accepted; re-save the state dict alone (torch.save(model.state_dict(), path)) or as "
            "safetensors"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else []
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}"
                         + (f" with values of types {kinds}" if kinds else ""))
    return dict(obj)


def read_model_weights(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """State dict for ``config`` from a project checkpoint or (for SAM configs) a Meta SAM checkpoint.

    A released OV-SAM part or a SAM checkpoint given for an OV-SAM model is refused with a pointer to
    :func:`ovsam.convert.convert_official`; a SAM checkpoint of another size than ``config`` is refused naming both sizes.
    """
    state = read_state_dict(path)
    if is_project_checkpoint(path):
        return state
    if config.kind == "ovsam":
        prefixes = _prefixes(state)
        if "image_encoder" in prefixes:
            raise ValueError(f"{path} is a SAM checkpoint (image_encoder.*); load it into a sam-* model, or "
                             "assemble OV-SAM from the released files with `ovsam convert-official`")
        if set(prefixes) & {"neck_student", "fpn_neck", "mask_decoder"}:
            raise ValueError(f"{path} is a released OV-SAM part ({_prefix_summary(state)}); assemble the "
                             "model with `ovsam convert-official` first")
    elif isinstance(config, SamConfig):
        _check_sam_state(state, config, str(path))
    return state


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; raise ``ValueError`` naming missing/unexpected keys and shape mismatches."""
    problems = _check_part(model.state_dict(), state, source)
    if problems:
        raise ValueError(problems)
    model.load_state_dict(state, strict=True)


def load_sam_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load one of Meta's SAM checkpoints (``sam_vit_{h,l,b}_*.pth``) into a :class:`~ovsam.modeling.SamModel`.

    The file is a bare state dict with ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` keys, exactly
    ``segment_anything``'s names. Loading is strict; a file of another SAM size, or not a SAM file at all, raises
    ``ValueError`` naming the keys and the model the file belongs to; a model that is not a SAM model raises
    ``TypeError``. ``build_ovsam("sam-vit-b", checkpoint=path)`` loads the same way.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, SamConfig):
        raise TypeError(f"load_sam_checkpoint loads into a SAM model (sam-*); got {type(model).__name__}")
    state = read_model_weights(path, config)
    load_state_dict_strict(model, state, source=str(path))


def _check_sam_state(state: Mapping[str, torch.Tensor], config: SamConfig, source: str) -> None:
    prefixes = _prefixes(state)
    if "image_encoder" not in prefixes:
        if "vision_encoder" in prefixes:
            hint = "it looks like a Hugging Face transformers SamModel; use Meta's original sam_vit_*.pth"
        elif set(prefixes) & {"neck_student", "fpn_neck"}:
            hint = "it is a released OV-SAM part; assemble OV-SAM with `ovsam convert-official`"
        else:
            hint = "expected Meta's layout (image_encoder.*, prompt_encoder.*, mask_decoder.*)"
        raise ValueError(f"{source} is not a SAM checkpoint: found {_prefix_summary(state)}; {hint}")
    embed_key = "image_encoder.patch_embed.proj.weight"
    if embed_key not in state:
        return  # the strict load names it as missing
    width = int(state[embed_key].shape[0])
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    if (width, depth) != (config.encoder_embed_dim, config.encoder_depth):
        sizes = {}
        for name in list_models():
            other = load_config(name)
            if isinstance(other, SamConfig):
                sizes.setdefault((other.encoder_embed_dim, other.encoder_depth), name)
        match = sizes.get((width, depth))
        raise ValueError(
            f"{source}: the image encoder has width {width} ({embed_key} {tuple(state[embed_key].shape)}) and "
            f"{depth} blocks (image_encoder.blocks.*), but model '{config.name}' expects width "
            f"{config.encoder_embed_dim} and {config.encoder_depth} blocks"
            + (f"; this file is a '{match}' checkpoint, build that model instead" if match else "")
        )


def _prefixes(state: Mapping[str, Any]) -> dict[str, int]:
    return dict(sorted(Counter(k.split(".", 1)[0] for k in state).items()))


def _prefix_summary(state: Mapping[str, Any]) -> str:
    found = _prefixes(state)
    return ", ".join(f"{p}.* ({n})" for p, n in found.items()) if found else "no keys"


def _check_part(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str) -> str:
    """An empty string if ``got`` has exactly ``expected``'s keys and shapes, else a report naming the keys."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return ""
    limit = 20
    lines = [f"{source}: state dict does not match the model"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"  {len(keys)} {title}: {shown}")
    return "\n".join(lines)


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


# ---------------------------------------------------------------------------------------------------------------
# CLIP weights
# ---------------------------------------------------------------------------------------------------------------

#: Integer entries OpenAI's CLIP files carry next to the weights; open_clip drops them too.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def download_clip_weights(clip: ClipConfig, tag: str) -> Path:
    """The local file of open_clip's pretrained weights ``tag`` for ``clip.name``, downloading into open_clip's
    cache if needed (``open_clip.pretrained.download_pretrained``: the Hugging Face Hub copy when
    ``huggingface_hub`` is installed, else the original URL, e.g. OpenAI's TorchScript ``RN50x16.pt``)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    if clip.model_cfg is not None:
        raise ValueError(f"CLIP '{clip.name}' is defined inline (model_cfg) and has no pretrained tags; pass a file")
    cfg = get_pretrained_cfg(clip.name, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(clip.name)
        raise ValueError(f"CLIP {tag!r} is neither a file nor an open_clip pretrained tag of '{clip.name}'; "
                         f"available tags: {', '.join(tags) or 'none'}")
    try:
        path = download_pretrained(cfg)
    except Exception as e:
        raise OSError(f"could not fetch open_clip weights '{clip.name}' / '{tag}' ({type(e).__name__}: {e}); "
                      "download the file yourself (OpenAI's RN50x16.pt: `ovsam weights download RN50x16.pt`) and "
                      "pass its path") from e
    if not path:
        raise OSError(f"open_clip returned no file for '{clip.name}' / '{tag}'")
    return Path(path)


def read_clip_state_dict(clip: str | Path, config: OvsamConfig) -> dict[str, torch.Tensor]:
    """CLIP weights in open_clip's key layout (for OpenAI's RN models, OpenAI's own) as float32.

    ``clip`` is an existing local file or else an open_clip pretrained tag (``openai``), fetched with
    :func:`download_clip_weights`. A file may be an OpenAI TorchScript archive (``RN50x16.pt``; read with
    ``torch.jit.load``, which runs TorchScript, not pickled Python), a safetensors file, or a plain state dict
    (OpenAI or open_clip layout, optionally wrapped in ``state_dict`` and/or prefixed ``module.``) read with
    ``weights_only=True``. OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries (and a traced
    model's ``attn_mask``) are dropped; floating tensors are cast to float32 (OpenAI stores most weights in
    float16), as open_clip does.
    """
    path = Path(str(clip))
    if not path.is_file():
        if path.suffix or len(path.parts) > 1:
            raise ValueError(f"CLIP file not found: {path}")
        path = download_clip_weights(config.clip, str(clip))
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch now marks torch.jit.load deprecated; OpenAI ships CLIP only this way
            warnings.simplefilter("ignore", FutureWarning)
            state: Mapping[str, torch.Tensor] = torch.jit.load(str(path), map_location="cpu").state_dict()
        # A traced open_clip model stores its causal mask, a non-persistent buffer rebuilt at construction.
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] != "attn_mask"}
    else:
        state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    logger.info("%s (clip): %d tensors under %s", path, len(state), _prefix_summary(state))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}


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


def export_released(model: nn.Module, out_dir: str | Path, *, stem: str = "") -> dict[str, Path]:
    """Write ``model``'s neck, FPN and head in the released layout, the inverse of
    :func:`ovsam.convert.convert_official`.

    Writes ``out_dir/sam2clip{stem}.pth`` (``neck_student.*``) and ``out_dir/clip2sam{stem}.pth`` (``fpn_neck.*``,
    ``mask_decoder.*``) as bare state dicts of the model's tensors (float32 for the published model), each file
    atomically. Returns ``{"sam2clip": path, "clip2sam": path}``.
    """
    state = model.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {"sam2clip": {}, "clip2sam": {}}
    for role, file_prefix, module in RELEASED_PARTS:
        if role == "sam":
            continue
        part = _strip_prefix(state, module)
        if not part:
            raise TypeError(f"export_released needs an OV-SAM model with a '{module}' submodule; "
                             f"{type(model).__name__} has none")
        groups[role].update({f"{file_prefix}.{k}": v.detach().cpu().clone() for k, v in part.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, tensors in groups.items():
        path = out_dir / f"{role}{stem}.pth"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(tensors, tmp)
        tmp.replace(path)
        paths[role] = path
    return paths
