"""The model stage of the annotation job: decoded samples -> proposals -> OV-SAM -> RLE instance records.

``Annotator`` loads the model, vocabulary and optional detector once. Its work comes in three parts, so that a
worker (``pipeline/annotate/worker.py``) can run each on its own thread and keep the model busy:

- :meth:`Annotator.prepare` (decode threads, ahead of the model): the model-input image of one sample (RGB,
  resize to the model's input size, normalise, pad: ``ovsam.batch.prepare_image``). Thread-safe.
- :meth:`Annotator.run_model` (the model thread): proposals (detector, whole image), one backbone pass for the
  batch, then each image's prompts through the decoder in memory-bounded chunks. Each chunk leaves as a
  :class:`PromptChunk` (the model's outputs, masks still dense) through an ``emit`` callback as soon as it is
  computed, so the model can go on with the next chunk or batch while the chunk's rows are built.
- :meth:`Annotator.chunk_rows` and :meth:`Annotator.finish` (the row part): masks -> COCO RLE
  (:func:`encode_masks`), top-k labels, instance rows, then the sample's ``images`` row.

``annotator(samples)`` runs the three in turn (what the tests and the benchmark's model-only loop call); a worker's
pipelined run gives the same rows in the same order. Masks leave this stage only as COCO RLE. It is a plain class
(no Ray) so it is unit-testable; ``pipeline/annotate/run.py`` hosts it in actors.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.annotate.detectors.spec import detector_options, parse_prompt_source
from pipeline.annotate.proposals import Proposals, whole_image
from pipeline.annotate.masks import encode_masks, rle_areas, rle_layout

logger = logging.getLogger(__name__)

MASK_BUDGET_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ModelStageConfig:
    """What the model stage needs; every field changes results and enters the job's config hash. ``precision``
    (``auto``, ``fp32``, ``bf16``, ``fp16``) enters it as resolved for the workers' device (``auto``: bf16 where
    the device computes it natively, else fp32); ``compile`` wraps the model in ``torch.compile`` (see
    ``ovsam.build_ovsam``)."""

    model: str = "ovsam-tiny"
    checkpoint: str | None = None
    vocabulary: str = "coco"
    prompts: str = "sidecar"
    detector_weights: str | None = None
    detector_score_thresh: float | None = None
    detector_nms_thresh: float | None = None
    detector_template: str | None = None
    detector_batch_size: int = 8
    max_detections: int = 100
    top_k: int = 5
    store_embeddings: bool = False
    points_per_side: int = 32
    stability_score_thresh: float = 0.6
    box_nms_thresh: float = 0.85
    pred_iou_thresh: float = 0.88
    min_mask_area: int = 0
    device: str = "cpu"
    precision: str = "auto"
    compile: bool = False


@dataclass
class SampleInput:
    """One decoded sample handed to the model stage. ``image`` is ``HxWx3`` uint8 RGB when ``status == 'ok'``.

    ``prepared`` / ``prepare_error`` hold :meth:`Annotator.prepare`'s result (the model-input image, or why it
    could not be made) until the model part has used it."""

    key: str
    image: np.ndarray | None
    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    source_format: str | None = None
    source_name: str | None = None
    proposals: Proposals | None = None
    num_prompts_dropped: int = 0
    notes: list[str] = field(default_factory=list)
    prepared: Any = field(default=None, repr=False, compare=False)
    prepare_error: BaseException | None = field(default=None, repr=False, compare=False)


@dataclass
class SampleResult:
    """The model stage's output for one sample: an ``images`` row and its ``instances`` rows (plain dicts)."""

    image_row: dict[str, Any]
    instance_rows: list[dict[str, Any]]


