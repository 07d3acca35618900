"""Grounding DINO and MM Grounding DINO (transformers) as proposal sources over a vocabulary of any size.

The model reads one caption of phrases (``"a photo of a cat. a photo of a dog."``, lower case, as its processor
merges a list of labels) of at most ``config.max_text_len`` tokens (256). The vocabulary's queries are cut into
captions that fit, each caption is one call, and the calls' detections are merged by score with class-agnostic
NMS. Within a call every predicted box's score is its best token's probability, as transformers'
``post_process_grounded_object_detection`` gives it; its class is that of the phrase holding its best phrase
token. A vocabulary that fits one caption gives exactly the single-call result.

Images go through the model's own processor. The processor pads a batch to its largest image and padding changes
what the backbone sees, so images are batched only with images of the same processed size: each image's result
is the one it gets alone. Boxes are normalised to the unpadded image and come back in original pixels, clipped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.annotate.detectors.hf import autocast, finish_boxes, load_pretrained, writable
from pipeline.annotate.detectors.queries import TextQueries
from pipeline.annotate.detectors.spec import DetectorOptions
from pipeline.annotate.proposals import Proposals

#: candidates (boxes above the threshold) an image keeps across vocabulary chunks before they are merged; past
#: it, the pool is cut to its best ``POOL_FACTOR * max_detections`` after NMS, which bounds memory on vocabularies
#: of any size (a merge of all candidates at the end gives the same result as one merge per image otherwise)
POOL_LIMIT = 10000
POOL_FACTOR = 10


@dataclass(frozen=True)
class Caption:
    """One call's text and, per token of its tokenisation, the class of the phrase the token is in (-1 for
    special tokens and separators)."""

    text: str
    token_classes: np.ndarray


def caption_text(texts: Sequence[str]) -> str:
    """Phrases joined as the processor merges a list of labels: lower case, ``". "`` between, ``"."`` at the end;
    a ``.`` inside a phrase would end it early, so it becomes a space."""
    return ". ".join(" ".join(t.replace(".", " ").split()).lower() for t in texts) + "."


class GroundingDetector:
    """``detector:grounding-dino`` / ``detector:mm-grounding-dino``."""

    def __init__(self, name: str, weights: Any, *, options: DetectorOptions, queries: TextQueries,
                 device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        self.name = name
        self.options = options
        self.queries = queries
        self.device = torch.device(device)
        self.precision = precision
        self.model, self.processor = load_pretrained(name, weights, str(self.device))
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))
        self._captions: OrderedDict[str, list[Caption]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ captions
    def captions(self, queries: TextQueries) -> list[Caption]:
        """``queries`` cut into captions of at most ``max_text_len`` tokens, in order; cached per query set."""
        with self._lock:
            if queries.key in self._captions:
                return self._captions[queries.key]
        tok = self.processor.tokenizer
        lengths = [len(tok(caption_text([t]), add_special_tokens=False)["input_ids"]) for t in queries.texts]
        groups: list[list[int]] = []
        used = 2  # [CLS] and [SEP]
        for q, n in enumerate(lengths):  # n counts the phrase and its closing "."
            if n + 2 > self.max_text_len:
                raise ValueError(f"the query {queries.texts[q]!r} alone is {n} tokens, more than "
                                 f"{self.name}'s {self.max_text_len - 2}; shorten the synonym or the template")
            if not groups or used + n > self.max_text_len:
                groups.append([])
                used = 2
            groups[-1].append(q)
            used += n
        captions = [self._caption(queries, g, [lengths[q] for q in g]) for g in groups]
        with self._lock:
            self._captions[queries.key] = captions
            while len(self._captions) > 4:
                self._captions.popitem(last=False)
        return captions

    def _caption(self, queries: TextQueries, group: list[int], lengths: list[int]) -> Caption:
        text = caption_text([queries.texts[q] for q in group])
        try:
            enc = self.processor.tokenizer(text, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):  # a tokenizer without offsets: count the tokens
            return self._counted_caption(queries, group, lengths, text)
        spans, pos = [], 0
        for q in group:
            phrase = caption_text([queries.texts[q]])[:-1]
            spans.append((pos, pos + len(phrase), int(queries.classes[q])))
            pos += len(phrase) + 2
        token_classes = np.full(len(enc["input_ids"]), -1, dtype=np.int64)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if b <= a:
                continue
            for lo, hi, c in spans:
                if lo <= a < hi:
                    token_classes[t] = c
                    break
        if len(token_classes) > self.max_text_len:
            raise ValueError(f"caption of {len(token_classes)} tokens exceeds {self.max_text_len}")
        return Caption(text, token_classes)

    def _counted_caption(self, queries: TextQueries, group: list[int], lengths: list[int], text: str) -> Caption:
        """Token classes from each phrase's own token count (its words, then its "."): a word-piece tokenizer
        splits at spaces and punctuation, so a caption's tokens are its phrases' tokens in turn."""
        token_classes = [-1]  # [CLS]
        for q, n in zip(group, lengths):
            token_classes += [int(queries.classes[q])] * (n - 1) + [-1]
        token_classes.append(-1)  # [SEP]
        total = len(self.processor.tokenizer(text)["input_ids"])
        if total != len(token_classes):
            raise ValueError(f"cannot map the caption's {total} tokens to its phrases")
        return Caption(text, np.asarray(token_classes, dtype=np.int64))

    # ------------------------------------------------------------------------------------------------ detection
    def __call__(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        return self.detect(images, self.queries)

    def detect(self, images: Sequence[np.ndarray], queries: TextQueries, *, options: DetectorOptions | None = None
               ) -> list[Proposals]:
        options = options or self.options
        images = list(images)
        if not images:
            return []
        captions = self.captions(queries)
        pixels = [self.processor.image_processor(images=writable([im]), return_tensors="pt") for im in images]
        pools: list[list[tuple[Any, Any, list]]] = [[] for _ in images]
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p["pixel_values"].shape[-2:]), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), options.batch_size):
                batch = members[start:start + options.batch_size]
                for caption in captions:
                    for i, found in zip(batch, self._call(images, pixels, batch, caption, queries,
                                                                options.score_thresh)):
                        pools[i].append(found)
                        if sum(len(s) for _, s, _ in pools[i]) > POOL_LIMIT:
                            pools[i] = [self._merge(images[i], pools[i], options, keep=POOL_FACTOR)]
        return [self._proposals(images[i], pools[i], options) for i in range(len(images))]

    def _call(self, images: list[np.ndarray], pixels: list[dict], batch: list[int], caption: Caption,
              queries: TextQueries, threshold: float) -> list[tuple[Any, Any, list]]:
        """One model call: per image of ``batch``, its boxes (original pixels), scores and class names."""
        import torch
        from transformers.image_transforms import center_to_corners_format

        inputs = {k: torch.cat([pixels[i][k] for i in batch]).to(self.device) for k in pixels[batch[0]]}
        text = self.processor.tokenizer([caption.text] * len(batch), return_tensors="pt", return_token_type_ids=True)
        inputs.update({k: v.to(self.device) for k, v in text.items()})
        with torch.inference_mode(), autocast(self.device, self.precision):
            outputs = self.model(**inputs)
        probs = torch.sigmoid(outputs.logits.float()).cpu()  # [B, queries, max_text_len]
        scores = probs.max(dim=-1).values
        n = len(caption.token_classes)
        phrase = torch.from_numpy(caption.token_classes >= 0)
        phrase_probs = probs[..., :n].masked_fill(~phrase, -1.0)
        best_token = phrase_probs.argmax(dim=-1).numpy()
        boxes = center_to_corners_format(outputs.pred_boxes.float()).cpu()
        out = []
        for j, i in enumerate(batch):
            h, w = images[i].shape[:2]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            names = [queries.names[c] if c >= 0 else None for c in caption.token_classes[best_token[j]]]
            keep = torch.nonzero(scores[j] > threshold).flatten()  # only candidates above the threshold are pooled
            out.append((boxes[j][keep] * scale, scores[j][keep], [names[k] for k in keep.tolist()]))
        return out

    def _merge(self, image: np.ndarray, pool: list[tuple[Any, Any, list]], options: DetectorOptions,
               keep: int = 1) -> tuple[Any, Any, list]:
        import dataclasses

        import torch

        boxes = torch.cat([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b, _, _ in pool])
        scores = torch.cat([torch.as_tensor(s, dtype=torch.float32).reshape(-1) for _, s, _ in pool])
        names = [n for _, _, ns in pool for n in ns]
        capped = dataclasses.replace(options, max_detections=options.max_detections * keep)
        kept, kept_scores, kept_names = finish_boxes(boxes, scores, names, image.shape[1], image.shape[0], capped)
        return torch.from_numpy(kept).float(), torch.tensor(kept_scores, dtype=torch.float32), kept_names

    def _proposals(self, image: np.ndarray, pool: list[tuple[Any, Any, list]], options: DetectorOptions
                   ) -> Proposals:
        if not pool:
            return Proposals()
        boxes, scores, names = self._merge(image, pool, options)
        return Proposals(boxes=boxes.double().numpy().reshape(-1, 4), scores=[float(s) for s in scores],
                         labels=list(names))
