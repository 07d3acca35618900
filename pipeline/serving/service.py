"""The model side of ``ovsam serve``, in plain Python: embed an image once, then answer prompts from its cached
features, micro-batched across images; everything mode; vocabularies built once.

One :class:`SegmentService` lives in each model replica. Calls come from one thread at a time (the replica runs
them on a single worker thread), and every request reaching it has been checked by :mod:`.requests`. An image
whose features are not cached (evicted, or embedded by another replica) is embedded again from its bytes through
the ``load`` callable the caller passes, so answers never depend on the cache.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ovsam.automatic import OvsamMaskGenerator
from ovsam.batch import encode_images, features_for_prompts, predict_images, prepare_image
from ovsam.prompts import validate_prompts
from ovsam.rle import encode_rle_torch
from ovsam.runtime import release_freed_memory
from ovsam.vocabulary import Vocabulary

from pipeline.inputs.decode import ImageDecodeError, decode_image
from pipeline.export.coco import mask_polygons
from pipeline.serving.cache import ByteLRU, nbytes
from pipeline.serving.requests import ApiError, EverythingParams, SegmentParams, VocabularySpec

DEFAULT_VOCABULARY = "default"
PREVIOUS_PER_IMAGE = 32


def new_id() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def vocabulary_id(spec: VocabularySpec) -> str:
    """A stable id: the builtin's name, or a hash of the names (the same names give the same id)."""
    if spec.builtin is not None:
        return spec.builtin
    return "v-" + hashlib.sha256("\n".join(spec.names or []).encode()).hexdigest()[:24]


@dataclass
class ImageState:
    """One image's cached features (batch of one, on the model's device), its sizes, and the low-res logits of
    its latest answers (``previous_id -> [1, s, s]``)."""

    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    previous: OrderedDict = field(default_factory=OrderedDict)
    feature_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.feature_bytes = nbytes(self.features)  # counted once: every answer re-sizes the cache entry

    def size(self) -> int:
        return self.feature_bytes + sum(nbytes(v) for v in self.previous.values())


@dataclass
class SegmentCall:
    """A checked segment request about ``image_id``; ``load()`` returns the image's bytes if its features must be
    computed again."""

    image_id: str
    params: SegmentParams
    load: Callable[[], bytes] | None = None


