"""Stateless prediction: many images (any sizes) and their prompts, one backbone pass per batch.

``predict_batch`` is what the annotation pipeline calls; ``OvsamPredictor`` shares the same per-image code, so
batch and single-image results agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import precision as P
from . import transforms as T
from .masks import mask_boxes_xyxy, stability_score
from .modeling import OvsamModel, SamModel
from .modeling import recognition as R
from .modeling.ovsam import RegionOutput
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


@torch.inference_mode()
def encode_images(model: OvsamModel | SamModel, inputs: torch.Tensor) -> Any:
    """One backbone pass over ``[B, 3, S, S]`` inputs at the model's precision; returns the model's image
    features (in the compute dtype: bfloat16 or float16 features stay so for the decoder)."""
    x = inputs.to(model.device).contiguous(memory_format=P.conv_memory_format(model))
    with P.autocast(model, x):
        return model.encode_image(x)


@torch.inference_mode()
def features_for_prompts(model: OvsamModel | SamModel, features: Any) -> Any:
    """The part of image features that decoding prompts reads, laid out so that no decoder call has to convert
    it again: for OV-SAM, the image embedding in the decoder's dtype, the FPN levels and the last CLIP stage as
    contiguous NCHW maps (RoIAlign reads NCHW, so with channels_last trunks every call would otherwise copy whole
    maps), and no earlier CLIP stages (only the last is pooled). Prompts decoded on these features give exactly
    what they give on ``features``; worth it when an image's features serve many separate calls (an interactive
    session). SAM features are returned as they are."""
    from .modeling.ovsam import OvsamImageFeatures

    if not isinstance(features, OvsamImageFeatures):
        return features
    dtype = model.mask_decoder.label_token.weight.dtype
    return OvsamImageFeatures(image_embeddings=features.image_embeddings.to(dtype),
                              clip_feats=[features.clip_feats[-1].contiguous()],
                              fpn_feats=[f.contiguous() for f in features.fpn_feats])


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


def prompt_tensors(
    model: OvsamModel | SamModel, prompts: PromptSet, original_size: tuple[int, int], input_size: tuple[int, int]
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
    """Validated original-frame prompts -> input-frame tensors on the model's device: ``points`` (``[N, K, 2]``
    float32, ``[N, K]`` int64) or None, ``boxes`` ``[N, 4]`` float32 or None, ``mask_input`` or None."""
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
    return points, boxes, masks_in


@torch.inference_mode()
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
    points, boxes, masks_in = prompt_tensors(model, prompts, original_size, input_size)
    clip = None if prompts.clip_boxes is None else torch.as_tensor(prompts.clip_boxes, dtype=torch.float32,
                                                                   device=model.device)
    pred = predict_torch_prompts(model, features, image_index, points, boxes, masks_in, original_size, input_size,
                                 vocabulary=vocabulary, multimask_output=multimask_output,
                                 return_logits=return_logits, prompt_chunk=prompt_chunk, clip_boxes=clip)
    pred.prompt = prompts
    return pred


@torch.inference_mode()
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
    clip_boxes: torch.Tensor | None = None,
) -> Prediction:
    """Prompts already in the input frame: ``points`` = (``[N, K, 2]``, ``[N, K]``), ``boxes`` ``[N, 4]``,
    ``mask_input`` ``[N, 1, s, s]`` (``clip_boxes``: see :func:`decode_prompts`). Decodes in chunks of
    ``prompt_chunk`` prompts. Returns tensors."""
    n = _num_prompts(points, boxes, mask_input)
    index = torch.full((n,), image_index, dtype=torch.long, device=model.device)
    decoded = decode_prompts(model, features, index, points, boxes, mask_input, vocabulary=vocabulary,
                             multimask_output=multimask_output, prompt_chunk=prompt_chunk, clip_boxes=clip_boxes)
    return finish_prediction(model, decoded, original_size, input_size, vocabulary=vocabulary,
                             multimask_output=multimask_output, return_logits=return_logits)


@dataclass
class DecodedPrompts:
    """Decoder and recognition outputs for N prompts, before mask post-processing; all float32 tensors.

    ``low_res`` ``[N, M, s, s]`` logits, ``iou`` ``[N, M]``; ``head``/``clip`` ``[N, D]`` region embeddings,
    ``valid`` ``[N]`` bool and ``scores`` ``[N, C + 1]`` fused log-scores (OV-SAM; None otherwise)."""

    low_res: torch.Tensor
    iou: torch.Tensor
    head: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.low_res.shape[0])

    def select(self, idx: slice | torch.Tensor) -> "DecodedPrompts":
        return DecodedPrompts(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                                 for f in dataclasses.fields(self)})


def _num_prompts(points, boxes, mask_input) -> int:
    return next(int(t.shape[0]) for t in (boxes, None if points is None else points[0], mask_input) if t is not None)


@torch.inference_mode()
def decode_prompts(
    model: OvsamModel | SamModel,
    features: Any,
    image_index: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    *,
    vocabulary: Any = None,
    multimask_output: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    clip_boxes: torch.Tensor | None = None,
) -> DecodedPrompts:
    """Decode N input-frame prompts of any images of the batch (``image_index`` ``[N]``) at the model's precision,
    ``prompt_chunk`` prompts per decoder call (padded to exactly that many when the model is compiled, so its
    shapes stay static). OV-SAM decodes prompts of several images in one call; SAM models one image per call.
    ``clip_boxes`` ``[N, 4]`` (input frame) override the frozen-CLIP branch's boxes (see ``PromptSet``)."""
    check_vocabulary(model, vocabulary)
    if isinstance(model, OvsamModel) and multimask_output:
        raise ValueError(f"model '{model.config.name}' has a single mask token; multimask_output=True needs a SAM model")
    n = _num_prompts(points, boxes, mask_input)
    if n == 0:
        return _empty_decoded(model, vocabulary, multimask_output)
    if isinstance(model, SamModel):
        chunks = []
        for i in torch.unique(image_index).tolist():
            sel = torch.nonzero(image_index == i, as_tuple=True)[0]
            chunks += [(sel[start : start + prompt_chunk], int(i)) for start in range(0, len(sel), prompt_chunk)]
    else:
        chunks = [(slice(start, min(start + prompt_chunk, n)), None) for start in range(0, n, prompt_chunk)]
    pad = prompt_chunk if getattr(model, "compiled", False) else 0
    parts: list[DecodedPrompts] = []
    order = []
    for sel, single in chunks:
        args = (None if points is None else (points[0][sel], points[1][sel]),
                None if boxes is None else boxes[sel], None if mask_input is None else mask_input[sel])
        clip = None if clip_boxes is None else clip_boxes[sel]
        idx = image_index[sel]
        m = int(idx.shape[0])
        if pad > m:
            args = tuple(None if a is None else _pad_rows(a, pad) for a in args)
            clip = None if clip is None else _pad_rows(clip, pad)
            idx = _pad_rows(idx, pad)
        part = _decode_chunk(model, features, idx, single, *args, vocabulary, multimask_output, clip_override=clip)
        parts.append(part.select(slice(0, m)) if pad > m else part)
        order.append(sel)
    fields = [f.name for f in dataclasses.fields(DecodedPrompts)]
    out = DecodedPrompts(**{k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
                            for k in fields})
    if isinstance(model, SamModel) and len(order) > 1:
        inverse = torch.empty(n, dtype=torch.long, device=image_index.device)
        inverse[torch.cat(order)] = torch.arange(n, device=image_index.device)
        out = out.select(inverse)
    return out


