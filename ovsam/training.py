"""What is trained in each OV-SAM stage, and the published optimiser and schedules (OVSAM_SPEC §4.2-4.3).

Stage ``sam2clip`` (distillation) trains the SAM2CLIP neck; stage ``clip2sam`` trains the FPN and the mask
decoder with its label token, label MLP and ``roi_conv``. Everything else (the CLIP towers, the prompt encoder,
and the neck in ``clip2sam``) is frozen and kept in eval mode.

``clip2sam`` can also train the CLIP image trunk and the neck (``UNFREEZABLE``). The published recipe starts from a
pretrained CLIP and a neck distilled from SAM; a model with neither (a random-init ``ovsam-tiny`` on a synthetic
world) has to learn its features somewhere, and these make it learn them from the CLIP2SAM losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

Stage = Literal["sam2clip", "clip2sam"]
TRAINABLE: dict[str, tuple[str, ...]] = {"sam2clip": ("neck",), "clip2sam": ("fpn_neck", "mask_decoder")}
# The modules `ovsam train --unfreeze` may add to a stage's trainable set, by their flag name.
UNFREEZABLE: dict[str, dict[str, str]] = {"sam2clip": {}, "clip2sam": {"clip": "backbone", "neck": "neck"}}
# mmengine's norm_decay_mult applies to torch's own norm classes only, so LayerNorm2d (SAM's, inside the neck)
# is decayed like any other weight in the published runs.
NO_DECAY_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                                                nn.InstanceNorm2d)


def _check_stage(stage: str) -> None:
    if stage not in TRAINABLE:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {', '.join(TRAINABLE)}")


def trainable_modules(stage: Stage, unfreeze: Iterable[str] = ()) -> tuple[str, ...]:
    """The model attributes trained in ``stage``: ``TRAINABLE[stage]`` plus the ``UNFREEZABLE`` ones named."""
    _check_stage(stage)
    extra = []
    for flag in unfreeze:
        if flag not in UNFREEZABLE[stage]:
            allowed = ", ".join(UNFREEZABLE[stage]) or "nothing"
            raise ValueError(f"stage {stage} cannot unfreeze {flag!r}; it can unfreeze {allowed}")
        extra.append(UNFREEZABLE[stage][flag])
    return TRAINABLE[stage] + tuple(m for m in dict.fromkeys(extra) if m not in TRAINABLE[stage])


def set_trainable(model: nn.Module, stage: Stage, unfreeze: Iterable[str] = ()) -> list[nn.Parameter]:
    """Freeze everything but the stage's modules (:func:`trainable_modules`); returns the trainable parameters.

    Frozen modules are put in eval mode by :func:`train_mode`; call it instead of ``model.train()``."""
    names = trainable_modules(stage, unfreeze)
    model.requires_grad_(False)
    for name, module in model.named_children():
        if name not in names and hasattr(module, "freeze"):
            module.freeze()
    params: list[nn.Parameter] = []
    for name in names:
        module = getattr(model, name)
        if hasattr(module, "unfreeze"):
            module.unfreeze()
        module.requires_grad_(True)
        params.extend(module.parameters())
    return params


def train_mode(model: nn.Module, stage: Stage, unfreeze: Iterable[str] = ()) -> nn.Module:
    """``model.eval()`` with only the stage's trainable modules in train mode."""
    model.eval()
    for name in trainable_modules(stage, unfreeze):
        getattr(model, name).train()
    return model


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule settings. Defaults are CLIP2SAM's (§4.3); :func:`published_optim` gives each stage's."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad_norm: float | None = 0.01
    warmup_steps: int = 500
    warmup_factor: float = 1e-3
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[float, ...] = (8 / 12, 11 / 12)  # fractions of the run: epochs 8 and 11 of 12
    gamma: float = 0.1
    eta_min_ratio: float = 0.01  # cosine floor, as a fraction of lr


def published_optim(stage: Stage) -> OptimConfig:
    """The published settings: SAM2CLIP clips at 5.0 with a cosine schedule; CLIP2SAM clips at 0.01 (sic) with
    steps at 8/12 and 11/12 of the run."""
    _check_stage(stage)
    if stage == "sam2clip":
        return OptimConfig(clip_grad_norm=5.0, schedule="cosine")
    return OptimConfig()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: weights of torch norm layers get no decay, everything else
    (biases included, as published) gets ``weight_decay``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, NO_DECAY_TYPES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (call :func:`set_trainable` first)."""
    groups = parameter_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters; call set_trainable(model, stage) first")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warm-up from ``warmup_factor`` over ``warmup_steps``,
    times the schedule (multistep: ``gamma`` per passed milestone; cosine: from 1 down to ``eta_min_ratio``)."""
    warm = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        warm = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / cfg.warmup_steps
    total = max(1, total_steps)
    if cfg.schedule == "multistep":
        passed = sum(step >= round(m * total) for m in cfg.milestones)
        main = cfg.gamma ** passed
    elif cfg.schedule == "cosine":
        t = min(step, total) / total
        main = cfg.eta_min_ratio + (1 - cfg.eta_min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif cfg.schedule == "constant":
        main = 1.0
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected multistep, cosine or constant")
    return warm * main


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler for :func:`lr_factor`; its ``state_dict`` resumes it at the saved step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm`` (skipped when None); returns the norm before."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class MixedPrecision:
    """Training at a precision: the forward pass under ``torch.autocast`` to bf16 or fp16 (none for fp32), while
    the parameters, their gradients and the optimiser state stay fp32 (the master weights); fp16 scales the loss
    with a ``torch.amp.GradScaler`` so small gradients survive, and skips steps whose gradients overflowed.

    ``precision`` is resolved for ``device`` (``auto``: bf16 where the device computes it natively, else fp32;
    :func:`ovsam.precision.resolve_precision`); :attr:`precision` is the resolved name. The autocast device type
    is the device's, so the same code runs on CPU and CUDA. A step: ``with mp.autocast(): loss = ...``, then
    :meth:`backward`, the gradient sync, :meth:`unscale` (before clipping), :meth:`step`."""

    def __init__(self, precision: str, device: str | torch.device) -> None:
        from .precision import DTYPES, resolve_precision

        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision != "fp32")

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring scaled gradients back to their true size (fp16; a no-op otherwise), before clipping them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return {"precision": self.precision, **({} if self.scaler is None else {"scaler": self.scaler.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
