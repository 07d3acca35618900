"""``OvsamPredictor``: SAM's predictor interface, returning masks and labels for one image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import transforms as T
from .batch import (DEFAULT_PROMPT_CHUNK, check_vocabulary, encode_images, predict_prompts, predict_torch_prompts,
                    prepare_image)
from .modeling import OvsamModel, SamModel
from .prediction import Prediction
from .prompts import validate_prompts


class OvsamPredictor:
    """Compute an image's features once, then answer many prompts.

    Mirrors ``segment_anything.SamPredictor`` (``set_image``, ``predict``, ``predict_torch``,
    ``get_image_embedding``, ``reset_image``). With an OV-SAM model and a vocabulary each mask is also labelled.
    With a ``sam-*`` model the outputs equal ``SamPredictor``'s.
    """

    def __init__(self, model: OvsamModel | SamModel, vocabulary: Any = None,
                 prompt_chunk: int = DEFAULT_PROMPT_CHUNK) -> None:
        check_vocabulary(model, vocabulary)
        self.model = model
        self.vocabulary = vocabulary
        self.prompt_chunk = prompt_chunk
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_vocabulary(self, vocabulary: Any) -> None:
        check_vocabulary(self.model, vocabulary)
        self.vocabulary = vocabulary

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the features of an ``HxWx3`` uint8 image (``HxW`` grayscale accepted) in ``image_format``."""
        prepared = prepare_image(self.model, image, image_format)
        self._set(prepared.tensor[None], prepared.original_size, prepared.input_size)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Like ``SamPredictor.set_torch_image``: ``transformed_image`` ``[1, 3, h', w']`` is the resized (not yet
        normalised or padded) image in 0–255; ``original_image_size`` is ``(H, W)``."""
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3) or \
                max(transformed_image.shape[2:]) != self.model.image_size:
            raise ValueError(f"set_torch_image expects 1x3xHxW with long side {self.model.image_size}, "
                             f"got {tuple(transformed_image.shape)}")
        x = T.normalize_and_pad(transformed_image.to(self.device), self.model.pixel_mean, self.model.pixel_std,
                                self.model.image_size)
        self._set(x, tuple(int(v) for v in original_image_size), tuple(int(v) for v in transformed_image.shape[-2:]))

    def load_features(self, features: Any, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        """Use features computed earlier for one image (``encode_images`` of its prepared tensor, batch of one,
        e.g. kept in a cache) instead of computing them again; ``original_size`` and ``input_size`` are ``(H, W)``
        as :class:`~ovsam.batch.PreparedImage` gives them."""
        self.reset_image()
        self.features = features
        self.original_size = tuple(int(v) for v in original_size)
        self.input_size = tuple(int(v) for v in input_size)
        self.is_image_set = True

    def _set(self, x: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        self.reset_image()
        self.features = encode_images(self.model, x)
        self.original_size = original_size
        self.input_size = input_size
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise ValueError("no image set: call set_image(...) before predicting")

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> Prediction:
        """Predict for prompts in original-image pixels.

        One prompt: ``point_coords (K, 2)`` with ``point_labels (K,)`` (1 foreground, 0 background) and/or
        ``box (4,)`` xyxy. Many prompts at once: ``point_coords (N, K, 2)``, ``point_labels (N, K)``, ``box (N, 4)``.
        ``mask_input (1, s, s)`` / ``(N, 1, s, s)``: low-res logits from an earlier call.
        Returns a numpy :class:`Prediction` with N rows. Invalid prompts raise ``ValueError`` naming the prompt.
        """
        self._require_image()
        prompts = validate_prompts(self.original_size, point_coords, point_labels, box, mask_input,
                                   self.model.low_res_size)
        pred = predict_prompts(self.model, self.features, 0, prompts, self.original_size, self.input_size,
                               vocabulary=self.vocabulary, multimask_output=multimask_output,
                               return_logits=return_logits, prompt_chunk=self.prompt_chunk)
        return pred.numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> Prediction:
        """Batched prompts already in the input frame (as ``SamPredictor.predict_torch``): ``point_coords``
        ``[N, K, 2]``, ``point_labels`` ``[N, K]``, ``boxes`` ``[N, 4]``, ``mask_input`` ``[N, 1, s, s]``.
        Returns a :class:`Prediction` of tensors."""
        self._require_image()
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be supplied with point_coords")
        if point_coords is None and boxes is None and mask_input is None:
            raise ValueError("no prompt given: pass point_coords/point_labels, boxes or mask_input")
        points = None if point_coords is None else (point_coords.to(self.device).float(),
                                                    point_labels.to(self.device))
        return predict_torch_prompts(
            self.model, self.features, 0, points, None if boxes is None else boxes.to(self.device).float(),
            None if mask_input is None else mask_input.to(self.device), self.original_size, self.input_size,
            vocabulary=self.vocabulary, multimask_output=multimask_output, return_logits=return_logits,
            prompt_chunk=self.prompt_chunk,
        )

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding ``[1, C, S/16, S/16]`` (float32) of the current image."""
        self._require_image()
        if isinstance(self.model, OvsamModel):
            return self.features.image_embeddings.float()
        return self.features.float()

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Any = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