def _pad_rows(a, size: int):
    """``a`` (a tensor, or a pair of tensors for points) padded to ``size`` rows by repeating its last row."""
    if isinstance(a, tuple):
        return tuple(_pad_rows(t, size) for t in a)
    extra = a[-1:].expand(size - a.shape[0], *a.shape[1:])
    return torch.cat([a, extra])


@torch.inference_mode()
def finish_prediction(
    model: OvsamModel | SamModel,
    decoded: DecodedPrompts,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    *,
    vocabulary: Any = None,
    multimask_output: bool = False,
    return_logits: bool = False,
) -> Prediction:
    """Decoded prompts of one image -> a tensor :class:`Prediction`: float32 logits upscaled to the original
    frame, thresholded there, with boxes, quality and (with a vocabulary) labels and class probabilities."""
    if len(decoded) == 0:
        return _empty_prediction(model, original_size, vocabulary, multimask_output)
    low_res = decoded.low_res
    logits = T.postprocess_masks(low_res, model.image_size, input_size, original_size)
    masks = T.binarize(logits, model.config.mask_binarize)
    boxes_xyxy = mask_boxes_xyxy(masks)
    iou = decoded.iou
    if not multimask_output:
        masks, logits, boxes_xyxy, iou = masks[:, 0], logits[:, 0], boxes_xyxy[:, 0], iou[:, 0]
    pred = Prediction(
        masks=logits if return_logits else masks,
        low_res_logits=low_res,
        iou_scores=iou,
        boxes_xyxy=boxes_xyxy,
        head_embeddings=decoded.head,
        clip_embeddings=decoded.clip,
        clip_valid=decoded.valid,
    )
    if vocabulary is not None:
        scores = decoded.scores
        probs = R.fused_softmax(scores)
        pred.labels = scores[:, :-1].argmax(dim=-1)
        pred.label_scores = probs[:, :-1]
        pred.background_scores = probs[:, -1]
        pred.label_names = list(vocabulary.names)
    return pred


