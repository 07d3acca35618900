"""The settings of an ``ovsam train`` run: :class:`TrainJobConfig` (plain data that travels to the Ray Train workers
as a dict), the published optimiser constants and the short-run recipe of the random-init ``ovsam-tiny`` on synthetic
data (``SYNTHETIC_RECIPE``). Shared by the command (``jobs.train``) and the per-worker loop (``jobs.train_loop``);
imports neither torch nor ray. ``jobs.train`` re-exports every name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.progress import DEFAULT_PROGRESS_EVERY
from ovsam.config import ROI_BOX_RULES
from pipeline.training.train_specs import DatasetSpec

STAGE = "clip2sam"
MODEL_FILE = "model.safetensors"
# The published optimiser (OVSAM_SPEC §4.3): AdamW lr 1e-4 for a total batch of 16, scaled linearly with the total
# batch (auto_scale_lr is on in the published configs), global gradient-norm clip 0.01; warm-up and milestones are
# fractions of --steps so short runs keep the shape of the schedule.
PUBLISHED_LR = 1e-4
PUBLISHED_BATCH = 16
PUBLISHED_CLIP = 0.01
DEFAULT_MASK_POINTS = 1024
# The short-run recipe for the random-init ovsam-tiny on `ovsam pack synthetic` data (the first example above;
# used by `make demo` and the tests), per worker on 2 workers; the module docstring says why each setting.
SYNTHETIC_RECIPE: dict[str, Any] = {"trunk_warmup": 1200, "steps": 800, "batch_size": 4, "num_prompts": 10,
                                    "lr": 2e-3, "warmup_steps": 75, "schedule": "cosine", "clip_grad_norm": None,
                                    "templates": "plain", "mask_points": 1024, "unfreeze": ("clip", "neck"),
                                    "roi_box": "largest_component"}


@dataclass(frozen=True)
class TrainJobConfig:
    """Everything the training loop needs, as plain data (it travels to the Ray Train workers as a dict)."""

    datasets: tuple[DatasetSpec, ...]
    name: str
    storage_path: str
    model: str = "ovsam-tiny"
    checkpoint: str | None = None
    heldout: tuple[tuple[str, str], ...] = ()
    steps: int = 300
    batch_size: int = 2
    lr: float | None = None  # None: PUBLISHED_LR scaled by the total batch / PUBLISHED_BATCH
    weight_decay: float = 0.05
    clip_grad_norm: float | None = PUBLISHED_CLIP
    warmup_steps: int | None = None  # None: 5% of the steps, at most the published 500
    schedule: str = "multistep"
    mask_points: int = DEFAULT_MASK_POINTS
    num_prompts: int = 40
    scale_range: tuple[float, float] = (0.9, 2.0)
    min_area: float | None = None  # None: the published 32 px scaled to the model's input size
    published_truncation: bool = False
    published_image_box: bool = False
    templates: str = "vild"
    unfreeze: tuple[str, ...] = ()  # "clip" (the CLIP image trunk) and/or "neck": trained too
    trunk_warmup: int = 0  # steps of region classification training the CLIP trunk alone, before `steps`
    roi_box: str | None = None  # recognition.roi_box of the trained model (None: the model's own)
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_at_start: bool = False
    eval_samples: int | None = None
    eval_batch_size: int = 4
    report_every: int = 10
    progress_every: float = DEFAULT_PROGRESS_EVERY  # seconds between the driver's progress lines
    quiet: bool = False  # no progress lines (the driver's summary and errors still print)
    loader_workers: int = 0
    shuffle_buffer: int = 32
    seed: int = 0
    #: float type of the forward pass (``auto``, ``fp32``, ``bf16``, ``fp16``; ``ovsam.training.MixedPrecision``),
    #: resolved on each worker's device; weights and optimiser state stay fp32
    precision: str = "fp32"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    num_to_keep: int = 2
    fault_at: tuple[int, str] | None = field(default=None, compare=False)  # tests: (step, marker file)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("at least one --dataset name=URL:kind:weight is required")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        for key in ("steps", "batch_size", "num_prompts", "checkpoint_every", "report_every", "eval_batch_size",
                    "mask_points"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"num-workers must be >= 0 (0 = in this process), got {self.num_workers}")
        if self.templates not in ("vild", "plain") and "{}" not in self.templates:
            raise ValueError(f"--templates must be vild, plain or a template containing {{}}, got {self.templates!r}")
        from ovsam.training import trainable_modules

        trainable_modules(STAGE, self.unfreeze)
        if self.roi_box is not None and self.roi_box not in ROI_BOX_RULES:
            raise ValueError(f"--roi-box must be one of {', '.join(ROI_BOX_RULES)}, got {self.roi_box!r}")
        if self.progress_every < 0:
            raise ValueError(f"progress-every must be >= 0 seconds, got {self.progress_every}")
        if self.trunk_warmup < 0:
            raise ValueError(f"trunk-warmup must be >= 0, got {self.trunk_warmup}")
        if not self.name or "/" in self.name:
            raise ValueError(f"--name must be a non-empty run name without '/', got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJobConfig:
        data = dict(data)
        data["datasets"] = tuple(DatasetSpec(**d) if isinstance(d, dict) else d for d in data["datasets"])
        data["heldout"] = tuple(tuple(h) for h in data.get("heldout", ()))
        data["scale_range"] = tuple(data.get("scale_range", (0.9, 2.0)))
        data["unfreeze"] = tuple(data.get("unfreeze", ()))
        if data.get("fault_at") is not None:
            data["fault_at"] = tuple(data["fault_at"])
        return cls(**data)

    def learning_rate(self) -> float:
        """``lr``, or the published one scaled by the total batch (``batch_size x workers``) over 16."""
        if self.lr is not None:
            return self.lr
        return PUBLISHED_LR * self.batch_size * max(self.num_workers, 1) / PUBLISHED_BATCH

    def trains_trunk(self) -> bool:
        """Whether the run changes the CLIP image trunk (``--unfreeze clip`` or a trunk warm-up)."""
        return "clip" in self.unfreeze or self.trunk_warmup > 0

    def template_list(self) -> tuple[str, ...]:
        from ovsam.templates import VILD_TEMPLATES

        return {"vild": tuple(VILD_TEMPLATES), "plain": ("{}",)}.get(self.templates, (self.templates,))

    def training_hash(self) -> str:
        """Hash of the settings that shape the training (not placement, logging or evaluation)."""
        keys = ("datasets", "model", "checkpoint", "steps", "batch_size", "lr", "weight_decay", "clip_grad_norm",
                "warmup_steps", "schedule", "mask_points", "num_prompts", "scale_range", "min_area",
                "published_truncation", "published_image_box", "templates", "seed")
        d = self.to_dict()
        hashed = {k: d[k] for k in keys}
        if self.unfreeze:  # only when set, so runs started before the flag existed still resume
            hashed["unfreeze"] = sorted(self.unfreeze)
        if self.trunk_warmup:
            hashed["trunk_warmup"] = self.trunk_warmup
        if self.precision != "fp32":  # only when set, so fp32 runs started before the flag existed still resume
            hashed["precision"] = self.precision
        return hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
