"""``ovsam predict``: its masks and labels are OvsamPredictor's; overlay PNG and JSON per image, or JSON on stdout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ovsam
    from ovsam.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("predict")
    model = ovsam.build_ovsam("ovsam-tiny")
    checkpoint = save_checkpoint(model, root / "tiny.safetensors")
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    rng = np.random.default_rng(0)
    image = (rng.random((150, 210, 3)) * 60).astype(np.uint8)
    image[20:90, 30:120] = (220, 30, 30)
    image[60:140, 130:200] = (30, 40, 220)
    path = root / "scene.png"
    Image.fromarray(image).save(path)
    return root, str(checkpoint), str(vocab), path, image


def _reference(setup, **prompts):
    import ovsam

    _, checkpoint, vocab, _, image = setup
    model = ovsam.build_ovsam("ovsam-tiny", checkpoint=checkpoint, precision="fp32")
    vocabulary = ovsam.Vocabulary.resolve(vocab, model, progress=False)
    predictor = ovsam.OvsamPredictor(model, vocabulary)
    predictor.set_image(image)
    return predictor.predict(**prompts), vocabulary.names


def _common(setup) -> list[str]:
    _, checkpoint, vocab, _, _ = setup
    return ["--checkpoint", checkpoint, "--vocabulary", vocab, "--precision", "fp32", "--device", "cpu"]


def _assert_same(doc: dict, pred, names: list[str]) -> None:
    from ovsam.masks import decode_rle

    assert len(doc["instances"]) == len(pred)
    masks = decode_rle([inst["mask_rle"] for inst in doc["instances"]])
    np.testing.assert_array_equal(masks, pred.masks)
    assert [inst["label"] for inst in doc["instances"]] == pred.labels.tolist()
    assert [inst["label_name"] for inst in doc["instances"]] == [names[i] for i in pred.labels]
    for inst, scores, background, label, box in zip(doc["instances"], pred.label_scores, pred.background_scores,
                                                    pred.labels, pred.boxes_xyxy):
        assert inst["label_score"] == pytest.approx(float(scores[label]), rel=1e-6)
        assert inst["background_score"] == pytest.approx(float(background), rel=1e-6)
        assert inst["topk"][0] == [names[label], pytest.approx(float(scores[label]), rel=1e-6)]
        assert len(inst["topk"]) == 3  # the vocabulary's size caps top-k
        assert inst["box_xyxy"] == pytest.approx(box.tolist())


def test_boxes_and_points_equal_the_predictor(setup, tmp_path, capsys):
    root, _, _, path, image = setup
    out = tmp_path / "pred"
    rc = main(["predict", str(path), "--box", "30,20,120,90", "--box", "130,60,200,140", "--point", "70,50",
               "-o", str(out), *_common(setup)])
    assert rc == 0
    doc = json.loads((out / "scene.json").read_text())
    assert (doc["width"], doc["height"], doc["trained"]) == (210, 150, True)
    pred, names = _reference(setup, box=np.array([[30, 20, 120, 90], [130, 60, 200, 140]], float),
                             point_coords=np.array([[[70, 50]], [[70, 50]]], float),
                             point_labels=np.ones((2, 1)))
    _assert_same(doc, pred, names)
    assert doc["instances"][0]["prompt"] == {"box": [30.0, 20.0, 120.0, 90.0], "points": [[70.0, 50.0, 1]]}
    overlay = Image.open(out / "scene.png")
    assert overlay.size == (210, 150)
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), image)  # something was drawn


def test_points_only_to_stdout(setup, capsys):
    _, _, _, path, _ = setup
    rc = main(["predict", str(path), "--point", "70,50", "--point", "160,100,0", "-o", "-", *_common(setup)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    pred, names = _reference(setup, point_coords=np.array([[70, 50], [160, 100]], float),
                             point_labels=np.array([1, 0]))
    _assert_same(doc, pred, names)
    assert doc["instances"][0]["prompt"] == {"points": [[70.0, 50.0, 1], [160.0, 100.0, 0]]}


def test_everything_equals_the_mask_generator(setup, tmp_path):
    import ovsam
    from ovsam.automatic import OvsamMaskGenerator

    _, checkpoint, vocab, path, image = setup
    settings = {"points_per_side": 6, "stability_score_thresh": 0.0, "box_nms_thresh": 0.6, "min_mask_area": 10}
    rc = main(["predict", str(path), "--everything", "--points-per-side", "6", "--stability-score-thresh", "0",
               "--box-nms-thresh", "0.6", "--min-mask-area", "10", "-o", str(tmp_path), *_common(setup)])
    assert rc == 0
    doc = json.loads((tmp_path / "scene.json").read_text())
    model = ovsam.build_ovsam("ovsam-tiny", checkpoint=checkpoint)
    vocabulary = ovsam.Vocabulary.resolve(vocab, model, progress=False)
    records = OvsamMaskGenerator(model, vocabulary, output_mode="coco_rle", **settings).generate(image)
    assert records, "the settings must keep some masks for the comparison to mean something"
    assert [i["mask_rle"] for i in doc["instances"]] == [r["segmentation"] for r in records]
    assert [i["label"] for i in doc["instances"]] == [r["label"] for r in records]


@pytest.mark.parametrize(("argv", "names"), [
    (["--box", "1,2,3"], "--box"),
    (["--box", "10,10,5,20"], "--box"),
    (["--point", "1,2,7"], "--point"),
    ([], "--everything"),
    (["--everything", "--box", "1,2,30,40"], "--everything"),
    (["--box", "0,0,900,900"], "--box"),  # outside the image
    (["--box", "1,2,30,40", "--model", "sam-vit-b"], "--model"),
])
def test_bad_prompts_are_usage_errors(setup, tmp_path, capsys, argv, names):
    _, _, _, path, _ = setup
    try:
        rc = main(["predict", str(path), "-o", str(tmp_path / "out"), *argv, *_common(setup)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and names in err, err
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_images(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(tmp_path / "none.jpg"), "--point", "1,1", "-o", "-", *_common(setup)]) == 2
    assert main(["predict", str(bad), "--point", "1,1", "-o", "-", *_common(setup)]) == 1
    err = capsys.readouterr().err
    assert "none.jpg: no such file" in err and "bad.jpg" in err