def _empty_decoded(model, vocabulary, multimask_output) -> DecodedPrompts:
    m = model.config.num_multimask_outputs if multimask_output else 1
    s = model.low_res_size
    dev = model.device
    out = DecodedPrompts(low_res=torch.zeros(0, m, s, s, device=dev), iou=torch.zeros(0, m, device=dev))
    if vocabulary is not None:
        out.scores = torch.zeros(0, len(vocabulary.names) + 1, device=dev)
    return out


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
        pred.background_scores = torch.zeros(0, device=dev)
        pred.label_names = list(vocabulary.names)
    return pred


def _decode_chunk(model, features, index, single_image, points, boxes, mask_input, vocabulary,
                  multimask_output, clip_override=None) -> DecodedPrompts:
    """One decoder call at the model's precision; every output float32. ``single_image`` is the image of a SAM
    model's chunk (SAM's decoder takes one image embedding)."""
    like = features if isinstance(features, torch.Tensor) else features.image_embeddings
    with P.autocast(model, like):
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if isinstance(model, SamModel):
            dtype = P.decoder_dtype(model)
            with torch.autocast(like.device.type, enabled=False):
                low_res, iou = model.mask_decoder(
                    image_embeddings=features[single_image : single_image + 1].to(dtype),
                    image_pe=model.prompt_encoder.get_dense_pe().to(dtype),
                    sparse_prompt_embeddings=sparse.to(dtype),
                    dense_prompt_embeddings=dense.to(dtype),
                    multimask_output=multimask_output,
                )
            return DecodedPrompts(low_res=low_res.float(), iou=iou.float())
        low_res, _ = model.decode(features, index, sparse, dense, dense_shared=mask_input is None)
        low_res = low_res.float()
        roi_boxes = R.boxes_from_mask_logits(low_res, scale=model.image_size / low_res.shape[-1],
                                             rule=model.config.recognition.roi_box)
        clip_boxes = clip_override if clip_override is not None else boxes if boxes is not None else roi_boxes
        regions = model.region_embeddings(features, index, roi_boxes, low_res, clip_boxes=clip_boxes)
    regions = RegionOutput(*(None if t is None else t.float() for t in
                             (regions.head_embeddings, regions.clip_embeddings)),
                           regions.clip_valid)
    out = DecodedPrompts(low_res=low_res, iou=stability_score(low_res), head=regions.head_embeddings,
                         clip=regions.clip_embeddings, valid=regions.clip_valid)
    if vocabulary is not None:
        # dot products in the compute dtype, logits and the ensemble in float32
        dtype = P.DTYPES[P.model_precision(model)]
        if hasattr(vocabulary, "prototypes"):
            text = vocabulary.prototypes(low_res.device, dtype)
        else:  # any object with Vocabulary's embeddings and indicator
            text = R.ClassPrototypes.from_padded(vocabulary.embeddings.float()).to(low_res.device, dtype)
        with P.full_precision(low_res):
            out.scores = model.classify(regions, text, vocabulary.indicator.to(low_res.device))
    return out


def _as_promptset(model, prompt: Any, original_size: tuple[int, int]) -> PromptSet:
    if isinstance(prompt, PromptSet):
        ps = validate_prompts(original_size, prompt.point_coords, prompt.point_labels, prompt.boxes,
                              prompt.mask_input, model.low_res_size)
        return _with_clip_boxes(model, ps, prompt.clip_boxes)
    if isinstance(prompt, Mapping):
        allowed = {"point_coords", "point_labels", "box", "boxes", "mask_input", "clip_boxes"}
        unknown = sorted(set(prompt) - allowed)
        if unknown:
            raise ValueError(f"unknown prompt key(s) {unknown}; valid keys: {sorted(allowed)}")
        ps = validate_prompts(original_size, prompt.get("point_coords"), prompt.get("point_labels"),
                              prompt.get("box", prompt.get("boxes")), prompt.get("mask_input"), model.low_res_size)
        return _with_clip_boxes(model, ps, prompt.get("clip_boxes"))
    raise ValueError(f"each prompt must be a dict (point_coords/point_labels/box/mask_input) or PromptSet, "
                     f"got {type(prompt).__name__}")


