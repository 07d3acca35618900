"""The open-world systems of ``bench/model.py``: what it costs to find *and* name the objects of one 1024 x 768 image
when nobody gives boxes, at 80 classes (COCO, with its synonyms) or 1,203 (LVIS). Random weights.

- ``owlv2+ovsam``: ``OwlDetector`` (OWLv2 base-patch16, 960 px) queried with every synonym of every class
  (``a photo of a {}``; COCO: 173 queries, LVIS: 1,204), its top ``--detections`` boxes by score (threshold 0 and
  NMS off, so the count is fixed: random weights make both arbitrary), then OV-SAM on those boxes.
- ``grounding-dino+ovsam``: ``GroundingDetector`` (Grounding DINO tiny: Swin-T, 800 px, BERT-base), the same
  queries cut into captions of <= 256 tokens, each one full model call (backbone included), then OV-SAM.
- ``sam3``: transformers' ``Sam3Model`` (1008 px), one text concept per class (its name): the vision encoder once
  (``vision_embeds``), then a DETR encoder + decoder + mask decoder forward per concept (``--sam3-batch`` concepts
  side by side; the FLOPs do not depend on it); the best ``--detections`` masks upscaled and thresholded.
- ``grid``: ``ovsam.OvsamMaskGenerator``, ``--grid-points`` squared (32 x 32) points in decoder calls of 64.
- ``proposals:owlv2``: OWLv2's class-agnostic objectness head, top ``--detections`` boxes, then OV-SAM.

OV-SAM is the ``ovsam-rn50x16`` system's (``bench/systems.py``), with random embeddings of the row's real class
list; its image side and per-prompt side are timed and counted apart, as for the other systems. Once-per-vocabulary
text work (OWLv2's query embeddings, SAM 3's concept embeddings) is reported apart (``text_gflops``, ``text_s``);
Grounding DINO's BERT runs inside every call, so it is per image. ``--max-calls N`` runs at most N of the repeated
calls (SAM 3's concept forwards, Grounding DINO's captions, the grid's decoder calls) and scales that stage's
seconds and FLOPs linearly (``calls``, ``measured_calls``, ``extrapolated``). ``--tiny``: the tiny random models
of ``pipeline/annotate/detectors/tiny.py``, ``ovsam-tiny``, a 16 x 16 grid.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing may be fetched

import numpy as np  # noqa: E402
import torch  # noqa: E402

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import (ORIGINAL_SIZE, count_flops, params_millions, percentile, random_vocabulary,  # noqa: E402
                          timed)
from bench.systems import OvsamSystem, StageClock, System, make_inputs  # noqa: E402
from pipeline.annotate.detectors.grounding import GroundingDetector  # noqa: E402
from pipeline.annotate.detectors.hf import autocast  # noqa: E402
from pipeline.annotate.detectors.owl import OwlDetector  # noqa: E402
from pipeline.annotate.detectors.queries import TextQueries  # noqa: E402
from pipeline.annotate.detectors.spec import DetectorOptions  # noqa: E402
from pipeline.annotate.detectors.tiny import save_tiny_detector, save_tiny_sam3  # noqa: E402

from bench.full_size import clip_tokenizer, save_full_detector  # noqa: E402

SYSTEMS = ("owlv2+ovsam", "grounding-dino+ovsam", "sam3", "grid", "proposals:owlv2")
POINTS_PER_BATCH = 64
BUILTIN_BY_SIZE = {80: "coco", 1203: "lvis", 21841: "imagenet21k"}


# ----------------------------------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassSet:
    """A row's vocabulary: a built-in list's ``label`` (``coco``, ``lvis``, ``imagenet21k``), names and synonyms."""

    label: str
    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.names)


def parse_classes(text: str) -> list[ClassSet]:
    """``--classes``: comma-separated built-in list names or their sizes (80 = COCO, 1203 = LVIS, 21841 =
    ImageNet-21k), each with its real names and synonyms."""
    from ovsam import Vocabulary

    out = []
    for item in (s.strip() for s in str(text).split(",") if s.strip()):
        name = BUILTIN_BY_SIZE.get(int(item), item) if item.isdigit() else item
        if name not in Vocabulary.builtin_names():
            raise ValueError(f"--classes expects built-in list names ({', '.join(Vocabulary.builtin_names())}) or "
                             f"their sizes ({', '.join(map(str, BUILTIN_BY_SIZE))}), e.g. 80,1203; got {item!r}")
        names, synonyms, _ = Vocabulary.class_list(name)
        out.append(ClassSet(name, tuple(names), tuple(tuple(s) for s in synonyms)))
    if not out:
        raise ValueError("--classes is empty")
    return out


class FlopClock:
    """``StageClock``'s interface counting FLOPs per stage (a ``FlopCounterMode`` per stage) instead of seconds."""

    def __init__(self) -> None:
        self.flops: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with FlopCounterMode(display=False) as counter:
            yield
        self.flops[name] += float(counter.get_total_flops())


