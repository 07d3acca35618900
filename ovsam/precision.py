"""Inference precision: which float type the model computes in, and where that is native.

A model carries its resolved precision (``model.precision``: ``fp32``, ``bf16`` or ``fp16``). Reduced precisions
run the model's matrix products and convolutions under ``torch.autocast`` on the device of the tensors at hand
(CPU or CUDA through the same code) with the conv trunk in channels_last; logits, scores and embeddings are
returned as float32, masks are thresholded on float32 logits, and class scores are computed in float32.
``fp32`` runs exactly as published.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA with compute capability >= 8.0, or a CPU with
    AVX-512-BF16 or AMX (read from the CPU's flags in ``/proc/cpuinfo``; other CPUs count as not native)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where ``device`` computes it natively, else ``fp32``; other names are checked and
    returned. Raises ``ValueError`` listing the choices for an unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def model_precision(model: Any) -> str:
    """The resolved precision a model was built with (``fp32`` for a model built without one)."""
    return getattr(model, "precision", "fp32")


def autocast(model: Any, like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast to the model's precision on ``like``'s device type; a no-op for fp32."""
    precision = model_precision(model)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, dtype=DTYPES[precision])


def full_precision(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Leave autocast for float32 work (class scores) inside an autocast region."""
    return torch.autocast(like.device.type, enabled=False)


def conv_memory_format(model: Any) -> torch.memory_format:
    """channels_last for reduced precisions (where the conv kernels want it), contiguous for fp32 (as published)."""
    return torch.contiguous_format if model_precision(model) == "fp32" else torch.channels_last


def decoder_modules(model: Any) -> list[torch.nn.Module]:
    """The prompt decoder's modules that run wholly in the compute dtype (see :func:`set_precision`)."""
    head = model.mask_decoder
    if hasattr(head, "label_token"):  # OvsamHead: the label-token decoder, not the recognition layers
        return [head.mask_decoder, head.label_token]
    return [head]


def decoder_dtype(model: Any) -> torch.dtype:
    """The dtype the prompt decoder computes in (its weights' dtype)."""
    return next(decoder_modules(model)[0].parameters()).dtype


def set_precision(model: Any, precision: str) -> Any:
    """Resolve ``precision`` for the model's device and apply it: records ``model.precision`` and puts the conv
    trunk in the matching memory format.

    The image encoder and the recognition layers keep float32 weights and run under autocast. The prompt
    decoder, whose cost is elementwise work on every prompt's copy of the image embedding, is cast to the compute
    dtype and runs outside autocast, so its activations stay in that dtype instead of widening to float32 at
    every residual sum and norm (as SAM's reference bf16 ports do)."""
    resolved = resolve_precision(precision, model.device)
    model.precision = resolved
    trunk = getattr(getattr(model, "backbone", None), "visual", None)
    if trunk is not None:
        trunk.to(memory_format=conv_memory_format(model))
    for module in decoder_modules(model):
        module.to(DTYPES[resolved])
    return model


__all__ = ["PRECISIONS", "DTYPES", "autocast", "conv_memory_format", "decoder_dtype", "decoder_modules",
           "full_precision", "model_precision", "native_bf16", "resolve_precision", "set_precision"]
