"""Open-Vocabulary SAM: segment and name anything, from one image to a corpus.

>>> import ovsam
>>> model = ovsam.build_ovsam("ovsam-tiny")
>>> vocab = ovsam.Vocabulary.from_names(["cat", "dog"], model)
>>> predictor = ovsam.OvsamPredictor(model, vocab)
"""

from .automatic import OvsamMaskGenerator
from .batch import predict_batch
from .build import build_model, build_ovsam
from .config import OvsamConfig, SamConfig, list_models, load_config
from .modeling import OvsamModel, SamModel
from .prediction import Prediction
from .predictor import OvsamPredictor
from .prompts import PromptSet
from .vocabulary import Vocabulary

__all__ = [
    "OvsamConfig", "OvsamMaskGenerator", "OvsamModel", "OvsamPredictor", "Prediction", "PromptSet", "SamConfig",
    "SamModel", "Vocabulary", "build_model", "build_ovsam", "list_models", "load_config", "predict_batch",
]
