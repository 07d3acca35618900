"""What ``--prompts`` names and the defaults of each proposal source, without importing torch or transformers.

``--prompts`` is one of:

- ``sidecar``, ``grid``, ``whole-image``: prompts from each sample's json, a point grid, or the whole image;
- ``detector:<name>``: boxes of a detector, named by their class. ``<name>`` is an open-vocabulary detector from
  ``transformers`` queried with the run's vocabulary (:data:`OPEN_VOCAB_DETECTORS`), or a
  ``torchvision.models.detection`` model with a fixed class list;
- ``proposals:<name>``: class-agnostic boxes: ``owlv2``'s objectness head, or the RPN of a torchvision two-stage
  detector (``fasterrcnn_*``, ``maskrcnn_*``, ``keypointrcnn_*``).

Defaults (:func:`resolve_options`) depend on the source. Each one's origin:

=========================  ===========  =========  =============================================================
source                     score        NMS IoU    where the numbers come from
=========================  ===========  =========  =============================================================
detector:owlv2 / owlvit    0.1          0.3        transformers' ``post_process_object_detection`` threshold
                                                   (0.1, the model cards' examples); NMS 0.3 as OWL's own
                                                   image-guided post-processing (``nms_threshold=0.3``)
detector:grounding-dino,   0.35         0.5        Grounding DINO's README (``box_threshold=0.35``); the model
mm-grounding-dino                                  is NMS-free within a call, 0.5 merges what vocabulary chunks
                                                   both found
proposals:owlv2            0.0          0.3        objectness is a ranking, not a probability of a class: the
                                                   top boxes after OWL's NMS
detector:<torchvision>     0.5          1.0 (off)  as before; torchvision's detectors run per-class NMS
proposals:<torchvision>    0.0          1.0 (off)  the RPN applies its own NMS (0.7, torchvision's default)
=========================  ===========  =========  =============================================================

``--max-detections`` defaults to 100 (COCO's ``maxDets``) for every source. ``--detector-template`` defaults to
``a photo of a {}`` (the OWL-ViT / OWLv2 model cards' query form). ``--detector-nms-thresh 1.0`` turns the
class-agnostic NMS off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPT_MODES = ("sidecar", "detector", "proposals", "grid", "whole-image")

#: open-vocabulary detectors: ``--prompts detector:<key>`` -> (transformers ``model_type``, family)
OPEN_VOCAB_DETECTORS = {
    "owlv2": ("owlv2", "owl"),
    "owlvit": ("owlvit", "owl"),
    "grounding-dino": ("grounding-dino", "grounding"),
    "mm-grounding-dino": ("mm-grounding-dino", "grounding"),
}
#: class-agnostic proposal heads of open-vocabulary detectors: ``--prompts proposals:<key>``
OPEN_VOCAB_PROPOSALS = ("owlv2",)

DEFAULT_TEMPLATE = "a photo of a {}"
DEFAULT_MAX_DETECTIONS = 100
_DEFAULTS = {  # (score threshold, NMS IoU) per (mode, family)
    ("detector", "owl"): (0.1, 0.3),
    ("detector", "grounding"): (0.35, 0.5),
    ("proposals", "owl"): (0.0, 0.3),
    ("detector", "torchvision"): (0.5, 1.0),
    ("proposals", "torchvision"): (0.0, 1.0),
}


@dataclass(frozen=True)
class PromptSource:
    """A parsed ``--prompts``: ``mode`` (one of :data:`PROMPT_MODES`) and, for detectors and proposals, ``name``
    and ``family`` (``owl``, ``grounding`` or ``torchvision``)."""

    mode: str
    name: str | None = None

    @property
    def family(self) -> str | None:
        if self.name is None:
            return None
        if self.name in OPEN_VOCAB_DETECTORS:
            return OPEN_VOCAB_DETECTORS[self.name][1]
        return "torchvision"

    @property
    def open_vocabulary(self) -> bool:
        """Queried with the run's vocabulary (its labels are vocabulary classes)."""
        return self.mode == "detector" and self.family in ("owl", "grounding")

    @property
    def uses_detector(self) -> bool:
        return self.mode in ("detector", "proposals")

    @property
    def spec(self) -> str:
        return self.mode if self.name is None else f"{self.mode}:{self.name}"