@dataclass
class PromptChunk:
    """The model part's output for consecutive prompts of one sample, before rows are built.

    ``pred`` is the model's ``ovsam.Prediction`` for the chunk (tensors on the model's device; ``masks`` dense
    ``[n, H, W]`` bool) or, for grid mode, ``records`` holds ``OvsamMaskGenerator`` records. ``first`` is the
    ``instance_index`` of the chunk's first row; ``prop_offset`` the index of its first prompt among
    ``proposals.boxes`` (where detector scores and labels come from; None for point prompts). The row part fills
    ``rows`` (or ``error``) and drops the dense masks."""

    key: str
    prompt_type: str
    first: int
    pred: Any = None
    records: list[dict[str, Any]] | None = None
    proposals: Proposals | None = None
    prop_offset: int = 0
    rles: list[dict[str, Any]] | None = None
    rows: list[dict[str, Any]] | None = None
    error: BaseException | None = None
    discarded: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of dense masks the chunk holds until its rows are built."""
        if self.pred is not None and self.pred.masks is not None:
            m = self.pred.masks
            return int(m.numel() * m.element_size()) if hasattr(m, "numel") else int(np.asarray(m).nbytes)
        if self.records:
            return int(sum(np.asarray(r["segmentation"]).nbytes for r in self.records))
        return 0


@dataclass
class ModelOutput:
    """The model part's result for one sample: the sample (its status may have become ``no_prompts`` or
    ``model_error``), how many prompts it had, and its chunks in row order."""

    sample: SampleInput
    num_prompts: int = 0
    chunks: list[PromptChunk] = field(default_factory=list)

def _np(v: Any) -> Any:
    return v.detach().cpu().numpy() if hasattr(v, "detach") else v


def _emit_nothing(chunk: PromptChunk) -> None:
    return None


class Annotator:
    """Builds the model, vocabulary and detector once; ``__call__`` annotates a batch of :class:`SampleInput`."""

    def __init__(self, config: ModelStageConfig) -> None:
        import ovsam
        import ovsam.runtime

        self.config = config
        if str(config.device).split(":")[0] == "cpu":
            ovsam.runtime.keep_freed_memory()  # large activations are reused instead of page-faulted in on every batch
        self.model = ovsam.build_ovsam(config.model, checkpoint=config.checkpoint, device=config.device,
                                       precision=config.precision, compile=config.compile)
        self.vocabulary = ovsam.Vocabulary.resolve(config.vocabulary, self.model, progress=False)
        # masks become RLE on an accelerator (only the RLE leaves it); see _device_rles
        self.device_rle = self.model.device.type != "cpu"
        self.source = parse_prompt_source(config.prompts)
        self.mode = self.source.mode
        self.detector = None
        if self.source.uses_detector:  # in this actor, on its device, at the model's precision
            from pipeline.annotate.detectors.build import build_proposer

            self.detector = build_proposer(self.source, config.detector_weights, options=detector_options(config),
                                           vocabulary=self.vocabulary, device=config.device,
                                           precision=self.precision)
        self.generator = None
        if self.mode == "grid":
            self.generator = ovsam.OvsamMaskGenerator(
                self.model, self.vocabulary, points_per_side=config.points_per_side,
                stability_score_thresh=config.stability_score_thresh, box_nms_thresh=config.box_nms_thresh,
                pred_iou_thresh=config.pred_iou_thresh, min_mask_area=config.min_mask_area,
                top_k=config.top_k, output_mode="binary_mask",
            )

    @property
    def precision(self) -> str:
        """The precision the model computes in (resolved: fp32, bf16 or fp16)."""
        return getattr(self.model, "precision", "fp32")

    # ---------------------------------------------------------------------------------------------------------
    def __call__(self, samples: Sequence[SampleInput]) -> list[SampleResult]:
        """Annotate ``samples``; never raises for a bad sample: failures become ``model_error`` rows."""
        for s in samples:
            self.prepare(s)
        outputs = self.run_model(samples, emit=self.chunk_rows)
        return [self.finish(o) for o in outputs]

    def warm_up(self, width: int = 640, height: int = 480) -> list[SampleResult]:
        """One pass of the box path (and the detector, in detector mode) over a flat grey ``width`` x ``height``
        image with one box, rows included, so that first-call costs (kernel selection, allocator growth, lazy
        imports) are paid before the first shard instead of inside it. Returns the throw-away results."""
        image = np.full((height, width, 3), 114, dtype=np.uint8)
        if self.detector is not None:
            self.detector([image])
        box = np.array([[width * 0.25, height * 0.25, width * 0.75, height * 0.75]], dtype=np.float64)
        s = SampleInput(key="_warm_up", image=image, width=width, height=height,
                        proposals=Proposals(boxes=box, scores=[None], labels=[None]))
        self.prepare(s)
        try:
            outputs = self._predict([s], self.chunk_rows)
        finally:
            s.prepared = None
        return [self.finish(out) for out in outputs]

    # ---------------------------------------------------------------------------------------------------------
    # prepare: CPU work ahead of the model
    def prepare(self, s: SampleInput) -> SampleInput:
        """Make ``s``'s model-input image (``ovsam.batch.prepare_image``) ahead of the model; a failure is kept in
        ``s.prepare_error`` and becomes the sample's ``model_error`` in :meth:`run_model`. Thread-safe; a no-op
        for samples the model part will not encode (bad status, no prompts, grid mode)."""
        if self.mode == "grid" or s.status != "ok" or s.image is None or s.prepared is not None:
            return s
        if self.mode == "sidecar" and (s.proposals is None or len(s.proposals) == 0):
            return s
        from ovsam import batch

        try:
            s.prepared = batch.prepare_image(self.model, s.image)
            s.prepare_error = None
        except Exception as e:  # noqa: BLE001 - reported as this sample's model_error
            s.prepare_error = e
        return s

    def _prepared(self, s: SampleInput) -> Any:
        if s.prepared is None and s.prepare_error is None:
            self.prepare(s)
        if s.prepare_error is not None:
            raise s.prepare_error
        return s.prepared

    # ---------------------------------------------------------------------------------------------------------
    # the model part
    def run_model(self, samples: Sequence[SampleInput],
                  emit: Callable[[PromptChunk], None] | None = None) -> list[ModelOutput]:
        """The model part for a batch: one :class:`ModelOutput` per sample, in order. Each chunk is passed to
        ``emit`` as soon as the model has computed it (a chunk of a batch attempt that fails afterwards is marked
        ``discarded``; the batch is then redone sample by sample). Never raises for a bad sample."""
        emit = emit or _emit_nothing
        try:
            return self._run_model(samples, emit)
        finally:
            for s in samples:
                s.prepared = None
                s.prepare_error = None

    def _run_model(self, samples: Sequence[SampleInput], emit: Callable[[PromptChunk], None]) -> list[ModelOutput]:
        ok = [s for s in samples if s.status == "ok" and s.image is not None]
        if self.mode == "whole-image":
            for s in ok:
                s.proposals = whole_image(s.image.shape[1], s.image.shape[0])
        elif self.detector is not None and ok:
            try:
                for s, props in zip(ok, self.detector([s.image for s in ok])):
                    s.proposals = props
            except Exception as e:  # a detector failure is this batch's model error, not the job's
                for s in ok:
                    _fail(s, e)
        results: dict[int, ModelOutput] = {}
        todo = [s for s in ok if s.status == "ok"]
        if self.mode == "grid":
            for s in todo:
                out = self._grid(s, emit)
                if out is not None:
                    results[id(s)] = out
        else:
            for s in todo:
                if s.proposals is None or len(s.proposals) == 0:
                    s.status = "no_prompts"
                    s.error = "; ".join(s.notes) or "the sample has no prompts"
            todo = [s for s in todo if s.status == "ok"]
            for out in self._boxes_and_points(todo, emit):
                results[id(out.sample)] = out
        return [results.get(id(s)) or ModelOutput(s) for s in samples]

    def _boxes_and_points(self, samples: list[SampleInput], emit: Callable[[PromptChunk], None]) -> list[ModelOutput]:
        """One backbone pass for the batch; if it fails, fall back to one sample at a time to isolate failures."""
        if not samples:
            return []
        try:
            return self._predict(samples, emit)
        except Exception as e:
            if len(samples) == 1:
                _fail(samples[0], e)
                return []
            logger.warning("batch of %d failed (%s); retrying sample by sample", len(samples), e)
            for s in samples:  # each sample's own attempt makes its input again, as a fresh call would
                if s.prepare_error is not None:
                    s.prepare_error = None
            out: list[ModelOutput] = []
            for s in samples:
                out.extend(self._boxes_and_points([s], emit))
            return out

    def _predict(self, samples: list[SampleInput], emit: Callable[[PromptChunk], None]) -> list[ModelOutput]:
        import torch

        from ovsam import batch as B
        from ovsam.prompts import PromptSet

        made: list[PromptChunk] = []

        def send(chunk: PromptChunk) -> PromptChunk:
            made.append(chunk)
            emit(chunk)
            return chunk

        try:
            prepared = [self._prepared(s) for s in samples]
            features = B.encode_images(self.model, torch.stack([p.tensor for p in prepared]))
            box_type = self.source.spec if self.detector is not None else "box"
            out = []
            for i, (s, p) in enumerate(zip(samples, prepared)):
                props = s.proposals
                chunks: list[PromptChunk] = []
                num_boxes = int(props.boxes.shape[0])
                # full-resolution masks cost ~5 bytes per pixel per prompt until RLE-encoded: bound them per chunk
                chunk = prompts_per_chunk(*p.original_size)
                for start in range(0, num_boxes, chunk):
                    pred = B.predict_prompts(self.model, features, i, PromptSet(boxes=props.boxes[start:start + chunk]),
                                             p.original_size, p.input_size, vocabulary=self.vocabulary)
                    rles = self._device_rles(pred)
                    chunks.append(send(PromptChunk(s.key, box_type, start, pred=pred, proposals=props,
                                                   prop_offset=start, rles=rles)))
                for start in range(0, props.points.shape[0], chunk):
                    pts = props.points[start:start + chunk, None, :]
                    pred = B.predict_prompts(self.model, features, i, PromptSet(
                        point_coords=pts, point_labels=np.ones(pts.shape[:2], dtype=np.int64)), p.original_size,
                        p.input_size, vocabulary=self.vocabulary)
                    rles = self._device_rles(pred)
                    chunks.append(send(PromptChunk(s.key, "point", num_boxes + start, pred=pred, rles=rles)))
                out.append(ModelOutput(s, len(props), chunks))
            return out
        except Exception:
            for c in made:
                c.discarded = True
            raise

    def _device_rles(self, pred: Any) -> list[dict[str, Any]] | None:
        """On an accelerator, the chunk's masks become RLE there (``ovsam.rle``) and only the RLE leaves it; on the
        CPU the row thread encodes them (pycocotools, beside the model) from the column-major copy made here."""
        if self.device_rle:
            from ovsam.rle import encode_rle_torch

            rles = encode_rle_torch(pred.masks)
            pred.masks = None
            return rles
        pred.masks = rle_layout(pred.masks)
        return None

    def _grid(self, s: SampleInput, emit: Callable[[PromptChunk], None]) -> ModelOutput | None:
        try:
            records = self.generator.generate(s.image)
        except Exception as e:
            _fail(s, e)
            return None
        chunk = PromptChunk(s.key, "grid", 0, records=records)
        emit(chunk)
        return ModelOutput(s, self.config.points_per_side ** 2, [chunk])

    # ---------------------------------------------------------------------------------------------------------
    # the row part
    def chunk_rows(self, chunk: PromptChunk) -> PromptChunk:
        """Build ``chunk``'s instance rows (``chunk.rows``; a failure goes to ``chunk.error``) and drop its dense
        masks. Runs on any thread; a discarded chunk is only dropped."""
        try:
            if not chunk.discarded and chunk.rows is None and chunk.error is None:
                chunk.rows = self._grid_rows(chunk) if chunk.prompt_type == "grid" else self._rows(chunk)
        except Exception as e:  # noqa: BLE001 - this sample's model_error
            chunk.error = e
        finally:
            chunk.pred = None
            chunk.records = None
        return chunk

    def finish(self, output: ModelOutput) -> SampleResult:
        """The sample's result once its chunks have rows (rows still missing are built here). A chunk whose rows
        failed makes the whole sample a ``model_error`` without instances."""
        s = output.sample
        if s.status != "ok" or not output.chunks:
            return SampleResult(_image_row(s, 0, 0), [])
        rows: list[dict[str, Any]] = []
        for c in output.chunks:
            if c.rows is None and c.error is None:
                self.chunk_rows(c)
            if c.error is not None:
                _fail(s, c.error)
                return SampleResult(_image_row(s, 0, 0), [])
            rows.extend(c.rows)
        return SampleResult(_image_row(s, len(rows), output.num_prompts), rows)

    def _rows(self, c: PromptChunk) -> list[dict[str, Any]]:
        pred, props = c.pred, c.proposals
        k = min(self.config.top_k, len(self.vocabulary))
        rles = c.rles if c.rles is not None else encode_masks(pred.masks)
        areas = rle_areas(rles)
        n = len(rles)
        label_scores = _np(pred.label_scores)
        background = _np(pred.background_scores).astype(np.float64).tolist()
        labels = _np(pred.labels).astype(np.int64)
        top = np.argsort(-label_scores, axis=1)[:, :k]
        label_list = labels.tolist()
        label_score = label_scores[np.arange(n), labels].astype(np.float64).tolist()
        topk_labels = top.astype(np.int64).tolist()
        topk_scores = np.take_along_axis(label_scores, top, axis=1).astype(np.float64).tolist()
        boxes = _np(pred.boxes_xyxy).astype(np.float64).tolist()
        quality = _np(pred.iou_scores).astype(np.float64).tolist()
        prompt = pred.prompt
        prompt_boxes = None if prompt.boxes is None else np.asarray(prompt.boxes, dtype=np.float64).tolist()
        prompt_points = None if prompt.point_coords is None else \
            np.asarray(prompt.point_coords, dtype=np.float64).tolist()
        point_labels = None if prompt.point_labels is None else \
            np.asarray(prompt.point_labels).astype(np.int64).tolist()
        det_scores = props.scores if props is not None and props.scores else None
        det_labels = props.labels if props is not None and props.labels else None
        names = self.vocabulary.names
        rows = []
        for j in range(n):
            label = label_list[j]
            rows.append({
                "image_key": c.key,
                "instance_index": c.first + j,
                "prompt_type": c.prompt_type,
                "prompt_box_xyxy": None if prompt_boxes is None else prompt_boxes[j],
                "prompt_points": None if prompt_points is None else prompt_points[j],
                "prompt_point_labels": None if point_labels is None else point_labels[j],
                "box_xyxy": boxes[j],
                "mask_rle": rles[j],
                "area": areas[j],
                "mask_quality": quality[j],
                "label": label,
                "label_name": names[label],
                "label_score": label_score[j],
                "background_score": background[j],
                "topk_labels": topk_labels[j],
                "topk_scores": topk_scores[j],
                "detector_score": None if det_scores is None else det_scores[c.prop_offset + j],
                "detector_label": None if det_labels is None else det_labels[c.prop_offset + j],
                "head_embedding": None, "clip_embedding": None, "clip_valid": None,
            })
        if self.config.store_embeddings:
            head = _np(pred.head_embeddings).astype(np.float16).tolist()
            clip = None if pred.clip_embeddings is None else _np(pred.clip_embeddings).astype(np.float16).tolist()
            valid = None if pred.clip_embeddings is None else [bool(v) for v in _np(pred.clip_valid)]
            for j, row in enumerate(rows):
                row["head_embedding"] = head[j]
                if clip is not None:
                    row["clip_embedding"] = clip[j]
                    row["clip_valid"] = valid[j]
            # labels from the stored float16 embeddings, so re-labelling with the same vocabulary reproduces them
            from pipeline.annotate.relabel import relabel_rows

            rows = relabel_rows(rows, self.vocabulary, self.model.config.recognition, k)
        return rows

    def _grid_rows(self, c: PromptChunk) -> list[dict[str, Any]]:
        from ovsam.masks import encode_rle

        rows = []
        for j, rec in enumerate(c.records):
            rows.append({
                "image_key": c.key, "instance_index": j, "prompt_type": "grid", "prompt_box_xyxy": None,
                "prompt_points": [list(map(float, p)) for p in rec["point_coords"]], "prompt_point_labels": [1],
                "box_xyxy": [float(v) for v in rec["box_xyxy"]], "mask_rle": encode_rle(rec["segmentation"][None])[0],
                "area": rec["area"], "mask_quality": rec["stability_score"], "label": rec["label"],
                "label_name": rec["label_name"], "label_score": rec["label_score"],
                "background_score": rec["background_score"], "topk_labels": rec["top_labels"], "topk_scores": rec["top_scores"], "detector_score": None,
                "detector_label": None, "head_embedding": None, "clip_embedding": None, "clip_valid": None,
            })
        return rows


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
        "source_format": s.source_format, "source_name": s.source_name,
    }
