"""Frozen configuration dataclasses for every model the project builds.

One JSON file per named model lives in ``ovsam/model_configs``; ``load_config(name)`` reads it into an
:class:`OvsamConfig` (OV-SAM: CLIP trunk + SAM2CLIP neck + SAM prompt encoder + label-token decoder + CLIP2SAM
recognition) or a :class:`SamConfig` (plain SAM). ``from_dict`` rejects unknown keys by name so a typo in a config
file is an error, not a silently ignored field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)


def _from_dict(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested config dataclasses.

    Raises ``ValueError`` naming every unknown key and every missing required key.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing required key '{name}'")
            continue
        value = data[name]
        sub = _NESTED.get((cls.__name__, name))
        if sub is not None and value is not None:
            value = _from_dict(sub, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


RANDOM_INITS = ("open_clip", "calibrated")


@dataclass(frozen=True)
class ClipConfig:
    """The CLIP model whose visual trunk (frozen) and text tower (for vocabularies) OV-SAM uses.

    ``name`` is an open_clip model name (``RN50x16-quickgelu``). ``model_cfg`` replaces the registered
    architecture with an inline open_clip config (tiny test models). ``pretrained`` is the open_clip tag the
    published weights come from; building never downloads, conversion tools use it. ``random_init`` is how a
    model built without weights initialises its (frozen) visual trunk: ``open_clip`` as open_clip does for training
    from scratch, or ``calibrated`` (see :func:`ovsam.modeling.clip_backbone.calibrate_random_trunk`), which gives
    a random trunk's stages unit-scale, image-dependent outputs. Loaded weights replace either.
    """

    name: str
    stage_channels: tuple[int, ...]
    roi_size: int
    pretrained: str | None = None
    model_cfg: Mapping[str, Any] | None = None
    random_init: str = "open_clip"

    def __post_init__(self) -> None:
        if self.random_init not in RANDOM_INITS:
            raise ValueError(f"CLIP '{self.name}': unknown random_init {self.random_init!r}; expected one of "
                             f"{', '.join(RANDOM_INITS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage_channels": list(self.stage_channels),
            "roi_size": self.roi_size,
            "pretrained": self.pretrained,
            "model_cfg": None if self.model_cfg is None else json.loads(json.dumps(self.model_cfg)),
            "random_init": self.random_init,
        }


@dataclass(frozen=True)
class NeckConfig:
    """SAM2CLIP adapter: four CLIP stages -> a SAM-compatible ``[out_dim, G, G]`` image embedding."""

    strides: tuple[int, ...] = (4, 8, 16, 32)
    embed_dim: int = 1280
    out_dim: int = 256
    depth: int = 5
    num_heads: int = 16
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (4,)
    patch_stride: int = 16


@dataclass(frozen=True)
class DecoderConfig:
    """SAM prompt encoder + two-way transformer mask decoder sizes."""

    embed_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    mask_in_chans: int = 16
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class RecognitionConfig:
    """CLIP2SAM recognition head and the frozen-CLIP ensemble (OVSAM_SPEC §1.6–1.9)."""

    fpn_channels: int = 256
    roi_size: int = 12
    finest_scale: int = 56
    logit_scale: float = 4.6052
    alpha: float = 0.1
    beta: float = 0.9
    ensemble: bool = True
    label_mlp_layers: int = 3
    # The RoI a predicted mask is classified on: "mask" is the published tight box of every low-res pixel with
    # sigmoid > 0.5; "largest_component" the tight box of its largest 8-connected component, so a stray positive
    # pixel far from the object does not stretch the RoI.
    roi_box: str = "mask"


@dataclass(frozen=True)
class OvsamConfig:
    """Open-Vocabulary SAM."""

    name: str
    clip: ClipConfig
    neck: NeckConfig = field(default_factory=NeckConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    kind: str = "ovsam"
    image_size: int = 1024
    pixel_mean: tuple[float, ...] = IMAGENET_PIXEL_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_PIXEL_STD
    resize: str = "cv2"
    mask_binarize: str = "sigmoid"
    description: str = ""

    def __post_init__(self) -> None:
        _check_common(self)
        if len(self.clip.stage_channels) != 4 or len(self.neck.strides) != 4:
            raise ValueError(f"model '{self.name}': expected 4 CLIP stages, got {self.clip.stage_channels}")
        if self.recognition.roi_box not in ROI_BOX_RULES:
            raise ValueError(f"model '{self.name}': recognition.roi_box must be one of {ROI_BOX_RULES}, "
                             f"got '{self.recognition.roi_box}'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OvsamConfig":
        return _from_dict(cls, data, f"config '{data.get('name', '?')}'")

    def to_dict(self) -> dict[str, Any]:
        out = _to_jsonable(dataclasses.asdict(self))
        out["clip"] = self.clip.to_dict()
        return out


@dataclass(frozen=True)
class SamConfig:
    """Plain Segment Anything (ViT image encoder, full decoder with multimask outputs and IoU head)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    kind: str = "sam"
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    num_multimask_outputs: int = 3
    pixel_mean: tuple[float, ...] = IMAGENET_PIXEL_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_PIXEL_STD
    resize: str = "pil"
    mask_binarize: str = "logit"
    description: str = ""

    def __post_init__(self) -> None:
        _check_common(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamConfig":
        return _from_dict(cls, data, f"config '{data.get('name', '?')}'")

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))


