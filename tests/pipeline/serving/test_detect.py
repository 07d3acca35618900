"""``POST /v1/images/{id}/detect`` in this process: the FastAPI app over a :class:`LocalBackend` (the replica's
services on one worker thread), served by uvicorn on loopback. The Ray Serve path of the same route, and the
browser page's Find box, are in ``test_api.py``.

- The answer equals the detector's ``detect`` followed by OV-SAM's box prompts (``OvsamPredictor``) on the same
  image, with the vocabulary of the typed classes; the request's threshold and cap override the server's.
- Features evicted from the cache are computed again from the stored bytes: the answer does not change.
- Bad bodies get 422 naming the field; a server without a detector answers 404 ``detector_not_configured``, and
  ``/healthz`` tells the page whether there is one.
- ``ovsam serve``'s detector options: usage errors before Ray starts.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.pipeline.serve_fixtures import Client, free_port, scene

CLASSES = ["traffic cone", "pastry"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from pipeline.annotate.detectors.tiny import save_tiny_detector

    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(save_tiny_detector("owlv2", tmp_path_factory.mktemp("owlv2")))


def _serve(settings):
    """The app of ``settings`` over a LocalBackend, served on a free loopback port; yields (client, backend)."""
    import uvicorn

    import ovsam
    from pipeline.serving.api import LocalBackend, make_app
    from pipeline.serving.detect import DetectService
    from pipeline.serving.service import SegmentService

    backend = LocalBackend(None)

    def build():  # on the backend's worker thread, as every torch call of a replica
        model = ovsam.build_ovsam(settings.model, precision=settings.precision)
        vocabulary = ovsam.Vocabulary.resolve(settings.vocabulary, model, progress=False)
        service = SegmentService(model, vocabulary, cache_bytes=settings.cache_bytes,
                                 cache_ttl_s=settings.cache_ttl, max_pixels=settings.max_pixels)
        return service, DetectService.build(service, settings)

    backend.service, backend.detect_service = backend._pool.submit(build).result()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(backend, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Client(f"http://127.0.0.1:{port}", token=None), backend
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        backend._pool.shutdown()


@pytest.fixture(scope="module")
def served(weights):
    from pipeline.serving.settings import ServeSettings

    settings = ServeSettings(model="ovsam-tiny", precision="fp32", vocabulary="coco", detector="owlv2",
                             detector_weights=weights, detector_score_thresh=0.15, max_detections=50)
    yield from _serve(settings)


@pytest.fixture(scope="module")
def bare():
    """A server without a detector."""
    from pipeline.serving.settings import ServeSettings

    yield from _serve(ServeSettings(model="ovsam-tiny", precision="fp32", vocabulary="coco"))


@pytest.fixture(scope="module")
def reference(weights):
    import ovsam
    from pipeline.annotate.detectors.owl import OwlDetector
    from pipeline.annotate.detectors.queries import TextQueries
    from pipeline.annotate.detectors.spec import parse_prompt_source, resolve_options

    model = ovsam.build_ovsam("ovsam-tiny", precision="fp32")
    vocab = ovsam.Vocabulary.from_names(CLASSES, model, progress=False, check_synonyms=False)
    queries = TextQueries.from_text(CLASSES)
    options = resolve_options(parse_prompt_source("detector:owlv2"))
    detector = OwlDetector("owlv2", weights, options=options, queries=queries)

    def run(image, **overrides):
        import dataclasses

        found = detector.detect([image], queries, options=dataclasses.replace(options, **overrides))[0]
        predictor = ovsam.OvsamPredictor(model, vocab)
        predictor.set_image(image)
        return found, (predictor.predict(box=found.boxes) if len(found.boxes) else None)

    return run


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def assert_detect_answer(answer: dict, found, pred, names: list[str] = CLASSES, tolerance: float = 0.0) -> None:
    """A detect answer is the detector's boxes, in order, each with OV-SAM's mask and label of that box.
    ``tolerance`` > 0 compares an answer from another process, which computes with another number of threads, so
    its float sums may differ in the last bits: the detector's boxes and scores within ``tolerance``, and OV-SAM's
    masks (whose random-weight logits sit near the threshold in places) to a few pixels."""
    instances = answer["instances"]
    assert len(instances) == len(found.boxes) > 0, "the tiny detector must find something for this to mean much"
    assert [i["detector_label"] for i in instances] == found.labels
    if tolerance == 0:
        assert [i["detector_box"] for i in instances] == found.boxes.tolist()
        assert [i["detector_score"] for i in instances] == found.scores
    else:
        np.testing.assert_allclose([i["detector_box"] for i in instances], found.boxes, atol=tolerance, rtol=0)
        np.testing.assert_allclose([i["detector_score"] for i in instances], found.scores, atol=tolerance, rtol=0)
    for inst, mask, box, quality, scores, label in zip(instances, pred.masks, pred.boxes_xyxy, pred.iou_scores,
                                                       pred.label_scores, pred.labels):
        if tolerance == 0:
            assert inst["mask"] == {"size": list(mask.shape), "counts": _rle(mask)}
            assert inst["area"] == int(mask.sum())
            assert inst["box"] == [float(v) for v in box]
        else:
            got = mask_utils.decode({"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()}) > 0
            assert got.shape == mask.shape and np.mean(got != mask) < 1e-3 and inst["area"] == int(got.sum())
            assert inst["box"] == pytest.approx([float(v) for v in box], abs=2)
        assert inst["mask_quality"] == pytest.approx(float(quality), abs=max(1e-6, tolerance))
        assert inst["label"] == names[int(label)]
        assert inst["label_score"] == pytest.approx(float(scores[label]), abs=max(1e-6, tolerance))
        assert inst["detector_label"] in names


def test_detect_equals_the_detector_then_box_prompts(served, reference):
    client, backend = served
    image = scene(3, 120, 160)
    up = client.upload(image)
    status, answer = client.request("POST", f"/v1/images/{up['image_id']}/detect", {"text": CLASSES})
    assert status == 200, answer
    assert answer["text"] == CLASSES and answer["detector"] == "owlv2"
    assert (answer["detector_score_thresh"], answer["max_detections"]) == (0.15, 50)  # the server's defaults
    found, pred = reference(image, score_thresh=0.15, max_detections=50)
    assert_detect_answer(answer, found, pred)
    assert all(i["detector_score"] > 0.15 for i in answer["instances"])
    # the request's threshold and cap; a comma-separated string is the same classes
    body = {"text": "traffic cone, pastry", "detector_score_thresh": 0.1, "max_detections": 3, "top_k": 1}
    status, capped = client.request("POST", f"/v1/images/{up['image_id']}/detect", body)
    assert status == 200, capped
    found, pred = reference(image, score_thresh=0.1, max_detections=3)
    assert len(found.boxes) == 3
    assert_detect_answer(capped, found, pred)
    assert all(len(i["topk"]) == 1 for i in capped["instances"])
    # evicted features are computed again from the stored bytes: the same answer
    backend._pool.submit(backend.service.cache.pop, up["image_id"]).result()
    status, again = client.request("POST", f"/v1/images/{up['image_id']}/detect", {"text": CLASSES})
    assert status == 200 and again == answer
    assert backend.service.counters["re_embeds"] == 1 and backend.service.counters["detects"] == 3
    assert len(backend.detect_service._vocabularies) == 1  # one set of classes: one vocabulary, built once


def test_polygons_and_nothing_found(served):
    from pipeline.export.coco import mask_polygons

    client, _ = served
    up = client.upload(scene(4))
    path = f"/v1/images/{up['image_id']}/detect"
    status, rle = client.request("POST", path, {"text": ["pastry"], "max_detections": 2})
    status2, poly = client.request("POST", path, {"text": ["pastry"], "max_detections": 2, "format": "polygon"})
    assert status == status2 == 200
    assert [i["mask"] for i in poly["instances"]] == [mask_polygons(i["mask"]) for i in rle["instances"]]
    status, empty = client.request("POST", path, {"text": ["pastry"], "detector_score_thresh": 0.999})
    assert status == 200 and empty["instances"] == []


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"text": []}, 422, "invalid_field", "text"),
    ({"text": ""}, 422, "invalid_field", "text"),
    ({"text": [" ", "pastry"]}, 422, "invalid_field", "text[0]"),
    ({"text": ["pastry", 3]}, 422, "invalid_field", "text[1]"),
    ({"text": {"a": 1}}, 422, "invalid_field", "text"),
    ({}, 422, "invalid_field", "text"),
    ({"text": ["pastry"], "detector_score_thresh": 1.5}, 422, "invalid_field", "detector_score_thresh"),
    ({"text": ["pastry"], "detector_score_thresh": -0.1}, 422, "invalid_field", "detector_score_thresh"),
    ({"text": ["pastry"], "detector_score_thresh": "high"}, 422, "invalid_field", "detector_score_thresh"),
    ({"text": ["pastry"], "max_detections": 0}, 422, "invalid_field", "max_detections"),
    ({"text": ["pastry"], "max_detections": 2.5}, 422, "invalid_field", "max_detections"),
    ({"text": ["pastry"], "format": "png"}, 422, "invalid_field", "format"),
    ({"text": ["pastry"], "vocabulary": "default"}, 422, "invalid_field", "vocabulary"),
    ([1, 2], 400, "invalid_json", None),
])
def test_bad_bodies(served, body, status, code, field):
    client, _ = served
    up = client.upload(scene(5))
    got, answer = client.request("POST", f"/v1/images/{up['image_id']}/detect", body)
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (status, code, field), answer
    assert answer["error"]["message"]


def test_unknown_image_and_health(served):
    client, _ = served
    status, answer = client.request("POST", "/v1/images/AAAAAAAAAAAAAAAAAAAAAA/detect", {"text": ["pastry"]})
    assert (status, answer["error"]["code"]) == (404, "image_not_found")
    status, health = client.request("GET", "/healthz")
    assert status == 200 and health["detector"] == {"name": "owlv2", "score_thresh": 0.15, "nms_thresh": 0.3,
                                                    "max_detections": 50, "template": "a photo of a {}"}


def test_a_server_without_a_detector_says_so(bare):
    client, backend = bare
    assert backend.detect_service is None
    up = client.upload(scene(6))
    status, answer = client.request("POST", f"/v1/images/{up['image_id']}/detect", {"text": ["pastry"]})
    assert (status, answer["error"]["code"]) == (404, "detector_not_configured"), answer
    assert "--detector-weights" in answer["error"]["message"]
    status, health = client.request("GET", "/healthz")
    assert status == 200 and health["detector"] is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--detector", "owlv2"], "--detector need --detector-weights"),
    (["--max-detections", "5"], "--max-detections need --detector-weights"),
    (["--detector-weights", "{root}/nowhere"], "nowhere: no such directory"),
    (["--detector", "owlvit", "--detector-weights", "{weights}"], "'owlv2' model, not 'owlvit'"),
    (["--detector-weights", "{weights}", "--detector-template", "no slot"], "--detector-template"),
    (["--detector-weights", "{weights}", "--max-detections", "0"], "--max-detections"),
])
def test_serve_detector_usage_errors(weights, tmp_path, capsys, argv, message):
    from jobs.cli import main

    argv = [a.format(root=tmp_path, weights=weights) for a in argv]
    try:
        rc = main(["serve", *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_serve_settings_carry_the_detector(weights):
    import argparse

    from jobs.serve import add_arguments, settings_from_args
    from pipeline.serving.settings import ServeSettings

    p = argparse.ArgumentParser()
    add_arguments(p)
    settings = settings_from_args(p.parse_args(["--detector-weights", weights, "--detector-score-thresh", "0.2"]))
    assert (settings.detector, settings.detector_weights, settings.detector_score_thresh) == ("owlv2", weights, 0.2)
    assert settings.detector_options().score_thresh == 0.2
    built = ServeSettings.from_args({"detector_weights": weights, "max_detections": "7"})  # `serve run` key=value
    assert built.detector_name == "owlv2" and built.detector_options().max_detections == 7
    with pytest.raises(ValueError, match="detector_weights"):
        ServeSettings(detector="owlv2").detector_options()
