"""Predictor, batch function and input validation on the tiny OV-SAM model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ovsam import OvsamPredictor, predict_batch

from .utils import make_image

BOXES = np.array([[10, 12, 120, 90], [60, 40, 190, 150], [0, 0, 200, 160]], dtype=float)


def _assert_same(a, b, atol=1e-4):
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=atol, rtol=0)
    np.testing.assert_allclose(a.label_scores, b.label_scores, atol=atol, rtol=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.masks != b.masks).mean() < 1e-3
    np.testing.assert_allclose(a.iou_scores, b.iou_scores, atol=1e-3)


def test_prediction_fields(tiny_model, tiny_vocab):
    p = OvsamPredictor(tiny_model, tiny_vocab)
    img = make_image(160, 200)
    p.set_image(img)
    r = p.predict(box=BOXES)
    s = tiny_model.low_res_size
    assert r.masks.shape == (3, 160, 200) and r.masks.dtype == bool
    assert r.low_res_logits.shape == (3, 1, s, s)
    assert r.iou_scores.shape == (3,) and np.all((r.iou_scores >= 0) & (r.iou_scores <= 1))
    assert r.labels.shape == (3,) and r.label_scores.shape == (3, len(tiny_vocab))
    assert np.all((r.label_scores >= 0) & (r.label_scores <= 1))
    np.testing.assert_array_equal(r.labels, r.label_scores.argmax(1))
    assert r.boxes_xyxy.shape == (3, 4)
    for m, b in zip(r.masks, r.boxes_xyxy):
        if m.any():
            ys, xs = np.nonzero(m)
            assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_array_equal(r.prompt.boxes, BOXES)
    assert r.label_names == tiny_vocab.names


def test_predict_batch_equals_predictor(tiny_model, tiny_vocab):
    images = [make_image(160, 200, 0), make_image(300, 120, 1), make_image(256, 256, 2)]
    prompts = [
        {"box": BOXES},
        {"point_coords": np.array([[[30, 40]], [[100, 200]]], dtype=float), "point_labels": np.ones((2, 1))},
        {"box": np.array([[5, 5, 250, 250]]), "point_coords": np.array([[[128, 128], [20, 20]]]),
         "point_labels": np.array([[1, 0]])},
    ]
    batch = predict_batch(tiny_model, images, prompts, tiny_vocab)
    p = OvsamPredictor(tiny_model, tiny_vocab)
    for img, prompt, got in zip(images, prompts, batch):
        p.set_image(img)
        single = p.predict(box=prompt.get("box"), point_coords=prompt.get("point_coords"),
                           point_labels=prompt.get("point_labels"))
        _assert_same(got, single)
    # batching in groups gives the same as one pass
    grouped = predict_batch(tiny_model, images, prompts, tiny_vocab, batch_size=2)
    for a, b in zip(batch, grouped):
        _assert_same(a, b)


def test_cached_features_and_shared_feature_index(tiny_model, tiny_vocab):
    """Features computed once serve later prompts: ``load_features`` gives the predictor's answers, and several
    prompt sets of one image decode together against one feature entry (``feature_index``)."""
    import torch

    from ovsam.batch import encode_images, predict_images, prepare_image
    from ovsam.prompts import PromptSet

    img, other = make_image(160, 200, 3), make_image(120, 90, 4)
    p = OvsamPredictor(tiny_model, tiny_vocab)
    p.set_image(img)
    want = [p.predict(box=BOXES[:1]), p.predict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.ones(1))]
    prepared = [prepare_image(tiny_model, im) for im in (other, img)]
    features = encode_images(tiny_model, torch.stack([x.tensor for x in prepared]))
    q = OvsamPredictor(tiny_model, tiny_vocab)
    one = encode_images(tiny_model, prepared[1].tensor[None])
    q.load_features(one, prepared[1].original_size, prepared[1].input_size)
    _assert_same(q.predict(box=BOXES[:1]), want[0])
    sets = [PromptSet(boxes=BOXES[:1].astype(float)),
            PromptSet(point_coords=np.array([[[30.0, 40.0]]]), point_labels=np.ones((1, 1)))]
    size = (prepared[1].original_size, prepared[1].input_size)
    got = predict_images(tiny_model, features, sets, [size, size], vocabulary=tiny_vocab, feature_index=[1, 1])
    for g, w in zip(got, want):
        _assert_same(g.numpy(), w)  # the batched trunk rounds differently: ~1e-5
    with pytest.raises(ValueError, match="2 feature indices for 1 prompt sets"):
        predict_images(tiny_model, features, sets[:1], [size], vocabulary=tiny_vocab, feature_index=[0, 1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_features_for_prompts_change_nothing_but_the_layout(precision):
    """Trimmed, pre-converted features (what a serving cache keeps) decode exactly as the encoder's output."""
    import torch

    import ovsam
    from ovsam.batch import encode_images, features_for_prompts, predict_images, prepare_image
    from ovsam.prompts import PromptSet

    model = ovsam.build_ovsam("ovsam-tiny", precision=precision)
    vocab = ovsam.Vocabulary.resolve("coco", model, progress=False)
    prepared = prepare_image(model, make_image(120, 160, 5))
    raw = encode_images(model, prepared.tensor[None])
    kept = features_for_prompts(model, raw)
    assert len(kept.clip_feats) == 1 and all(f.is_contiguous() for f in [*kept.fpn_feats, *kept.clip_feats])
    sets = [PromptSet(boxes=BOXES.astype(float)),
            PromptSet(point_coords=np.array([[[30.0, 40.0], [90.0, 60.0]]]), point_labels=np.array([[1, 0]]))]
    size = [(prepared.original_size, prepared.input_size)] * 2
    for a, b in zip(predict_images(model, raw, sets, size, vocabulary=vocab, feature_index=[0, 0]),
                    predict_images(model, kept, sets, size, vocabulary=vocab, feature_index=[0, 0])):
        for name in ("masks", "low_res_logits", "iou_scores", "label_scores", "clip_embeddings"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_prompt_chunking_is_invisible(tiny_model, tiny_vocab):
    img = make_image(160, 200)
    a = OvsamPredictor(tiny_model, tiny_vocab)
    b = OvsamPredictor(tiny_model, tiny_vocab, prompt_chunk=2)
    a.set_image(img)
    b.set_image(img)
    _assert_same(a.predict(box=BOXES), b.predict(box=BOXES), atol=1e-5)


def test_bgr_equals_flipped_rgb(tiny_model, tiny_vocab):
    img = make_image(160, 200)
    p = OvsamPredictor(tiny_model, tiny_vocab)
    p.set_image(img)
    rgb = p.predict(box=BOXES)
    p.set_image(np.ascontiguousarray(img[..., ::-1]), image_format="BGR")
    bgr = p.predict(box=BOXES)
    np.testing.assert_array_equal(rgb.low_res_logits, bgr.low_res_logits)
    np.testing.assert_array_equal(rgb.masks, bgr.masks)
    np.testing.assert_array_equal(rgb.labels, bgr.labels)


def test_grayscale_input_is_expanded(tiny_model):
    gray = make_image(100, 140)[..., 0]
    p = OvsamPredictor(tiny_model)
    p.set_image(gray)
    a = p.predict(box=np.array([10, 10, 80, 90]))
    p.set_image(np.repeat(gray[..., None], 3, axis=2))
    b = p.predict(box=np.array([10, 10, 80, 90]))
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)
    assert a.labels is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"box": np.array([10, 10, 10, 50])}, r"box 0 .*zero or negative area"),
        ({"box": np.array([[10, 10, 50, 50], [5, np.nan, 30, 40]])}, r"box 1 .*NaN"),
        ({"box": np.array([10, 10, 500, 50])}, r"box 0 .*outside the 200x160 image"),
        ({"box": np.array([10, 10, 50])}, r"box must have shape"),
        ({"point_coords": np.array([[10, 10]])}, r"point_coords and point_labels"),
        ({"point_coords": np.array([[10, 10], [300, 20]]), "point_labels": np.array([1, 1])},
         r"point prompt 0 .*outside"),
        ({"point_coords": np.array([[10, 10]]), "point_labels": np.array([2])}, r"labels .* must be 1"),
        ({"point_coords": np.array([[10, 10]]), "point_labels": np.array([1, 1])}, r"point_labels must have shape"),
        ({"box": np.array([[1, 1, 20, 20]] * 2), "point_coords": np.zeros((3, 1, 2)), "point_labels": np.ones((3, 1))},
         r"prompt counts differ"),
        ({}, r"no prompt given"),
    ],
)
def test_invalid_prompts_raise_value_error(tiny_model, kwargs, match):
    p = OvsamPredictor(tiny_model)
    p.set_image(make_image(160, 200))
    with pytest.raises(ValueError, match=match):
        p.predict(**kwargs)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (np.zeros((10, 10, 4), dtype=np.uint8), "HxWx3"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "non-empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_invalid_images_raise_value_error(tiny_model, image, match):
    with pytest.raises(ValueError, match=match):
        OvsamPredictor(tiny_model).set_image(image)


def test_other_errors(tiny_model, tiny_vocab):
    p = OvsamPredictor(tiny_model, tiny_vocab)
    with pytest.raises(ValueError, match="set_image"):
        p.predict(box=BOXES[0])
    p.set_image(make_image(160, 200))
    with pytest.raises(ValueError, match="single mask token"):
        p.predict(box=BOXES[0], multimask_output=True)
    with pytest.raises(ValueError, match=r"image 1: .*uint8"):
        predict_batch(tiny_model, [make_image(50, 50), np.zeros((5, 5, 3))], [{"box": [1, 1, 4, 4]}] * 2)
    with pytest.raises(ValueError, match="one prompt set per image"):
        predict_batch(tiny_model, [make_image(50, 50)], [])
    with pytest.raises(ValueError, match="unknown prompt key"):
        predict_batch(tiny_model, [make_image(50, 50)], [{"boxs": [1, 1, 4, 4]}])


def test_empty_prompt_set(tiny_model, tiny_vocab):
    out = predict_batch(tiny_model, [make_image(50, 60)], [{"box": np.zeros((0, 4))}], tiny_vocab)[0]
    assert out.masks.shape == (0, 50, 60) and out.labels.shape == (0,)
    assert out.label_scores.shape == (0, len(tiny_vocab))


def test_mask_input_round_trip(tiny_model):
    p = OvsamPredictor(tiny_model)
    p.set_image(make_image(160, 200))
    first = p.predict(box=BOXES[:1])
    second = p.predict(box=BOXES[:1], mask_input=first.low_res_logits)
    assert second.low_res_logits.shape == first.low_res_logits.shape
    assert not np.allclose(second.low_res_logits, first.low_res_logits)


def test_import_ovsam_does_not_import_ray():
    code = "import sys, ovsam; ovsam.build_ovsam; assert 'ray' not in sys.modules, 'ray imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_roi_box_rule_of_the_config_is_used(tiny_model, tiny_vocab, monkeypatch):
    import dataclasses

    from ovsam.modeling import recognition as R

    seen = []
    original = R.boxes_from_mask_logits

    def spy(mask_logits, scale, rule="mask"):
        seen.append(rule)
        return original(mask_logits, scale, rule)

    monkeypatch.setattr(R, "boxes_from_mask_logits", spy)
    config = tiny_model.config
    img = make_image(160, 200)
    try:
        tiny_model.config = dataclasses.replace(config, recognition=dataclasses.replace(
            config.recognition, roi_box="largest_component"))
        largest = predict_batch(tiny_model, [img], [{"box": BOXES}], tiny_vocab)[0]
    finally:
        tiny_model.config = config
    published = predict_batch(tiny_model, [img], [{"box": BOXES}], tiny_vocab)[0]
    assert seen == ["largest_component", "mask"]
    np.testing.assert_array_equal(largest.low_res_logits, published.low_res_logits)
