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
    """State dict for ``config`` from a project checkpoint or (for SAM configs) a Meta SAM checkpoint."""
    return read_state_dict(path)


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
