"""The model stage of the annotation job: decoded samples -> proposals -> OV-SAM -> RLE instance records.

``Annotator`` loads the model, vocabulary and optional detector once and maps batches of decoded samples to
per-sample results. It is a plain class (no Ray) so it is unit-testable; ``pipeline/run.py`` hosts it in actors.
Masks leave this stage only as COCO RLE.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .proposals import Proposals, TorchvisionDetector, parse_prompt_mode, whole_image

logger = logging.getLogger(__name__)

MASK_BUDGET_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ModelStageConfig:
    """What the model stage needs; every field changes results and enters the job's config hash."""

    model: str = "ovsam-tiny"
    checkpoint: str | None = None
    vocabulary: str = "coco"
    prompts: str = "sidecar"
    detector_weights: str | None = None
    detector_score_thresh: float = 0.5
    max_detections: int = 100
    top_k: int = 5
    store_embeddings: bool = False
    points_per_side: int = 16
    stability_score_thresh: float = 0.9
    box_nms_thresh: float = 0.7
    device: str = "cpu"


@dataclass
class SampleInput:
    """One decoded sample handed to the model stage. ``image`` is ``HxWx3`` uint8 RGB when ``status == 'ok'``."""

    key: str
    image: np.ndarray | None
    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    source_format: str | None = None
    proposals: Proposals | None = None
    num_prompts_dropped: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class SampleResult:
    """The model stage's output for one sample: an ``images`` row and its ``instances`` rows (plain dicts)."""

    image_row: dict[str, Any]
    instance_rows: list[dict[str, Any]]