# -------------------------------------------------------------------------------------------------- systems


class OpenWorldSystem(System):
    """One system: ``set_classes``, then ``text_pass`` (once per vocabulary), ``image_pass`` and ``box_pass``, each
    recording its stages in a clock. ``unit_stage`` is the stage made of ``calls()`` repeated calls, of which only
    the measured ones run; ``prompts`` is the row's prompt count (boxes, masks or grid points). ``settings``:
    ``tiny``, ``device``, ``detections``, ``max_calls`` (None: all), ``sam3_batch``, ``grid_points`` (None:
    default), ``seed`` (``bench/model.py``'s options)."""

    unit_stage: str | None = None
    text_stage: str | None = None
    prompts = 0
    query_count = 0  # text queries (or concepts) read per vocabulary

    def __init__(self, name: str, settings: Any, precision: str) -> None:
        self.name, self.settings, self.device, self.precision = name, settings, torch.device(settings.device), precision
        self.image = np.random.default_rng(settings.seed).integers(0, 256, (*ORIGINAL_SIZE, 3), dtype=np.uint8)
        self.original_size = ORIGINAL_SIZE
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-open-world-")
        self.classes: ClassSet | None = None

    def calls(self) -> tuple[int, int]:
        """``(calls per image, calls run)`` of ``unit_stage``."""
        return 1, 1

    def factor(self) -> float:
        """All the work of ``unit_stage`` over the work run (calls; SAM 3: concepts; grid: points)."""
        total, run = self.calls()
        return total / run

    def workload_key(self) -> Any:
        """Equal keys (not None) for two vocabularies: the measured work is the same, so it is measured once."""
        return None

    def set_classes(self, classes: ClassSet) -> None:
        self.classes = classes

    def text_pass(self, clock: Any) -> None:
        return None

    def _limit(self, total: int) -> int:
        m = self.settings.max_calls
        return total if m is None else max(1, min(total, m))

    def close(self) -> None:
        self._tmp.cleanup()


class _WithOvsam(OpenWorldSystem):
    """A system whose masks and labels come from OV-SAM (the ``ovsam-rn50x16`` system's model and passes)."""

    def __init__(self, name: str, settings: Any, precision: str) -> None:
        super().__init__(name, settings, precision)
        self.ovsam = OvsamSystem("ovsam-rn50x16", settings.tiny, settings.device, precision, "coco")
        o = self.ovsam
        self.inputs = make_inputs(1, o.image_size, ORIGINAL_SIZE, o.device, o.memory_format, settings.seed)

    def set_classes(self, classes: ClassSet) -> None:
        super().set_classes(classes)
        m = self.ovsam.model  # random embeddings of the real class list, as the ovsam-rn50x16 system's
        self.ovsam.set_vocabulary(random_vocabulary(classes.label, m.text_dim, m.clip_model_name))

    @property
    def vocabulary(self) -> Any:
        return self.ovsam.vocabulary

    def _precision_holders(self) -> list[Any]:
        return [self, self.ovsam.model]


