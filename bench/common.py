"""Shared pieces of the model benchmarks (``bench/model.py``, ``bench/scaling.py``): clocks that synchronise CUDA,
FLOP counting, the matrix-product ceilings, random vocabularies and boxes, and a description of the machine.

Nothing here loads weights: every model is randomly initialised, since the cost of a forward pass does not depend
on the values of its weights.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ovsam.runtime import freed_memory_kept

# Benchmark image: 1024 x 768 (W x H) original pixels, resized so the long side is the model's input size.
ORIGINAL_SIZE = (768, 1024)  # (H, W)


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a clock read afterwards includes it (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(FLOPs, result)`` of one call of ``fn``, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    The counter counts 2 FLOPs per multiply-add of the matrix products, convolutions and attention kernels (the
    ops that dominate these models); element-wise ops, RoIAlign and resizing count zero. Modules must have
    ``requires_grad=False`` (the counter's module tracker fails otherwise).

    Count in fp32: under ``torch.inference_mode`` (which the prediction functions use) with autocast on, the counter
    decomposes composite ops such as ``einsum`` below the autocast dispatch key, so their parts see mixed dtypes and
    fail ("expected scalar type Float but found BFloat16"). The count does not depend on the precision anyway.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return float(counter.get_total_flops()), out


def matmul_ceiling(dtype: torch.dtype, device: torch.device | str, size: int = 4096, repeats: int = 3,
                   min_seconds: float = 0.25) -> float:
    """The machine's matrix-product rate in GFLOP/s: ``size x size`` by ``size x size`` in ``dtype``.

    One untimed product first; then ``repeats`` timings of a loop of as many products as fill ``min_seconds``
    (the device synchronised around each loop); the best loop's rate is the ceiling. ``2 size^3`` FLOPs per product.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        one, _ = timed(lambda: a @ b, device)
        one, _ = timed(lambda: a @ b, device)
        n = max(1, math.ceil(min_seconds / max(one, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            seconds, _ = timed(lambda: [a @ b for _ in range(n)], device)
            best = min(best, seconds / n)
    return 2.0 * size ** 3 / best / 1e9


def random_boxes(n: int, input_size: tuple[int, int], seed: int = 0, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """``[n, 4]`` float32 xyxy boxes inside the ``input_size`` (H, W) region of the input frame, sides 5-50% of
    the image's; deterministic for a given ``seed``."""
    h, w = input_size
    rng = np.random.default_rng(seed)
    bw = rng.uniform(0.05, 0.5, n) * w
    bh = rng.uniform(0.05, 0.5, n) * h
    x0 = rng.uniform(0, 1, n) * (w - bw)
    y0 = rng.uniform(0, 1, n) * (h - bh)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.float32)
    return torch.from_numpy(boxes).to(device)


def input_size_for(image_size: int, original_size: tuple[int, int] = ORIGINAL_SIZE) -> tuple[int, int]:
    """The resized (H, W) of ``original_size`` with its long side at ``image_size`` (as ``prepare_image`` does)."""
    h, w = original_size
    scale = image_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def random_unit(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal rows of ``shape``, L2-normalised along the last dimension (float32, CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def random_vocabulary(classes: int | str, dim: int, clip_model: str, prototypes: int | None = None,
                      seed: int = 0) -> Any:
    """An ``ovsam.Vocabulary`` with random unit-norm embeddings ``[C, P, dim]`` instead of text-tower ones.

    ``classes`` is a count (classes ``class_00000``..., one synonym each, ``prototypes`` prototypes, default 1) or a
    built-in list name (``coco``, ``lvis``, ``imagenet21k``: its real names and synonyms, and by default its real P:
    17, 2 and 15). Classes with fewer synonyms than P repeat their first prototype, as ``Vocabulary.from_names``
    pads them. Scoring costs what it costs with real embeddings: the classifier's work depends only on C, P and D.
    """
    from ovsam import Vocabulary

    if isinstance(classes, str):
        names, synonyms, split = Vocabulary.class_list(classes)
        p = prototypes or max(len(s) for s in synonyms)
        if p < max(len(s) for s in synonyms):
            synonyms = [s[:p] for s in synonyms]
    else:
        if classes < 1:
            raise ValueError(f"a vocabulary needs at least one class, got {classes}")
        names = [f"class_{i:05d}" for i in range(classes)]
        synonyms = [[n] for n in names]
        split, p = None, prototypes or 1
    emb = random_unit((len(names), p, dim), seed)
    counts = torch.tensor([len(s) for s in synonyms])
    pad = torch.arange(p)[None, :] >= counts[:, None]  # [C, P]: prototypes past a class's synonyms
    emb = torch.where(pad[..., None], emb[:, :1], emb)
    return Vocabulary(names, synonyms, emb, split=split, clip_model=clip_model)


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return model, flags


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and its bf16/AMX flags, cores, torch, threads, GPU, date, and
    whether ``ovsam.runtime.keep_freed_memory`` is in effect."""
    cpu, flags = _cpu_model_and_flags()
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_flags": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16",
                                                       "avx512f", "avx2")),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "keep_freed_memory": freed_memory_kept(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def params_millions(*modules: torch.nn.Module) -> float:
    """Parameters of ``modules`` in millions (each parameter counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values()) / 1e6
