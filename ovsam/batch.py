"""Stateless prediction: many images (any sizes) and their prompts, one backbone pass per batch.

``predict_batch`` is what the annotation pipeline calls; ``OvsamPredictor`` shares the same per-image code, so
batch and single-image results agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import transforms as T
from .masks import mask_boxes_xyxy, stability_score
from .modeling import OvsamModel, SamModel
from .modeling import recognition as R
from .prediction import Prediction
from .prompts import PromptSet, validate_prompts

DEFAULT_PROMPT_CHUNK = 64


@dataclass
class PreparedImage:
    """An image in the network-input frame: ``tensor`` ``[3, S, S]``; sizes are ``(H, W)``."""

    tensor: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def prepare_image(model: OvsamModel | SamModel, image: np.ndarray, image_format: str = "RGB") -> PreparedImage:
    """Validate, convert to RGB, resize (long side = ``image_size``), normalise and zero-pad one image."""
    rgb = T.as_rgb_uint8(image, image_format)
    resized = T.resize_longest_side(rgb, model.image_size, model.config.resize)
    x = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None]
    x = T.normalize_and_pad(x, model.pixel_mean, model.pixel_std, model.image_size)[0]
    return PreparedImage(x, (int(rgb.shape[0]), int(rgb.shape[1])), (int(resized.shape[0]), int(resized.shape[1])))


@torch.no_grad()
def encode_images(model: OvsamModel | SamModel, inputs: torch.Tensor) -> Any:
    """One backbone pass over ``[B, 3, S, S]`` inputs; returns the model's image features."""
    return model.encode_image(inputs.to(model.device))


def check_vocabulary(model: OvsamModel | SamModel, vocabulary: Any) -> None:
    if vocabulary is None:
        return
    if not isinstance(model, OvsamModel):
        raise ValueError(f"model '{model.config.name}' is a plain SAM model and cannot label masks; "
                         "use an ovsam-* model or pass vocabulary=None")
    dim = int(vocabulary.embeddings.shape[-1])
    if dim != model.text_dim:
        raise ValueError(f"vocabulary embeddings have width {dim} (CLIP '{vocabulary.clip_model}') but model "
                         f"'{model.config.name}' expects {model.text_dim} (CLIP '{model.clip_model_name}')")
    if getattr(vocabulary, "clip_model", model.clip_model_name) != model.clip_model_name:
        raise ValueError(f"vocabulary was encoded with CLIP '{vocabulary.clip_model}' but model "
                         f"'{model.config.name}' uses '{model.clip_model_name}'; rebuild it with this model")


@torch.no_grad()
def predict_prompts(
    model: OvsamModel | SamModel,
    features: Any,
    image_index: int,
    prompts: PromptSet,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    *,
    vocabulary: Any = None,
    multimask_output: bool = False,
    return_logits: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
) -> Prediction:
    """Run validated original-frame prompts of one image (``image_index`` into the batch features). Returns tensors."""
    dev = model.device
    points = None
    if prompts.point_coords is not None:
        coords = torch.as_tensor(T.apply_coords(prompts.point_coords, original_size, input_size),
                                 dtype=torch.float32, device=dev)
        points = (coords, torch.as_tensor(prompts.point_labels, dtype=torch.int64, device=dev))
    boxes = None
    if prompts.boxes is not None:
        boxes = torch.as_tensor(T.apply_boxes(prompts.boxes, original_size, input_size), dtype=torch.float32,
                                device=dev)
    masks_in = None if prompts.mask_input is None else torch.as_tensor(prompts.mask_input, device=dev)
    pred = predict_torch_prompts(model, features, image_index, points, boxes, masks_in, original_size, input_size,
                                 vocabulary=vocabulary, multimask_output=multimask_output,
                                 return_logits=return_logits, prompt_chunk=prompt_chunk)
    pred.prompt = prompts
    return pred


@torch.no_grad()
def predict_torch_prompts(
    model: OvsamModel | SamModel,
    features: Any,
    image_index: int,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    *,
    vocabulary: Any = None,
    multimask_output: bool = False,
    return_logits: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
) -> Prediction:
    """Prompts already in the input frame: ``points`` = (``[N, K, 2]``, ``[N, K]``), ``boxes`` ``[N, 4]``,
    ``mask_input`` ``[N, 1, s, s]``. Decodes in chunks of ``prompt_chunk`` prompts. Returns tensors."""
    check_vocabulary(model, vocabulary)
    if isinstance(model, OvsamModel) and multimask_output:
        raise ValueError(f"model '{model.config.name}' has a single mask token; multimask_output=True needs a SAM model")
    n = next(t.shape[0] for t in (boxes, None if points is None else points[0], mask_input) if t is not None)
    if n == 0:
        return _empty_prediction(model, original_size, vocabulary, multimask_output)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, max(n, 1), prompt_chunk):
        sl = slice(start, min(start + prompt_chunk, n))
        parts.append(_decode_chunk(
            model, features, image_index,
            None if points is None else (points[0][sl], points[1][sl]),
            None if boxes is None else boxes[sl],
            None if mask_input is None else mask_input[sl],
            vocabulary, multimask_output,
        ))
    out = {k: (None if parts[0][k] is None else torch.cat([p[k] for p in parts])) for k in parts[0]}
    low_res = out["low_res"]
    logits = T.postprocess_masks(low_res, model.image_size, input_size, original_size)
    masks = T.binarize(logits, model.config.mask_binarize)
    boxes_xyxy = mask_boxes_xyxy(masks)
    iou = out["iou"]
    if not multimask_output:
        masks, logits, boxes_xyxy, iou = masks[:, 0], logits[:, 0], boxes_xyxy[:, 0], iou[:, 0]
    pred = Prediction(
        masks=logits if return_logits else masks,
        low_res_logits=low_res,
        iou_scores=iou,
        boxes_xyxy=boxes_xyxy,
        head_embeddings=out["head"],
        clip_embeddings=out["clip"],
        clip_valid=out["valid"],
    )
    if vocabulary is not None:
        scores = out["scores"]
        pred.labels = scores[:, :-1].argmax(dim=-1)
        pred.label_scores = R.fused_probabilities(scores)
        pred.label_names = list(vocabulary.names)
    return pred


