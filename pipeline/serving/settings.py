"""The settings of ``ovsam serve``: the command's options, the application builder's ``args`` (``serve run
pipeline.serving.app:build_app key=value``, ``serve deploy`` config files) and what the app and the model
replicas are built from. Plain Python: the command reads its defaults without importing Ray or FastAPI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``ovsam serve`` takes (the builder's ``args``; see ``ovsam serve --help``)."""

    model: str = "ovsam-tiny"
    checkpoint: str | None = None
    vocabulary: str = "coco"
    precision: str = "auto"
    replicas: int = 1
    num_gpus_per_replica: float | None = None
    cpus_per_replica: float | None = None
    max_batch_size: int = 16
    batch_wait_ms: float = 2.0
    cache_bytes: int = 4 * 1024 ** 3
    cache_ttl: float = 1800.0
    image_store_bytes: int = 2 * 1024 ** 3
    max_body_bytes: int = 32 * 1024 ** 2
    max_pixels: int = 64 * 1024 ** 2
    request_timeout: float = 60.0
    allow_url_prefix: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)
    token_env: str | None = None
    cors_origin: list[str] = field(default_factory=list)
    label_studio_url: str | None = None
    label_studio_key_env: str | None = None
    detector: str | None = None
    detector_weights: str | None = None
    detector_score_thresh: float | None = None
    detector_nms_thresh: float | None = None
    max_detections: int | None = None
    detector_template: str | None = None
    warm_up: bool = True

    @property
    def detector_name(self) -> str | None:
        """The detector of the detect route: ``detector``, or ``owlv2`` where only ``detector_weights`` is given;
        None for a server without one."""
        return self.detector or ("owlv2" if self.detector_weights else None)

    def detector_options(self) -> Any:
        """The detector's :class:`~pipeline.annotate.detectors.spec.DetectorOptions` (its source's defaults where
        a value is None); None without a detector. Raises ``ValueError`` for an unknown detector, one without
        ``detector_weights``, or a bad option."""
        name = self.detector_name
        if name is None:
            return None
        from pipeline.annotate.detectors.spec import OPEN_VOCAB_DETECTORS, parse_prompt_source, resolve_options

        if name not in OPEN_VOCAB_DETECTORS:
            raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(OPEN_VOCAB_DETECTORS)}")
        if not self.detector_weights:
            raise ValueError(f"detector {name!r} needs detector_weights (its save_pretrained directory)")
        source = parse_prompt_source(f"detector:{name}")
        return resolve_options(source, score_thresh=self.detector_score_thresh, nms_thresh=self.detector_nms_thresh,
                               max_detections=self.max_detections, template=self.detector_template, batch_size=1)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeSettings":
        """From the builder's ``args``: ``serve run`` passes every value as a string; lists may be comma-separated
        strings, ``storage_options`` a JSON string."""
        import json

        fields = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, value in args.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(fields)}")
            kind = str(fields[name].type)
            if isinstance(value, str):
                if kind.startswith("list"):
                    value = [v for v in value.split(",") if v]
                elif kind.startswith("dict"):
                    value = json.loads(value)
                elif kind.startswith("bool"):
                    value = value.lower() in ("1", "true", "yes", "on")
                elif kind.startswith("int"):
                    value = int(value)
                elif kind.startswith("float"):
                    value = None if value.lower() in ("", "none", "auto") else float(value)
                elif value.lower() == "none" and "None" in kind:
                    value = None
            out[name] = value
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["ServeSettings"]