class DetectorSystem(_WithOvsam):
    """``owlv2+ovsam``, ``grounding-dino+ovsam``, ``proposals:owlv2``: a project detector, then OV-SAM."""

    def __init__(self, name: str, settings: Any, precision: str) -> None:
        super().__init__(name, settings, precision)
        self.family = "grounding" if name.startswith("grounding") else "owl"
        self.objectness = name.startswith("proposals")
        self.model_name = "grounding-dino" if self.family == "grounding" else "owlv2"
        (save_tiny_detector if settings.tiny else save_full_detector)(self.model_name, self._tmp.name)
        self.options = DetectorOptions(score_thresh=0.0, nms_thresh=1.0, max_detections=settings.detections,
                                       batch_size=1)
        self.queries = self.measured_queries = None
        self._captions = (1, 1)
        kwargs = dict(options=self.options, device=str(self.device), precision=precision)
        if self.family == "grounding":  # queries: placeholders until set_classes (detect is given them)
            self.detector = GroundingDetector(self.model_name, self._tmp.name, queries=None, **kwargs)
        else:
            self.detector = OwlDetector(self.model_name, self._tmp.name, queries=TextQueries.from_text("object"),
                                        objectness=self.objectness, **kwargs)
        m = self.detector.model.requires_grad_(False)
        per_image = [m] if self.family == "grounding" else [  # OWL's text tower runs once per vocabulary
            mod for n, mod in m.named_children() if n != m.base_model_prefix] + [
            getattr(m, m.base_model_prefix).vision_model]
        self.params_m = params_millions(*per_image) + self.ovsam.params_m
        self.description = f"{name.split('+')[0]} ({type(m).__name__}) + {self.ovsam.description}"
        self.unit_stage = "detector" if self.family == "grounding" else None
        self.text_stage = "text_embeddings" if self.family == "owl" and not self.objectness else None

    def set_classes(self, classes: ClassSet) -> None:
        super().set_classes(classes)
        if self.objectness:
            return
        self.queries = self.measured_queries = TextQueries.from_synonyms(classes.names, classes.synonyms)
        if self.family == "grounding":
            captions = self.detector.captions(self.queries)
            k = self._limit(len(captions))
            if k < len(captions):  # the queries of the first k captions make exactly those captions
                q = self.queries
                n = sum(c.text.count(".") for c in captions[:k])
                self.measured_queries = type(q)(q.texts[:n], q.classes[:n], q.names, q.template)
            self._captions = (len(captions), k)
        self.query_count = len(self.queries)

    def calls(self) -> tuple[int, int]:
        return self._captions if self.family == "grounding" else (1, 1)

    def text_pass(self, clock: Any) -> None:
        if self.text_stage is None:
            return
        self.detector._embeddings.clear()  # computed again: the once-per-vocabulary cost
        with clock(self.text_stage):
            self.detector.query_embeddings(self.queries)

    def image_pass(self, clock: Any) -> Any:
        with clock("detector"):
            if self.objectness:
                found = self.detector.propose([self.image])[0]
            else:
                found = self.detector.detect([self.image], self.measured_queries)[0]
        features = self.ovsam.image_pass(self.inputs, clock)
        return features, found

    def box_pass(self, features: Any, clock: Any) -> Any:
        from ovsam import transforms as T

        features, found = features
        boxes = torch.as_tensor(found.boxes[: self.settings.detections], dtype=torch.float32)
        boxes = T.apply_boxes(boxes, self.original_size, self.inputs.input_size).to(self.ovsam.device)
        self.prompts = int(boxes.shape[0])
        return self.ovsam.box_pass(features, self.inputs, [boxes], clock)

    def _precision_holders(self) -> list[Any]:
        return [self, self.ovsam.model, self.detector]


