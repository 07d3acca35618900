"""Proposal sources of the annotation job beyond sidecar boxes: open-vocabulary detectors from transformers
(OWLv2, OWL-ViT, Grounding DINO, MM Grounding DINO) queried with the run's vocabulary, OWLv2's class-agnostic
objectness proposals, and torchvision detectors and their RPN. ``spec`` parses ``--prompts`` and holds each
source's defaults; ``build`` makes a source; nothing here imports torch or transformers until a source is built."""

from pipeline.annotate.detectors.spec import (DEFAULT_TEMPLATE, OPEN_VOCAB_DETECTORS, PROMPT_MODES,  # noqa: F401
                                              DetectorOptions, PromptSource, parse_prompt_mode, parse_prompt_source,
                                              resolve_options)