def _with_clip_boxes(model, ps: PromptSet, clip_boxes: Any) -> PromptSet:
    """``ps`` with the frozen-CLIP box override (``[N, 4]`` finite, input frame, OV-SAM models only)."""
    if clip_boxes is None:
        return ps
    if not isinstance(model, OvsamModel):
        raise ValueError("clip_boxes needs an OV-SAM model (SAM has no frozen-CLIP branch)")
    boxes = np.asarray(clip_boxes, dtype=np.float32).reshape(-1, 4) if np.size(clip_boxes) else \
        np.zeros((0, 4), dtype=np.float32)
    if boxes.shape[0] != len(ps) or not np.isfinite(boxes).all():
        raise ValueError(f"clip_boxes must be {len(ps)} finite boxes [N, 4], one per prompt; got shape "
                         f"{np.shape(clip_boxes)}")
    ps.clip_boxes = boxes
    return ps


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
        preds = predict_images(model, features, prompt_sets[start : start + step],
                               [(p.original_size, p.input_size) for p in chunk], vocabulary=vocabulary,
                               multimask_output=multimask_output, prompt_chunk=prompt_chunk)
        results += [pred.numpy() for pred in preds]
    return results


@torch.inference_mode()
def predict_images(
    model: OvsamModel | SamModel,
    features: Any,
    prompt_sets: Sequence[PromptSet],
    sizes: Sequence[tuple[tuple[int, int], tuple[int, int]]],
    *,
    vocabulary: Any = None,
    multimask_output: bool = False,
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK,
    feature_index: Sequence[int] | None = None,
) -> list[Prediction]:
    """Validated original-frame prompts of every image of a batch (``features`` from :func:`encode_images`, image
    ``i`` with ``sizes[i] = (original_size, input_size)``) -> one tensor :class:`Prediction` per image.

    Prompts of the same kind (boxes, or K points, with or without a mask) from all images go through the decoder
    together, ``prompt_chunk`` per call; each image's masks are then upscaled to its own frame.
    ``feature_index``: prompt set ``i`` uses the features of batch entry ``feature_index[i]`` (default ``i``), so
    several prompt sets can share one image's features.
    """
    if len(prompt_sets) != len(sizes):
        raise ValueError(f"got {len(prompt_sets)} prompt sets for {len(sizes)} images")
    if feature_index is None:
        feature_index = range(len(prompt_sets))
    elif len(feature_index) != len(prompt_sets):
        raise ValueError(f"got {len(feature_index)} feature indices for {len(prompt_sets)} prompt sets")
    tensors = [prompt_tensors(model, ps, *size) for ps, size in zip(prompt_sets, sizes)]
    clip = [None if ps.clip_boxes is None else torch.as_tensor(ps.clip_boxes, dtype=torch.float32,
                                                               device=model.device) for ps in prompt_sets]
    groups: dict[tuple, list[int]] = {}
    for i, (points, boxes, masks_in) in enumerate(tensors):
        if len(prompt_sets[i]):
            kind = (None if points is None else int(points[0].shape[1]), boxes is not None, masks_in is not None,
                    clip[i] is not None)
            groups.setdefault(kind, []).append(i)
    decoded: list[DecodedPrompts | None] = [None] * len(prompt_sets)
    for members in groups.values():
        counts = [len(prompt_sets[i]) for i in members]
        index = torch.cat([torch.full((c,), feature_index[i], dtype=torch.long)
                           for i, c in zip(members, counts)]).to(model.device)

        def cat(pick):
            parts = [pick(tensors[i]) for i in members]
            return None if parts[0] is None else torch.cat(parts)

        points = None if tensors[members[0]][0] is None else (cat(lambda t: t[0][0]), cat(lambda t: t[0][1]))
        clip_boxes = None if clip[members[0]] is None else torch.cat([clip[i] for i in members])
        out = decode_prompts(model, features, index, points, cat(lambda t: t[1]), cat(lambda t: t[2]),
                             vocabulary=vocabulary, multimask_output=multimask_output, prompt_chunk=prompt_chunk,
                             clip_boxes=clip_boxes)
        offset = 0
        for i, c in zip(members, counts):
            decoded[i] = out.select(slice(offset, offset + c))
            offset += c
    preds = []
    for i, (original_size, input_size) in enumerate(sizes):
        d = decoded[i] if decoded[i] is not None else _empty_decoded(model, vocabulary, multimask_output)
        pred = finish_prediction(model, d, original_size, input_size, vocabulary=vocabulary,
                                 multimask_output=multimask_output)
        pred.prompt = prompt_sets[i]
        preds.append(pred)
    return preds