class SegmentService:
    def __init__(self, model: Any, default_vocabulary: Vocabulary, *, cache_bytes: int, cache_ttl_s: float,
                 max_pixels: int, previous_per_image: int = PREVIOUS_PER_IMAGE) -> None:
        self.model = model
        self.max_pixels = int(max_pixels)
        self.previous_per_image = int(previous_per_image)
        self.cache: ByteLRU[ImageState] = ByteLRU(cache_bytes, cache_ttl_s, sizeof=lambda s: s.size())
        self.vocabularies: dict[str, Vocabulary] = {DEFAULT_VOCABULARY: default_vocabulary.to(model.device)}
        self.counters = {"embeds": 0, "re_embeds": 0, "segments": 0, "decoder_calls": 0, "everything": 0}
        self.model_seconds = 0.0

    # ------------------------------------------------------------------------------------------------ images
    def decode(self, data: bytes) -> np.ndarray:
        try:
            image, _, _ = decode_image(data, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            raise ApiError(422, "invalid_image", str(e), "image") from None
        return image

    def embed(self, image_id: str, data: bytes) -> dict[str, int]:
        """Decode ``data`` (the pipeline's decoder and limits), compute the features and cache them."""
        image = self.decode(data)
        start = time.perf_counter()
        prepared = prepare_image(self.model, image)
        features = features_for_prompts(self.model, encode_images(self.model, prepared.tensor[None]))
        self.model_seconds += time.perf_counter() - start
        state = ImageState(features, prepared.original_size, prepared.input_size)
        evicted = self.cache.evictions + self.cache.expirations
        self.cache.put(image_id, state)
        if self.cache.evictions + self.cache.expirations != evicted:
            release_freed_memory()
        self.counters["embeds"] += 1
        h, w = prepared.original_size
        return {"width": int(w), "height": int(h)}

    def has_image(self, image_id: str) -> bool:
        return image_id in self.cache

    def image_state(self, image_id: str, load: Callable[[], bytes] | None) -> ImageState:
        """The image's cached features, computed again from ``load()`` where they are not cached."""
        return self._state(image_id, load)

    def _state(self, image_id: str, load: Callable[[], bytes] | None) -> ImageState:
        state = self.cache.get(image_id)
        if state is None:
            if load is None:
                raise ApiError(404, "image_not_found", f"image {image_id} is not cached here", "image_id")
            self.embed(image_id, load())
            self.counters["re_embeds"] += 1
            state = self.cache.get(image_id)
            if state is None:
                raise ApiError(507, "cache_too_small", "the image's features do not fit in --cache-bytes")
        return state

    # ------------------------------------------------------------------------------------------ vocabularies
    def vocabulary(self, vocab_id: str | None) -> Vocabulary:
        vocab = self.vocabularies.get(vocab_id or DEFAULT_VOCABULARY)
        if vocab is None:
            raise ApiError(404, "vocabulary_not_found", f"unknown vocabulary {vocab_id!r}; create it with "
                           "POST /v1/vocabularies", "vocabulary")
        return vocab

    def ensure_vocabulary(self, vocab_id: str | None, spec: VocabularySpec | None) -> None:
        """Build ``vocab_id`` from ``spec`` if this service has not yet (a replica that did not see its
        ``POST /v1/vocabularies``)."""
        if vocab_id and spec is not None and vocab_id not in self.vocabularies:
            self.add_vocabulary(vocab_id, spec)

    def add_vocabulary(self, vocab_id: str, spec: VocabularySpec) -> dict[str, Any]:
        """Embed the class names once (a no-op if ``vocab_id`` is known)."""
        vocab = self.vocabularies.get(vocab_id)
        if vocab is None:
            start = time.perf_counter()
            if spec.builtin is not None:
                vocab = Vocabulary.from_builtin(spec.builtin, self.model, progress=False)
            else:
                vocab = Vocabulary.from_names(list(spec.names or []), self.model, progress=False,
                                              check_synonyms=False)
            self.model_seconds += time.perf_counter() - start
            self.vocabularies[vocab_id] = vocab.to(self.model.device)
        return {"vocabulary_id": vocab_id, "size": len(vocab.names), "names": list(vocab.names)}

    # --------------------------------------------------------------------------------------------- prompting
    def segment(self, calls: list[SegmentCall]) -> list[dict[str, Any] | ApiError]:
        """Answer many prompts, of any images: one decoder pass per vocabulary over all of them."""
        out: list[dict[str, Any] | ApiError | None] = [None] * len(calls)
        groups: dict[str, list[tuple[int, ImageState, Any]]] = {}
        for i, call in enumerate(calls):
            try:
                state = self._state(call.image_id, call.load)
                vocab_key = call.params.vocabulary or DEFAULT_VOCABULARY
                self.vocabulary(vocab_key)
                prompts = self._prompts(state, call.params)
            except ApiError as e:
                out[i] = e
                continue
            groups.setdefault(vocab_key, []).append((i, state, prompts))
        for vocab_key, members in groups.items():
            vocab = self.vocabularies[vocab_key]
            images: dict[int, int] = {}
            states: list[ImageState] = []
            for _, state, _ in members:
                if id(state) not in images:
                    images[id(state)] = len(states)
                    states.append(state)
            features = _concat_features([s.features for s in states])
            start = time.perf_counter()
            preds = predict_images(self.model, features, [p for _, _, p in members],
                                   [(s.original_size, s.input_size) for _, s, _ in members], vocabulary=vocab,
                                   feature_index=[images[id(s)] for _, s, _ in members])
            rles = _encode_masks([pred.masks[0] for pred in preds])
            self.model_seconds += time.perf_counter() - start
            self.counters["decoder_calls"] += 1
            for (i, state, _), pred, rle in zip(members, preds, rles):
                out[i] = self._answer(calls[i], state, pred, rle, vocab)
        self.counters["segments"] += len(calls)
        return out  # type: ignore[return-value]

    def _prompts(self, state: ImageState, p: SegmentParams) -> Any:
        mask_input = None
        if p.previous is not None:
            prev = state.previous.get(p.previous)
            if prev is None:
                raise ApiError(404, "previous_not_found", f"no earlier answer {p.previous!r} for this image (it "
                               "may have been dropped from the cache); segment again without previous", "previous")
            mask_input = prev.cpu().numpy()
        pts = np.asarray(p.points, dtype=np.float64).reshape(-1, 3)
        try:
            return validate_prompts(state.original_size, pts[:, :2] if len(pts) else None,
                                    pts[:, 2] if len(pts) else None, p.box, mask_input, self.model.low_res_size)
        except ValueError as e:
            raise ApiError(422, "invalid_field", str(e), "points" if len(pts) else "box") from None

    def _answer(self, call: SegmentCall, state: ImageState, pred: Any, rle: dict[str, Any],
                vocab: Vocabulary) -> dict[str, Any]:
        p = call.params
        answer = _instance(rle, int(pred.masks[0].sum()), pred.boxes_xyxy[0], float(pred.iou_scores[0]),
                           pred.label_scores[0], int(pred.labels[0]), vocab, p.top_k, p.format)
        previous_id = new_id()
        state.previous[previous_id] = pred.low_res_logits[0].detach().float().clone()
        while len(state.previous) > self.previous_per_image:
            state.previous.popitem(last=False)
        self.cache.resize(call.image_id, state.size())
        answer["previous_id"] = previous_id
        return answer

    def everything(self, image_id: str, params: EverythingParams, load: Callable[[], bytes] | None) -> dict:
        state = self._state(image_id, load)
        vocab = self.vocabulary(params.vocabulary)
        generator = OvsamMaskGenerator(
            self.model, vocab, points_per_side=params.points_per_side, pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh, box_nms_thresh=params.box_nms_thresh,
            min_mask_area=params.min_mask_area, top_k=params.top_k, output_mode="coco_rle")
        generator.predictor.load_features(state.features, state.original_size, state.input_size)
        start = time.perf_counter()
        records = generator.generate_for_set_image()
        self.model_seconds += time.perf_counter() - start
        self.counters["everything"] += 1
        instances = []
        for rec in records:
            rle = rec["segmentation"]
            inst = {"mask": _format_mask(rle, params.format), "box": [float(v) for v in rec["box_xyxy"]],
                    "area": int(rec["area"]), "mask_quality": float(rec["stability_score"]),
                    "label": rec["label_name"], "label_score": float(rec["label_score"]),
                    "topk": [[vocab.names[k], float(s)] for k, s in zip(rec["top_labels"], rec["top_scores"])],
                    "point": [float(v) for v in rec["point_coords"][0]]}
            instances.append(inst)
        return {"instances": instances}

    def stats(self) -> dict[str, Any]:
        return {"cache": self.cache.stats(), "vocabularies": len(self.vocabularies), **self.counters,
                "model_seconds": round(self.model_seconds, 6)}


def _format_mask(rle: dict[str, Any], fmt: str) -> Any:
    counts = rle["counts"]
    rle = {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}
    return rle if fmt == "rle" else mask_polygons(rle)


def _encode_masks(masks: list[torch.Tensor]) -> list[dict[str, Any]]:
    """COCO RLE of each mask, made on the masks' device: one call per distinct size."""
    out: list[dict[str, Any] | None] = [None] * len(masks)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(masks):
        by_size.setdefault(tuple(m.shape), []).append(i)
    for members in by_size.values():
        for i, rle in zip(members, encode_rle_torch(torch.stack([masks[i] for i in members]))):
            out[i] = rle
    return out  # type: ignore[return-value]


def _instance(rle: dict[str, Any], area: int, box: torch.Tensor, quality: float, scores: torch.Tensor, label: int,
              vocab: Vocabulary, top_k: int, fmt: str) -> dict[str, Any]:
    """An answer's instance: the mask (COCO RLE, or polygons), its box and area, quality, label and top-k."""
    k = min(top_k, int(scores.shape[0]))
    top = torch.topk(scores.float(), k)
    return {"mask": _format_mask(rle, fmt), "box": [float(v) for v in box.tolist()], "area": area,
            "mask_quality": quality, "label": vocab.names[label], "label_score": float(scores[label]),
            "topk": [[vocab.names[int(j)], float(s)] for j, s in zip(top.indices.tolist(), top.values.tolist())]}


def _concat_features(parts: list[Any]) -> Any:
    """Features of several images (each a batch of one) as one batch, in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    out = {}
    for name in first.__dataclass_fields__:
        value = getattr(first, name)
        if isinstance(value, list):
            out[name] = [torch.cat([getattr(p, name)[j] for p in parts]) for j in range(len(value))]
        else:
            out[name] = torch.cat([getattr(p, name) for p in parts])
    return type(first)(**out)