def _empty_prediction(model, original_size, vocabulary, multimask_output) -> Prediction:
    m = model.config.num_multimask_outputs if multimask_output else 1
    s = model.low_res_size
    dev = model.device
    lead = (0, m) if multimask_output else (0,)
    pred = Prediction(
        masks=torch.zeros(*lead, *original_size, dtype=torch.bool, device=dev),
        low_res_logits=torch.zeros(0, m, s, s, device=dev),
        iou_scores=torch.zeros(*lead, device=dev),
        boxes_xyxy=torch.zeros(*lead, 4, device=dev),
    )
    if vocabulary is not None:
        pred.labels = torch.zeros(0, dtype=torch.long, device=dev)
        pred.label_scores = torch.zeros(0, len(vocabulary.names), device=dev)
        pred.label_names = list(vocabulary.names)
    return pred


def _decode_chunk(model, features, image_index, points, boxes, mask_input, vocabulary, multimask_output):
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    result: dict[str, torch.Tensor | None] = {"head": None, "clip": None, "valid": None, "scores": None}
    if isinstance(model, SamModel):
        low_res, iou = model.mask_decoder(
            image_embeddings=features[image_index : image_index + 1],
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        result.update(low_res=low_res, iou=iou)
        return result
    n = sparse.shape[0]
    idx = torch.full((n,), image_index, dtype=torch.long, device=sparse.device)
    low_res, _ = model.decode(features, idx, sparse, dense)
    result.update(low_res=low_res, iou=stability_score(low_res))
    roi_boxes = R.boxes_from_mask_logits(low_res, scale=model.image_size / low_res.shape[-1],
                                         rule=model.config.recognition.roi_box)
    clip_boxes = boxes if boxes is not None else roi_boxes
    regions = model.region_embeddings(features, idx, roi_boxes, low_res, clip_boxes=clip_boxes)
    result.update(head=regions.head_embeddings, clip=regions.clip_embeddings, valid=regions.clip_valid)
    if vocabulary is not None:
        result["scores"] = model.classify(regions, vocabulary.embeddings.to(low_res.device),
                                          vocabulary.indicator.to(low_res.device))
    return result


def _as_promptset(model, prompt: Any, original_size: tuple[int, int]) -> PromptSet:
    if isinstance(prompt, PromptSet):
        return validate_prompts(original_size, prompt.point_coords, prompt.point_labels, prompt.boxes,
                                prompt.mask_input, model.low_res_size)
    if isinstance(prompt, Mapping):
        allowed = {"point_coords", "point_labels", "box", "boxes", "mask_input"}
        unknown = sorted(set(prompt) - allowed)
        if unknown:
            raise ValueError(f"unknown prompt key(s) {unknown}; valid keys: {sorted(allowed)}")
        return validate_prompts(original_size, prompt.get("point_coords"), prompt.get("point_labels"),
                                prompt.get("box", prompt.get("boxes")), prompt.get("mask_input"), model.low_res_size)
    raise ValueError(f"each prompt must be a dict (point_coords/point_labels/box/mask_input) or PromptSet, "
                     f"got {type(prompt).__name__}")


@torch.no_grad()
def predict_batch(
    model: OvsamModel | SamModel,
    images: Sequence[np.ndarray],
    prompts: Sequence[Mapping[str, Any] | PromptSet],
    vocabulary: Any = None,
    *,
    image_format: str = "RGB",
    multimask_output: bool = False,
    batch_size: int | None = None,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
) -> list[Prediction]:
    """Predict many images of different sizes with their prompts; equal to calling the predictor image by image.

    Arguments:
      images: ``HxWx3`` uint8 arrays (``HxW`` grayscale accepted) in ``image_format``.
      prompts: one per image: a dict with ``box`` (N, 4) and/or ``point_coords`` (N, K, 2) + ``point_labels``
        (N, K) [and ``mask_input``] in original pixels, or a :class:`PromptSet`.
      vocabulary: an :class:`ovsam.Vocabulary` to label masks (OV-SAM models), or None.
      batch_size: images per backbone pass (default: all).

    Returns one numpy :class:`Prediction` per image. Raises ``ValueError`` naming the image and the problem.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompt sets; pass one prompt set per image")
    check_vocabulary(model, vocabulary)
    prepared: list[PreparedImage] = []
    prompt_sets: list[PromptSet] = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        try:
            p = prepare_image(model, image, image_format)
            prompt_sets.append(_as_promptset(model, prompt, p.original_size))
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from e
        prepared.append(p)
    step = batch_size or max(len(prepared), 1)
    results: list[Prediction] = []
    for start in range(0, len(prepared), step):
        chunk = prepared[start : start + step]
        features = encode_images(model, torch.stack([p.tensor for p in chunk]))
        for j, p in enumerate(chunk):
            pred = predict_prompts(model, features, j, prompt_sets[start + j], p.original_size, p.input_size,
                                   vocabulary=vocabulary, multimask_output=multimask_output, prompt_chunk=prompt_chunk)
            results.append(pred.numpy())
    return results
