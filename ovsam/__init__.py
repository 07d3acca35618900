"""Open-Vocabulary SAM: segment and name anything, from one image to a corpus.

>>> import ovsam
>>> model = ovsam.build_ovsam("ovsam-tiny")
>>> vocab = ovsam.Vocabulary.from_names(["cat", "dog"], model)
>>> predictor = ovsam.OvsamPredictor(model, vocab)

The names below are imported on first use, so ``import ovsam`` and the torch-free modules (``ovsam.config``,
``ovsam.weights``) do not load torch: the command line's help and listings stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "OvsamMaskGenerator": "automatic",
    "predict_batch": "batch",
    "build_model": "build",
    "build_ovsam": "build",
    "OvsamConfig": "config",
    "SamConfig": "config",
    "list_models": "config",
    "load_config": "config",
    "OvsamModel": "modeling",
    "SamModel": "modeling",
    "Prediction": "prediction",
    "OvsamPredictor": "predictor",
    "PromptSet": "prompts",
    "Vocabulary": "vocabulary",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .automatic import OvsamMaskGenerator
    from .batch import predict_batch
    from .build import build_model, build_ovsam
    from .config import OvsamConfig, SamConfig, list_models, load_config
    from .modeling import OvsamModel, SamModel
    from .prediction import Prediction
    from .predictor import OvsamPredictor
    from .prompts import PromptSet
    from .vocabulary import Vocabulary


def __getattr__(name: str) -> Any:
    """The public names, and the submodules as attributes (``ovsam.precision``), imported when first asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
