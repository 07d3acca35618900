"""The model side of ``POST /v1/images/{id}/detect``: every instance of typed classes on a cached image.

The replica's open-vocabulary detector (``--detector``, built once per replica on its device at its precision)
finds the classes' boxes on the image's pixels (decoded again from its stored bytes: the feature cache keeps
features, not pixels); each box is then a box prompt to OV-SAM on the image's cached features, one decoder pass
for all of them, and OV-SAM names every mask among the same classes. An answer's instance is a segment answer's
(mask in the same encoding, its box, area, quality, label, label score, top-k) plus the detector's
``detector_label``, ``detector_score`` and ``detector_box``, in the detector's order (best score first).

The detector's query embeddings are cached per query set inside the detector; OV-SAM's vocabulary of a set of
classes is built once and kept among the latest :data:`VOCABULARIES_KEPT` sets.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Callable

from ovsam.batch import predict_images
from ovsam.precision import model_precision
from ovsam.prompts import validate_prompts
from ovsam.vocabulary import Vocabulary

from pipeline.annotate.detectors.queries import TextQueries
from pipeline.annotate.detectors.spec import DetectorOptions
from pipeline.serving.requests import DetectParams
from pipeline.serving.service import SegmentService, _encode_masks, _instance
from pipeline.serving.settings import ServeSettings

VOCABULARIES_KEPT = 32


def detector_info(name: str, options: DetectorOptions) -> dict[str, Any]:
    """What ``GET /healthz`` tells of the detector (the page shows its Find box when there is one)."""
    return {"name": name, "score_thresh": options.score_thresh, "nms_thresh": options.nms_thresh,
            "max_detections": options.max_detections, "template": options.template}


class DetectService:
    """One replica's detector beside its :class:`~.service.SegmentService` (same thread, same device)."""

    def __init__(self, service: SegmentService, detector: Any, name: str, options: DetectorOptions) -> None:
        self.service = service
        self.detector = detector
        self.name = name
        self.options = options
        self._vocabularies: OrderedDict[tuple[str, ...], Vocabulary] = OrderedDict()
        service.counters.setdefault("detects", 0)

    @classmethod
    def build(cls, service: SegmentService, settings: ServeSettings) -> DetectService | None:
        """The detector ``settings`` name on the service model's device and precision; None without one."""
        options = settings.detector_options()
        if options is None:
            return None
        from pipeline.annotate.detectors.build import build_proposer

        placeholder = SimpleNamespace(names=["object"], synonyms=[["object"]], split=None)  # queries come per call
        detector = build_proposer(f"detector:{settings.detector_name}", settings.detector_weights, options=options,
                                  vocabulary=placeholder, device=str(service.model.device),
                                  precision=model_precision(service.model))
        return cls(service, detector, settings.detector_name, options)

    def info(self) -> dict[str, Any]:
        return detector_info(self.name, self.options)

    def vocabulary(self, names: tuple[str, ...]) -> Vocabulary:
        """OV-SAM's vocabulary of ``names`` (each its own prompt), built once per set of names."""
        vocab = self._vocabularies.get(names)
        if vocab is None:
            model = self.service.model
            vocab = Vocabulary.from_names(list(names), model, progress=False, check_synonyms=False).to(model.device)
            self._vocabularies[names] = vocab
            while len(self._vocabularies) > VOCABULARIES_KEPT:
                self._vocabularies.popitem(last=False)
        self._vocabularies.move_to_end(names)
        return vocab

    def detect(self, image_id: str, params: DetectParams, load: Callable[[], bytes]) -> dict[str, Any]:
        """Every instance of ``params.text`` on the image ``load()`` returns the bytes of."""
        service = self.service
        model = service.model
        data = load()
        image = service.decode(data)
        queries = TextQueries.from_text(params.text, template=self.options.template)
        options = dataclasses.replace(
            self.options,
            score_thresh=self.options.score_thresh if params.detector_score_thresh is None
            else params.detector_score_thresh,
            max_detections=self.options.max_detections if params.max_detections is None else params.max_detections)
        start = time.perf_counter()
        found = self.detector.detect([image], queries, options=options)[0]
        state = service.image_state(image_id, lambda: data)
        vocab = self.vocabulary(tuple(queries.names))
        instances = []
        if len(found.boxes):
            prompts = validate_prompts(state.original_size, box=found.boxes, low_res_size=model.low_res_size)
            pred = predict_images(model, state.features, [prompts], [(state.original_size, state.input_size)],
                                  vocabulary=vocab)[0]
            rles = _encode_masks([pred.masks[i] for i in range(len(found.boxes))])
            for i, rle in enumerate(rles):
                inst = _instance(rle, int(pred.masks[i].sum()), pred.boxes_xyxy[i], float(pred.iou_scores[i]),
                                 pred.label_scores[i], int(pred.labels[i]), vocab, params.top_k, params.format)
                inst.update(detector_label=found.labels[i], detector_score=float(found.scores[i]),
                            detector_box=[float(v) for v in found.boxes[i]])
                instances.append(inst)
        service.model_seconds += time.perf_counter() - start
        service.counters["detects"] += 1
        return {"instances": instances, "text": list(queries.names), "detector": self.name,
                "detector_score_thresh": options.score_thresh, "max_detections": options.max_detections}


__all__ = ["VOCABULARIES_KEPT", "DetectService", "detector_info"]