ModelConfig = OvsamConfig | SamConfig

_NESTED: dict[tuple[str, str], type] = {
    ("OvsamConfig", "clip"): ClipConfig,
    ("OvsamConfig", "neck"): NeckConfig,
    ("OvsamConfig", "decoder"): DecoderConfig,
    ("OvsamConfig", "recognition"): RecognitionConfig,
    ("SamConfig", "decoder"): DecoderConfig,
}

RESIZE_METHODS = ("cv2", "pil")
ROI_BOX_RULES = ("mask", "largest_component")
BINARIZE_METHODS = ("sigmoid", "logit")


def _check_common(cfg: OvsamConfig | SamConfig) -> None:
    if cfg.resize not in RESIZE_METHODS:
        raise ValueError(f"model '{cfg.name}': resize must be one of {RESIZE_METHODS}, got '{cfg.resize}'")
    if cfg.mask_binarize not in BINARIZE_METHODS:
        raise ValueError(
            f"model '{cfg.name}': mask_binarize must be one of {BINARIZE_METHODS}, got '{cfg.mask_binarize}'"
        )
    if cfg.image_size % 16:
        raise ValueError(f"model '{cfg.name}': image_size must be a multiple of 16, got {cfg.image_size}")


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Parse a model config dict; ``kind`` selects OV-SAM (default) or plain SAM."""
    kind = data.get("kind", "ovsam")
    if kind == "ovsam":
        return OvsamConfig.from_dict(data)
    if kind == "sam":
        return SamConfig.from_dict(data)
    raise ValueError(f"config '{data.get('name', '?')}': unknown kind '{kind}'; valid kinds: ovsam, sam")


def list_models() -> list[str]:
    """Names of the built-in model configs (the JSON stems in ``ovsam/model_configs``)."""
    root = resources.files("ovsam") / "model_configs"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Resolve a model name, a JSON path, a dict or a config object to a config object."""
    if isinstance(name_or_path, (OvsamConfig, SamConfig)):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return config_from_dict(name_or_path)
    text = str(name_or_path)
    if text.endswith(".json") and Path(text).is_file():
        return config_from_dict(json.loads(Path(text).read_text()))
    available = list_models()
    if text not in available:
        raise ValueError(f"Unknown model '{text}'; available: {', '.join(available)}")
    data = json.loads((resources.files("ovsam") / "model_configs" / f"{text}.json").read_text())
    return config_from_dict(data)