class Annotator:
    """Builds the model, vocabulary and detector once; ``__call__`` annotates a batch of :class:`SampleInput`."""

    def __init__(self, config: ModelStageConfig) -> None:
        import ovsam

        self.config = config
        self.model = ovsam.build_ovsam(config.model, checkpoint=config.checkpoint, device=config.device)
        self.vocabulary = ovsam.Vocabulary.resolve(config.vocabulary, self.model, progress=False)
        self.mode, detector = parse_prompt_mode(config.prompts)
        self.detector = None
        if self.mode == "detector":
            self.detector = TorchvisionDetector(detector, config.detector_weights,
                                                score_thresh=config.detector_score_thresh,
                                                max_detections=config.max_detections, device=config.device)
        self.generator = None
        if self.mode == "grid":
            self.generator = ovsam.OvsamMaskGenerator(
                self.model, self.vocabulary, points_per_side=config.points_per_side,
                stability_score_thresh=config.stability_score_thresh, box_nms_thresh=config.box_nms_thresh,
                top_k=config.top_k, output_mode="binary_mask",
            )

    # ---------------------------------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[SampleInput]) -> list[SampleResult]:
        """Annotate ``samples``; never raises for a bad sample: failures become ``model_error`` rows."""
        ok = [s for s in samples if s.status == "ok" and s.image is not None]
        if self.mode == "whole-image":
            for s in ok:
                s.proposals = whole_image(s.image.shape[1], s.image.shape[0])
        elif self.mode == "detector" and ok:
            try:
                for s, props in zip(ok, self.detector([s.image for s in ok])):
                    s.proposals = props
            except Exception as e:  # a detector failure is this batch's model error, not the job's
                for s in ok:
                    _fail(s, e)
        results: dict[str, SampleResult] = {}
        todo = [s for s in ok if s.status == "ok"]
        if self.mode == "grid":
            for s in todo:
                results[s.key] = self._guarded(self._grid, s)
        else:
            for s in todo:
                if s.proposals is None or len(s.proposals) == 0:
                    s.status = "no_prompts"
                    s.error = "; ".join(s.notes) or "the sample has no prompts"
            todo = [s for s in todo if s.status == "ok"]
            results.update(self._boxes_and_points(todo))
        return [results[s.key] if s.key in results else SampleResult(_image_row(s, 0, 0), []) for s in samples]

    # ---------------------------------------------------------------------------------------------------------
    def _boxes_and_points(self, samples: list[SampleInput]) -> dict[str, SampleResult]:
        """One backbone pass for the batch; if it fails, fall back to one sample at a time to isolate failures."""
        if not samples:
            return {}
        try:
            return self._predict(samples)
        except Exception as e:
            if len(samples) == 1:
                _fail(samples[0], e)
                return {}
            logger.warning("batch of %d failed (%s); retrying sample by sample", len(samples), e)
            out: dict[str, SampleResult] = {}
            for s in samples:
                out.update(self._boxes_and_points([s]))
            return out

    def _predict(self, samples: list[SampleInput]) -> dict[str, SampleResult]:
        import torch

        from ovsam.batch import encode_images, predict_prompts, prepare_image
        from ovsam.prompts import PromptSet

        prepared = [prepare_image(self.model, s.image) for s in samples]
        features = encode_images(self.model, torch.stack([p.tensor for p in prepared]))
        out = {}
        for i, (s, p) in enumerate(zip(samples, prepared)):
            props = s.proposals
            rows: list[dict[str, Any]] = []
            # full-resolution masks cost ~5 bytes per pixel per prompt until RLE-encoded: bound them per chunk
            chunk = prompts_per_chunk(*p.original_size)
            for start in range(0, props.boxes.shape[0], chunk):
                sel = slice(start, start + chunk)
                pred = predict_prompts(self.model, features, i, PromptSet(boxes=props.boxes[sel]), p.original_size,
                                       p.input_size, vocabulary=self.vocabulary).numpy()
                rows += self._rows(s, pred, "box" if self.mode != "detector" else "detector", props,
                                   start=len(rows), prop_offset=start)
            for start in range(0, props.points.shape[0], chunk):
                pts = props.points[start:start + chunk, None, :]
                pred = predict_prompts(self.model, features, i, PromptSet(point_coords=pts,
                                       point_labels=np.ones(pts.shape[:2], dtype=np.int64)), p.original_size,
                                       p.input_size, vocabulary=self.vocabulary).numpy()
                rows += self._rows(s, pred, "point", None, start=len(rows))
            out[s.key] = SampleResult(_image_row(s, len(rows), len(props)), rows)
        return out

    def _rows(self, s: SampleInput, pred: Any, prompt_type: str, props: Proposals | None,
              start: int = 0, prop_offset: int = 0) -> list[dict[str, Any]]:
        from ovsam.masks import encode_rle

        k = min(self.config.top_k, len(self.vocabulary))
        rles = encode_rle(pred.masks)
        top = np.argsort(-pred.label_scores, axis=1)[:, :k]
        rows = []
        for j in range(len(pred)):
            label = int(pred.labels[j])
            row = {
                "image_key": s.key,
                "instance_index": start + j,
                "prompt_type": prompt_type,
                "prompt_box_xyxy": None if pred.prompt.boxes is None else [float(v) for v in pred.prompt.boxes[j]],
                "prompt_points": None if pred.prompt.point_coords is None
                else [[float(x), float(y)] for x, y in pred.prompt.point_coords[j]],
                "prompt_point_labels": None if pred.prompt.point_labels is None
                else [int(v) for v in pred.prompt.point_labels[j]],
                "box_xyxy": [float(v) for v in pred.boxes_xyxy[j]],
                "mask_rle": rles[j],
                "area": int(pred.masks[j].sum()),
                "mask_quality": float(pred.iou_scores[j]),
                "label": label,
                "label_name": self.vocabulary.names[label],
                "label_score": float(pred.label_scores[j, label]),
                "topk_labels": [int(t) for t in top[j]],
                "topk_scores": [float(pred.label_scores[j, t]) for t in top[j]],
                "detector_score": props.scores[prop_offset + j] if props is not None and props.scores else None,
                "detector_label": props.labels[prop_offset + j] if props is not None and props.labels else None,
                "head_embedding": None, "clip_embedding": None, "clip_valid": None,
            }
            if self.config.store_embeddings:
                row["head_embedding"] = pred.head_embeddings[j].astype(np.float16).tolist()
                if pred.clip_embeddings is not None:
                    row["clip_embedding"] = pred.clip_embeddings[j].astype(np.float16).tolist()
                    row["clip_valid"] = bool(pred.clip_valid[j])
            rows.append(row)
        if self.config.store_embeddings:
            # labels from the stored float16 embeddings, so re-labelling with the same vocabulary reproduces them
            from .export import relabel_rows

            rows = relabel_rows(rows, self.vocabulary, self.model.config.recognition, k)
        return rows

    def _grid(self, s: SampleInput) -> SampleResult:
        from ovsam.masks import encode_rle

        records = self.generator.generate(s.image)
        rows = []
        for j, rec in enumerate(records):
            rows.append({
                "image_key": s.key, "instance_index": j, "prompt_type": "grid", "prompt_box_xyxy": None,
                "prompt_points": [list(map(float, p)) for p in rec["point_coords"]], "prompt_point_labels": [1],
                "box_xyxy": [float(v) for v in rec["box_xyxy"]], "mask_rle": encode_rle(rec["segmentation"][None])[0],
                "area": rec["area"], "mask_quality": rec["stability_score"], "label": rec["label"],
                "label_name": rec["label_name"], "label_score": rec["label_score"],
                "topk_labels": rec["top_labels"], "topk_scores": rec["top_scores"], "detector_score": None,
                "detector_label": None, "head_embedding": None, "clip_embedding": None, "clip_valid": None,
            })
        return SampleResult(_image_row(s, len(rows), self.config.points_per_side ** 2), rows)

    def _guarded(self, fn, s: SampleInput) -> SampleResult:
        try:
            return fn(s)
        except Exception as e:
            _fail(s, e)
            return SampleResult(_image_row(s, 0, 0), [])


def prompts_per_chunk(height: int, width: int, budget_bytes: int | None = None) -> int:
    """How many prompts of an ``height x width`` image to decode at once so their full-size mask logits and masks
    (~5 bytes per pixel each) stay within ``budget_bytes`` (default ``MASK_BUDGET_BYTES``); between 1 and 64."""
    budget = MASK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, min(64, budget // max(1, 5 * height * width)))


def _fail(s: SampleInput, e: Exception) -> None:
    s.status = "model_error"
    s.error = f"{type(e).__name__}: {e}"
    logger.warning("model error on %s: %s", s.key, "".join(traceback.format_exception_only(type(e), e)).strip())


def _image_row(s: SampleInput, num_instances: int, num_prompts: int) -> dict[str, Any]:
    return {
        "image_key": s.key, "status": s.status, "error": s.error, "width": s.width, "height": s.height,
        "num_instances": num_instances, "num_prompts": num_prompts, "num_prompts_dropped": s.num_prompts_dropped,
        "source_format": s.source_format,
    }