def parse_prompt_source(spec: str) -> PromptSource:
    """Parse ``--prompts``; raises ``ValueError`` for an unknown mode, a missing or stray argument, and
    ``proposals:<name>`` of an open-vocabulary detector without an objectness head."""
    mode, _, arg = str(spec).partition(":")
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown --prompts {spec!r}; expected one of sidecar, grid, whole-image, "
                         f"detector:<{'|'.join(OPEN_VOCAB_DETECTORS)}|torchvision model>, "
                         f"proposals:<{'|'.join(OPEN_VOCAB_PROPOSALS)}|torchvision two-stage model>")
    if mode in ("detector", "proposals"):
        if not arg:
            example = "detector:owlv2" if mode == "detector" else "proposals:owlv2"
            raise ValueError(f"--prompts {mode} needs a model name, e.g. {example}")
        if mode == "proposals" and arg in OPEN_VOCAB_DETECTORS and arg not in OPEN_VOCAB_PROPOSALS:
            raise ValueError(f"--prompts proposals:{arg}: {arg} has no class-agnostic objectness head; "
                             f"use proposals:{' or proposals:'.join(OPEN_VOCAB_PROPOSALS)} or a torchvision "
                             "two-stage detector")
        return PromptSource(mode, arg)
    if arg:
        raise ValueError(f"--prompts {mode} takes no argument, got {spec!r}")
    return PromptSource(mode)


def parse_prompt_mode(spec: str) -> tuple[str, str | None]:
    """``--prompts`` -> ``(mode, detector name or None)``."""
    source = parse_prompt_source(spec)
    return source.mode, source.name


@dataclass(frozen=True)
class DetectorOptions:
    """Settings of a detector or proposal source, resolved (:func:`resolve_options`): boxes scoring at most
    ``score_thresh`` are dropped (OWL and Grounding DINO keep ``score > thresh`` as transformers'
    post-processing does), then class-agnostic NMS at ``nms_thresh`` (1.0: off), then the best
    ``max_detections``. ``template`` makes each synonym a text query; ``batch_size`` images go through the
    detector at once."""

    score_thresh: float
    nms_thresh: float
    max_detections: int = DEFAULT_MAX_DETECTIONS
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 8

    def __post_init__(self) -> None:
        for label, value in (("score threshold", self.score_thresh), ("NMS threshold", self.nms_thresh)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"detector {label} must be in [0, 1], got {value}")
        if int(self.max_detections) < 1 or int(self.batch_size) < 1:
            raise ValueError("max_detections and batch_size must be >= 1")
        check_template(self.template)


def check_template(template: str) -> str:
    """A query template has exactly one ``{}``; raises ``ValueError`` otherwise."""
    try:
        filled = str(template).format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"--detector-template {template!r} must contain one '{{}}' for the synonym: {e}") from None
    if str(template).count("{}") != 1 or filled == template:
        raise ValueError(f"--detector-template {template!r} must contain exactly one '{{}}' for the synonym")
    return str(template)


def resolve_options(source: PromptSource, *, score_thresh: float | None = None, nms_thresh: float | None = None,
                    max_detections: int | None = None, template: str | None = None,
                    batch_size: int | None = None) -> DetectorOptions:
    """The source's options with its defaults (module docstring) where a value is None."""
    family = source.family or "torchvision"
    default_score, default_nms = _DEFAULTS[(source.mode if source.mode == "proposals" else "detector", family)]
    return DetectorOptions(
        score_thresh=default_score if score_thresh is None else float(score_thresh),
        nms_thresh=default_nms if nms_thresh is None else float(nms_thresh),
        max_detections=DEFAULT_MAX_DETECTIONS if max_detections is None else int(max_detections),
        template=DEFAULT_TEMPLATE if template is None else str(template),
        batch_size=8 if batch_size is None else int(batch_size),
    )


def detector_options(config: Any) -> DetectorOptions:
    """The detector options of a model-stage config (``pipeline.annotate.stages.ModelStageConfig``: its
    ``prompts``, ``detector_*`` fields and ``max_detections``), with its source's defaults where unset."""
    return resolve_options(parse_prompt_source(config.prompts), score_thresh=config.detector_score_thresh,
                           nms_thresh=config.detector_nms_thresh, max_detections=config.max_detections,
                           template=config.detector_template, batch_size=config.detector_batch_size)
