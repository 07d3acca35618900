"""OWL-ViT and OWLv2 (transformers) as proposal sources: text-queried detections over a vocabulary of any size,
and OWLv2's class-agnostic objectness proposals.

Images go through the model's own processor. The query embeddings of a vocabulary are computed once per query set,
device and dtype and cached (as ``Vocabulary.prototypes`` is). Per batch the image is embedded once; the class
head then scores chunks of queries against it, keeping for each predicted box its best query so far, so memory
is bounded by the chunk, not the vocabulary, and the result is the one a single call with every query gives:
transformers' ``post_process_object_detection`` keeps, per box, the maximum over queries, and each query's logit
depends on that query alone. A class's score is its best synonym's.

Boxes: OWLv2's processor pads the image to a square (bottom and right) before resizing, so its normalised boxes
are scaled by the padded side; OWL-ViT resizes the image itself, so by its height and width. Both then come back
in original pixels, clipped to the image.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from pipeline.annotate.detectors.hf import autocast, finish_boxes, load_pretrained, writable
from pipeline.annotate.detectors.queries import TextQueries
from pipeline.annotate.detectors.spec import DetectorOptions
from pipeline.annotate.proposals import Proposals

#: bytes of query logits ``[batch, patches, queries]`` held at once
LOGIT_BUDGET_BYTES = 64 * 1024 * 1024
TEXT_BATCH = 256
QUERY_CACHE_SIZE = 4


class OwlDetector:
    """``detector:owlv2`` / ``detector:owlvit`` (``__call__`` with the vocabulary's ``queries``) and
    ``proposals:owlv2`` (``objectness=True``)."""

    def __init__(self, name: str, weights: Any, *, options: DetectorOptions, queries: TextQueries | None = None,
                 objectness: bool = False, device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        self.name = name
        self.options = options
        self.device = torch.device(device)
        self.precision = precision
        self.model, self.processor = load_pretrained(name, weights, str(self.device))
        self.objectness = bool(objectness)
        if self.objectness and not hasattr(self.model, "objectness_predictor"):
            raise ValueError(f"proposals:{name}: the model has no objectness head (OWLv2 has one)")
        if not self.objectness and queries is None:
            raise ValueError(f"detector:{name} needs the vocabulary's text queries")
        self.queries = queries
        self.padded_square = bool(getattr(self.processor.image_processor, "do_pad", False))
        self._embeddings: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ queries
    def query_embeddings(self, queries: TextQueries) -> Any:
        """``[Q, D]`` embeddings of ``queries`` as the model's text tower and projection make them (L2-normalised
        as ``Owlv2Model.forward`` does), computed once per query set, device and dtype."""
        import torch

        key = (queries.key, str(self.device), self.precision)
        with self._lock:
            if key in self._embeddings:
                self._embeddings.move_to_end(key)
                return self._embeddings[key]
        base = getattr(self.model, self.model.base_model_prefix)
        parts = []
        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in range(0, len(queries), TEXT_BATCH):
                texts = list(queries.texts[start:start + TEXT_BATCH])
                # queries past the text tower's length (16 tokens) are cut there, as its tokenizer cuts them
                tokens = self.processor(text=[texts], return_tensors="pt", truncation=True)
                out = base.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                             attention_mask=tokens["attention_mask"].to(self.device))
                embeds = getattr(out, "pooler_output", out)
                parts.append(embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True))
        embeddings = torch.cat(parts)
        with self._lock:
            self._embeddings[key] = embeddings
            while len(self._embeddings) > QUERY_CACHE_SIZE:
                self._embeddings.popitem(last=False)
        return embeddings

    # ------------------------------------------------------------------------------------------------ detection
    def __call__(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        if self.objectness:
            return self.propose(images)
        return self.detect(images, self.queries)

    def detect(self, images: Sequence[np.ndarray], queries: TextQueries, *, options: DetectorOptions | None = None
               ) -> list[Proposals]:
        """Text-queried boxes per image, labelled with their best query's class name."""
        options = options or self.options
        out: list[Proposals] = []
        for start in range(0, len(images), options.batch_size):
            out.extend(self._detect_batch(list(images[start:start + options.batch_size]), queries, options))
        return out

    def propose(self, images: Sequence[np.ndarray], *, options: DetectorOptions | None = None) -> list[Proposals]:
        """Class-agnostic boxes ranked by OWLv2's objectness head (labels None)."""
        import torch

        options = options or self.options
        out: list[Proposals] = []
        for start in range(0, len(images), options.batch_size):
            batch = list(images[start:start + options.batch_size])
            if not batch:
                continue
            with torch.inference_mode(), autocast(self.device, self.precision):
                feats, boxes = self._image(batch)
                objectness = self.model.objectness_predictor(feats).float()
            scores = torch.sigmoid(objectness)
            for i, image in enumerate(batch):
                out.append(self._finish(image, boxes[i], scores[i], None, options, strict=False))
        return out

    def _image(self, batch: list[np.ndarray]) -> tuple[Any, Any]:
        """Image features ``[B, P, H]`` and boxes ``[B, P, 4]`` (normalised xyxy) of a batch."""
        from transformers.image_transforms import center_to_corners_format

        pixels = self.processor(images=writable(batch), return_tensors="pt")["pixel_values"].to(self.device)
        feature_map = self.model.image_embedder(pixel_values=pixels)[0]
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        boxes = center_to_corners_format(self.model.box_predictor(feats, feature_map).float())
        return feats, boxes

    def _detect_batch(self, batch: list[np.ndarray], queries: TextQueries, options: DetectorOptions
                      ) -> list[Proposals]:
        import torch

        if not batch:
            return []
        embeddings = self.query_embeddings(queries)
        with torch.inference_mode(), autocast(self.device, self.precision):
            feats, boxes = self._image(batch)
            b, p = feats.shape[:2]
            best = torch.full((b, p), float("-inf"), device=feats.device)
            best_q = torch.zeros((b, p), dtype=torch.long, device=feats.device)
            chunk = max(1, LOGIT_BUDGET_BYTES // max(1, 4 * b * p))
            for start in range(0, len(queries), chunk):
                q = embeddings[start:start + chunk]
                q = q[None].expand(b, *q.shape)
                mask = torch.ones(q.shape[:2], dtype=torch.bool, device=feats.device)
                logits = self.model.class_predictor(feats, q, mask)[0].float()
                value, index = logits.max(dim=-1)
                better = value > best
                best = torch.where(better, value, best)
                best_q = torch.where(better, index + start, best_q)
        scores = torch.sigmoid(best)
        classes = queries.classes[best_q.cpu().numpy()]
        out = []
        for i, image in enumerate(batch):
            labels = [queries.names[c] for c in classes[i]]
            out.append(self._finish(image, boxes[i], scores[i], labels, options, strict=True))
        return out

    def _finish(self, image: np.ndarray, boxes: Any, scores: Any, labels: list | None, options: DetectorOptions,
                *, strict: bool) -> Proposals:
        import torch

        height, width = int(image.shape[0]), int(image.shape[1])
        if self.padded_square:
            side = max(height, width)
            scale = torch.tensor([side, side, side, side], dtype=torch.float32)
        else:
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        pixels = boxes.float().cpu() * scale
        kept, kept_scores, kept_labels = finish_boxes(pixels, scores, labels, width, height, options, strict=strict)
        return Proposals(boxes=kept, scores=kept_scores, labels=kept_labels)
