"""``ovsam predict --text``: a tiny random-weight OWLv2 finds the typed classes, its boxes are OV-SAM's box prompts,
and OV-SAM names each mask among the same classes; the result is exactly the detector's ``detect`` followed by
``OvsamPredictor.predict(box=...)``. The usage errors of ``--text`` exit 2 before anything is built."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main

CLASSES = ["traffic cone", "pastry"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, monkeypatch_module):
    import ovsam
    from ovsam.checkpoint import save_checkpoint
    from pipeline.annotate.detectors.tiny import save_tiny_detector

    root = tmp_path_factory.mktemp("predict_text")
    checkpoint = save_checkpoint(ovsam.build_ovsam("ovsam-tiny"), root / "tiny.safetensors")
    weights = save_tiny_detector("owlv2", root / "owlv2")
    images = []
    for seed, (h, w) in [(0, (150, 210)), (1, (120, 96))]:
        rng = np.random.default_rng(seed)
        image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        image[20:90, 30:80] = (230, 120, 20)
        image[60:110, w - 70:w - 10] = (200, 170, 120)
        path = root / f"scene{seed}.png"
        Image.fromarray(image).save(path)
        images.append((path, image))
    return {"root": root, "checkpoint": str(checkpoint), "weights": str(weights), "images": images}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing is fetched: the tiny detector is a local directory
        yield mp


def _common(setup) -> list[str]:
    return ["--checkpoint", setup["checkpoint"], "--precision", "fp32", "--device", "cpu"]


def _reference(setup, image: np.ndarray, **options):
    """The detector's ``detect`` and the OV-SAM box-prompt path, called directly."""
    import ovsam
    from pipeline.annotate.detectors.owl import OwlDetector
    from pipeline.annotate.detectors.queries import TextQueries
    from pipeline.annotate.detectors.spec import parse_prompt_source, resolve_options

    opts = resolve_options(parse_prompt_source("detector:owlv2"), **options)
    queries = TextQueries.from_text(",".join(CLASSES), template=opts.template)
    detector = OwlDetector("owlv2", setup["weights"], options=opts, queries=queries)
    found = detector.detect([image], queries, options=opts)[0]
    model = ovsam.build_ovsam("ovsam-tiny", checkpoint=setup["checkpoint"], precision="fp32")
    vocabulary = ovsam.Vocabulary.from_names(CLASSES, model, progress=False)
    predictor = ovsam.OvsamPredictor(model, vocabulary)
    predictor.set_image(image)
    pred = predictor.predict(box=found.boxes) if len(found.boxes) else None
    return found, pred, vocabulary.names


def test_text_equals_the_detector_then_box_prompts(setup, tmp_path):
    from ovsam.masks import decode_rle

    out = tmp_path / "pred"
    paths = [str(p) for p, _ in setup["images"]]
    rc = main(["predict", *paths, "--text", " traffic cone, pastry,pastry", "--detector", "owlv2",
               "--detector-weights", setup["weights"], "--detector-batch-size", "1", "-o", str(out), *_common(setup)])
    assert rc == 0
    for path, image in setup["images"]:
        doc = json.loads((out / f"{path.stem}.json").read_text())
        assert doc["vocabulary"] == CLASSES
        assert doc["detector"]["name"] == "owlv2" and doc["detector"]["score_thresh"] == 0.1
        found, pred, names = _reference(setup, image)
        instances = doc["instances"]
        assert len(instances) == len(found.boxes) > 0, "the tiny detector must find something for this to mean much"
        # the detector's boxes, identical, as the instances' box prompts, in the detector's order
        assert [inst["prompt"]["box"] for inst in instances] == found.boxes.tolist()
        assert [inst["detector_label"] for inst in instances] == found.labels
        assert [inst["detector_score"] for inst in instances] == found.scores
        assert all(inst["detector_label"] in CLASSES and inst["detector_score"] > 0.1 for inst in instances)
        # OV-SAM's masks and labels of those box prompts, against the typed classes
        masks = decode_rle([inst["mask_rle"] for inst in instances])
        np.testing.assert_array_equal(masks, pred.masks)
        assert [inst["label_name"] for inst in instances] == [names[i] for i in pred.labels]
        for inst, scores, label in zip(instances, pred.label_scores, pred.labels):
            assert inst["label_score"] == pytest.approx(float(scores[label]), rel=1e-6)
            assert [n for n, _ in inst["topk"]] == [names[k] for k in np.argsort(-scores, kind="stable")]
        overlay = Image.open(out / f"{path.stem}.png")
        assert overlay.size == (image.shape[1], image.shape[0])


def test_cap_and_threshold_to_stdout(setup, capsys):
    path, image = setup["images"][0]
    rc = main(["predict", str(path), "--text", ",".join(CLASSES), "--detector-weights", setup["weights"],
               "--detector-score-thresh", "0.2", "--max-detections", "2", "-o", "-", *_common(setup)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    found, _, _ = _reference(setup, image, score_thresh=0.2, max_detections=2)
    assert len(found.boxes) == 2
    assert [inst["prompt"]["box"] for inst in doc["instances"]] == found.boxes.tolist()
    assert all(inst["detector_score"] > 0.2 for inst in doc["instances"])


def test_nothing_detected_is_an_empty_list(setup, capsys):
    path, _ = setup["images"][0]
    rc = main(["predict", str(path), "--text", "pastry", "--detector-weights", setup["weights"],
               "--detector-score-thresh", "0.999", "-o", "-", *_common(setup)])
    captured = capsys.readouterr()
    assert rc == 0
    assert json.loads(captured.out)["instances"] == []
    assert "nothing scored above --detector-score-thresh 0.999" in captured.err


@pytest.mark.parametrize(("argv", "names"), [
    (["--text", "pastry"], "--detector-weights"),  # no weights
    (["--text", "pastry", "--detector-weights", "{root}/nowhere"], "nowhere: no such directory"),
    (["--text", "pastry", "--detector-weights", "{root}/tiny.safetensors"], "is a file"),
    (["--text", "pastry", "--detector", "owlvit", "--detector-weights", "{weights}"], "'owlv2' model, not 'owlvit'"),
    (["--text", "pastry", "--detector", "grounding-dino", "--detector-weights", "{weights}"], "grounding-dino"),
    (["--text", "", "--detector-weights", "{weights}"], "--text"),  # empty text
    (["--text", " , ,", "--detector-weights", "{weights}"], "no class names"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--box", "1,2,30,40"], "--text"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--point", "5,5"], "--text"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--everything"], "--everything"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--vocabulary", "coco"], "--vocabulary"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--detector-template", "no slot"],
     "--detector-template"),
    (["--box", "1,2,30,40", "--detector-weights", "{weights}"], "--detector-weights"),  # without --text
    (["--text", "pastry", "--detector", "yolo", "--detector-weights", "{weights}"], "--detector"),
    (["--text", "pastry", "--detector-weights", "{weights}", "--detector-score-thresh", "1.5"],
     "--detector-score-thresh"),
])
def test_usage_errors_exit_2(setup, tmp_path, capsys, argv, names):
    path, _ = setup["images"][0]
    argv = [a.format(root=setup["root"], weights=setup["weights"]) for a in argv]
    try:
        rc = main(["predict", str(path), "-o", str(tmp_path / "out"), *argv, *_common(setup)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and names in err, err
    assert not (tmp_path / "out").exists()