class GridSystem(_WithOvsam):
    """``grid``: ``OvsamMaskGenerator`` on OV-SAM's features of the image."""

    unit_stage = "grid"

    def __init__(self, name: str, settings: Any, precision: str) -> None:
        super().__init__(name, settings, precision)
        self.side = settings.grid_points or (16 if settings.tiny else 32)
        self.params_m = self.ovsam.params_m
        self.description = f"{self.ovsam.description} everything mode, {self.side} x {self.side} points"
        self.prompts = self.side * self.side

    def calls(self) -> tuple[int, int]:
        total = math.ceil(self.side ** 2 / POINTS_PER_BATCH)
        return total, self._limit(total)

    def factor(self) -> float:
        return self.side ** 2 / min(self.side ** 2, self.calls()[1] * POINTS_PER_BATCH)

    def set_classes(self, classes: ClassSet) -> None:
        import ovsam

        super().set_classes(classes)
        points = self.calls()[1] * POINTS_PER_BATCH
        self.generator = ovsam.OvsamMaskGenerator(self.ovsam.model, self.vocabulary, points_per_side=self.side,
                                                  points_per_batch=POINTS_PER_BATCH)
        full_grid = self.generator.point_grid
        self.generator.point_grid = lambda size: full_grid(size)[:points]  # the measured calls' points

    def image_pass(self, clock: Any) -> Any:
        return self.ovsam.image_pass(self.inputs, clock)

    def box_pass(self, features: Any, clock: Any) -> Any:
        self.generator.predictor.load_features(features, self.original_size, self.inputs.input_size)
        with clock("grid"):
            return self.generator.generate_for_set_image()


