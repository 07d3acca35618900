"""Building a proposal source from ``--prompts`` and its options, and checking it before any work starts."""

from __future__ import annotations

from typing import Any

from pipeline.annotate.detectors.queries import TextQueries
from pipeline.annotate.detectors.spec import (OPEN_VOCAB_DETECTORS, DetectorOptions, PromptSource,
                                              parse_prompt_source)


def torchvision_detectors() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models.detection))


def check_source(source: PromptSource | str, weights: Any, *, names: list[str] | None = None,
                 synonyms: list[list[str]] | None = None, split: Any = None,
                 options: DetectorOptions | None = None) -> None:
    """What can be known without building the model: the detector exists, its weights are where they are said to
    be and of its type, ``proposals:`` names a two-stage detector, and (for an open-vocabulary detector) the
    vocabulary has a class to query. Raises ``FileNotFoundError`` or ``ValueError``."""
    from pipeline.annotate.detectors.hf import read_model_type

    source = parse_prompt_source(source) if isinstance(source, str) else source
    if not source.uses_detector:
        if weights:
            raise ValueError(f"--detector-weights is only used with --prompts detector:<name> or proposals:<name>, "
                             f"not --prompts {source.spec}")
        return
    if source.family in ("owl", "grounding"):
        read_model_type(source.name, weights)
        if source.open_vocabulary and names is not None:
            TextQueries.from_synonyms(names, synonyms or [[n] for n in names], split=split,
                                      template=options.template if options else "a photo of a {}")
        return
    available = torchvision_detectors()
    if source.name not in available:
        raise ValueError(f"unknown detector {source.name!r}: not one of transformers' open-vocabulary detectors "
                         f"({', '.join(OPEN_VOCAB_DETECTORS)}) nor a torchvision detection model "
                         f"({', '.join(available)})")
    if source.mode == "proposals":
        from pipeline.annotate.detectors.rpn import TWO_STAGE

        if source.name not in TWO_STAGE:
            raise ValueError(f"--prompts proposals:{source.name}: proposals need a two-stage detector (one with "
                             f"an RPN): {', '.join(TWO_STAGE)}")
    if not weights:
        raise ValueError(f"--prompts {source.spec} needs --detector-weights (a local state dict file)")


def build_proposer(source: PromptSource | str, weights: Any, *, options: DetectorOptions,
                   vocabulary: Any = None, device: str = "cpu", precision: str = "fp32") -> Any:
    """The callable ``images -> list[Proposals]`` of ``--prompts detector:<name>`` / ``proposals:<name>``."""
    source = parse_prompt_source(source) if isinstance(source, str) else source
    if source.family == "owl":
        from pipeline.annotate.detectors.owl import OwlDetector

        queries = None if source.mode == "proposals" else TextQueries.from_vocabulary(vocabulary, options.template)
        return OwlDetector(source.name, weights, options=options, queries=queries,
                           objectness=source.mode == "proposals", device=device, precision=precision)
    if source.family == "grounding":
        from pipeline.annotate.detectors.grounding import GroundingDetector

        return GroundingDetector(source.name, weights, options=options,
                                 queries=TextQueries.from_vocabulary(vocabulary, options.template),
                                 device=device, precision=precision)
    if source.mode == "proposals":
        from pipeline.annotate.detectors.rpn import RpnProposals

        return RpnProposals(source.name, weights, score_thresh=options.score_thresh, nms_thresh=options.nms_thresh,
                            max_detections=options.max_detections, device=device, precision=precision)
    from pipeline.annotate.proposals import TorchvisionDetector

    return TorchvisionDetector(source.name, weights, score_thresh=options.score_thresh,
                               max_detections=options.max_detections, device=device)