class Sam3System(OpenWorldSystem):
    """``sam3``: transformers' ``Sam3Model``; see the module docstring."""

    unit_stage = "detr+masks"
    text_stage = "text_embeddings"

    def __init__(self, name: str, settings: Any, precision: str) -> None:
        super().__init__(name, settings, precision)
        import transformers as tf

        if settings.tiny:
            save_tiny_sam3(self._tmp.name, seed=settings.seed)
            model = tf.Sam3Model.from_pretrained(self._tmp.name)
            self.processor = tf.Sam3Processor.from_pretrained(self._tmp.name)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                model = tf.Sam3Model(tf.Sam3Config())
            self.processor = tf.Sam3Processor(image_processor=tf.Sam3ImageProcessor(),
                                              tokenizer=clip_tokenizer(self._tmp.name, 32))
        self.model = m = model.eval().requires_grad_(False).to(self.device)
        self.params_m = params_millions(m.vision_encoder, m.detr_encoder, m.detr_decoder, m.mask_decoder,
                                        m.dot_product_scoring)
        self.description = f"SAM 3 ({m.config.vision_config.backbone_config.image_size} px, " \
                           f"{m.config.detr_decoder_config.num_queries} queries per concept)"
        self.batch, self.text = max(1, settings.sam3_batch), None

    def set_classes(self, classes: ClassSet) -> None:
        super().set_classes(classes)
        self.query_count = len(classes)

    def calls(self) -> tuple[int, int]:
        total = math.ceil(len(self.classes) / self.batch)
        return total, self._limit(total)

    def measured_concepts(self) -> list[str]:
        concepts = [" ".join(n.replace("_", " ").split()) for n in self.classes.names]
        return concepts[: self.calls()[1] * self.batch]

    def factor(self) -> float:  # also the text work's: only the measured concepts are embedded
        return len(self.classes) / len(self.measured_concepts())

    def workload_key(self) -> Any:
        total, k = self.calls()
        return ("concepts", k * self.batch) if k < total else None

    def text_pass(self, clock: Any) -> None:
        concepts = self.measured_concepts()
        with clock(self.text_stage), torch.inference_mode(), autocast(self.device, self.precision):
            tokens = self.processor.tokenizer(concepts, return_tensors="pt", padding="max_length", max_length=32,
                                              truncation=True)
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            parts = [self.model.get_text_features(input_ids=ids[s:s + self.batch],
                                                  attention_mask=mask[s:s + self.batch]).pooler_output
                     for s in range(0, len(concepts), self.batch)]
        self.text = (torch.cat(parts), mask)

    def image_pass(self, clock: Any) -> Any:
        n = self.settings.detections
        embeds, mask = self.text
        with torch.inference_mode(), autocast(self.device, self.precision):
            with clock("vision"):
                pixels = self.processor.image_processor(images=[self.image], return_tensors="pt")["pixel_values"]
                vision = self.model.get_vision_features(pixel_values=pixels.to(self.device))
            best = None
            with clock(self.unit_stage):
                for s in range(0, embeds.shape[0], self.batch):
                    e, m = embeds[s:s + self.batch], mask[s:s + self.batch]
                    b = e.shape[0]
                    expanded = SimpleNamespace(
                        fpn_hidden_states=[f.expand(b, *f.shape[1:]) for f in vision.fpn_hidden_states],
                        fpn_position_encoding=[f.expand(b, *f.shape[1:]) for f in vision.fpn_position_encoding],
                        hidden_states=None, attentions=None)
                    out = self.model(vision_embeds=expanded, text_embeds=SimpleNamespace(pooler_output=e),
                                     attention_mask=m)
                    scores = (out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()).flatten()
                    labels = torch.arange(s, s + b, device=scores.device).repeat_interleave(out.pred_logits.shape[1])
                    cand = (scores, out.pred_masks.flatten(0, 1), out.pred_boxes.flatten(0, 1), labels)
                    if best is not None:
                        cand = tuple(torch.cat([x, y]) for x, y in zip(best, cand))
                    top = cand[0].topk(min(n, cand[0].numel())).indices
                    best = tuple(x[top] for x in cand)  # the best masks so far over all concepts
        return best

    def box_pass(self, features: Any, clock: Any) -> Any:
        scores, masks, boxes, labels = features
        h, w = self.original_size
        with clock("masks+labels"), torch.inference_mode():
            up = torch.nn.functional.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear",
                                                 align_corners=False)[:, 0] > 0
            boxes = boxes.float() * torch.tensor([w, h, w, h], device=boxes.device)
            names = [self.classes.names[i] for i in labels.tolist()]
        self.prompts = int(up.shape[0])
        return up, boxes, scores, names


def build(name: str, settings: Any, precision: str) -> OpenWorldSystem:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars
    if name in ("owlv2+ovsam", "grounding-dino+ovsam", "proposals:owlv2"):
        return DetectorSystem(name, settings, precision)
    if name == "grid":
        return GridSystem(name, settings, precision)
    if name == "sam3":
        return Sam3System(name, settings, precision)
    raise ValueError(f"unknown open-world system {name!r}; expected one of {', '.join(SYSTEMS)}")


# ---------------------------------------------------------------------------------------------- measurement


def _count(system: OpenWorldSystem) -> dict[str, Any]:
    """FLOPs of the text, image and box passes, total and per stage, on eager fp32 passes."""
    out, clocks = {}, {part: FlopClock() for part in ("text", "image", "boxes")}
    with torch.no_grad(), system.full_precision():
        out["text"] = count_flops(lambda: system.text_pass(clocks["text"]))[0]
        out["image"], features = count_flops(lambda: system.image_pass(clocks["image"]))
        out["boxes"] = count_flops(lambda: system.box_pass(features, clocks["boxes"]))[0]
    return {part: (total, dict(clocks[part].flops)) for part, total in out.items()}


def _time(system: OpenWorldSystem, repeats: int, warmup: int) -> dict[str, Any]:
    dev = system.device
    with torch.no_grad():
        system.text_pass(StageClock(dev))  # the image side needs the text embeddings
        for _ in range(warmup):
            system.box_pass(system.image_pass(StageClock(dev)), StageClock(dev))
        text_clock = StageClock(dev)
        text_s, _ = timed(lambda: system.text_pass(text_clock), dev)
        image, box = [], []
        for _ in range(repeats):
            clock = StageClock(dev)
            seconds, features = timed(lambda: system.image_pass(clock), dev)
            image.append((seconds, dict(clock.seconds)))
            clock = StageClock(dev)
            seconds, _ = timed(lambda: system.box_pass(features, clock), dev)
            box.append((seconds, dict(clock.seconds)))
    return {"text": (text_s, dict(text_clock.seconds)), "image": image, "boxes": box, "prompts": system.prompts}


def measure(system: OpenWorldSystem, classes: ClassSet, repeats: int, warmup: int, flop_cache: dict,
            time_cache: dict) -> dict[str, Any]:
    """One row (without the ceiling-derived fields) of ``system`` at ``classes``. Work measured for an earlier
    vocabulary with the same ``workload_key`` is reused; the extrapolation factors are this vocabulary's."""
    system.set_classes(classes)
    key = system.workload_key()
    fkey = (system.name, key if key is not None else classes.label)
    if fkey not in flop_cache:
        flop_cache[fkey] = _count(system)
    tkey = (system.name, system.precision, key if key is not None else classes.label)
    if tkey not in time_cache:
        time_cache[tkey] = _time(system, repeats, warmup)
    flops, t = flop_cache[fkey], time_cache[tkey]
    total_calls, run_calls = system.calls()
    factor = system.factor()
    unit = system.unit_stage

    def scaled(total: float, stages: dict[str, float], f: float = factor, stage: str | None = unit) -> float:
        return total + (f - 1) * stages.get(stage, 0.0) if stage else total

    gflops_image = scaled(*flops["image"]) / 1e9
    gflops_boxes = scaled(*flops["boxes"]) / 1e9
    image_samples = [scaled(s, st) for s, st in t["image"]]
    box_samples = [scaled(s, st) for s, st in t["boxes"]]
    samples = [a + b for a, b in zip(image_samples, box_samples)]
    stages, stage_gflops = {}, {}
    for group in (t["image"], t["boxes"]):
        for name in group[0][1]:
            f = factor if name == unit else 1.0
            stages[name] = f * statistics.median(st[name] for _, st in group)
    for part in ("image", "boxes"):
        for name, v in flops[part][1].items():
            stage_gflops[name] = (factor if name == unit else 1.0) * v / 1e9
    text_scale = factor if isinstance(system, Sam3System) else 1.0
    p50 = percentile(samples, 50)
    gflops = gflops_image + gflops_boxes
    vocab = getattr(system, "vocabulary", None)
    return {
        "system": system.name, "model": system.description, "precision": system.precision, "compile": False,
        "batch": 1, "boxes": t["prompts"], "classes": len(classes), "class_list": classes.label,
        "queries": system.query_count, "prototypes": vocab.num_prototypes if vocab is not None else 1,
        "params_m": system.params_m, "gflops": gflops, "gflops_image": gflops_image, "gflops_boxes": gflops_boxes,
        "gflops_per_image": gflops, "p50_s": p50, "p90_s": percentile(samples, 90), "images_per_s": 1 / p50,
        "image_p50_s": percentile(image_samples, 50), "boxes_p50_s": percentile(box_samples, 50),
        "samples_s": samples, "stages": stages, "stage_gflops": stage_gflops,
        "text_gflops": flops["text"][0] * text_scale / 1e9 if system.text_stage else None,
        "text_s": t["text"][0] * text_scale if system.text_stage else None,
        "calls": total_calls, "measured_calls": run_calls, "extrapolated": run_calls < total_calls,
        "extrapolated_stage": unit if run_calls < total_calls else None, "device": str(system.device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


__all__ = ["SYSTEMS", "ClassSet", "FlopClock", "OpenWorldSystem", "build", "measure", "parse_classes"]
