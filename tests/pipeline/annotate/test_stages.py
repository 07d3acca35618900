"""The model stage: proposals -> OV-SAM -> RLE rows, with failures isolated per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovsam.masks import decode_rle
from pipeline.annotate.proposals import Proposals, parse_prompt_mode
from pipeline.annotate.stages import Annotator, ModelStageConfig, SampleInput


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = (220, 30, 30)
    return img


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "classes.txt"
    path.write_text("red square\nblue circle\ngreen triangle\n")
    return str(path)


def _sample(key, h=120, w=160, boxes=None, points=None, seed=0):
    img = _image(h, w, seed)
    props = Proposals(boxes=np.zeros((0, 4)) if boxes is None else np.asarray(boxes, float),
                      points=np.zeros((0, 2)) if points is None else np.asarray(points, float))
    props.scores = [None] * props.boxes.shape[0]
    props.labels = [None] * props.boxes.shape[0]
    return SampleInput(key=key, image=img, width=w, height=h, source_format="png", proposals=props)


def test_rows_for_boxes_and_points(vocab_file):
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, top_k=2, store_embeddings=True))
    samples = [
        _sample("a", boxes=[[10, 10, 80, 60], [0, 0, 160, 120]], points=[[40, 40]]),
        _sample("b", h=90, w=70, seed=1, points=[[10, 10], [50, 60]]),
        SampleInput(key="c", image=None, status="decode_error", error="truncated JPEG"),
        _sample("d"),
    ]
    out = ann(samples)
    assert [r.image_row["image_key"] for r in out] == ["a", "b", "c", "d"]
    a, b, c, d = out
    assert a.image_row["status"] == "ok" and a.image_row["num_instances"] == 3
    assert [r["prompt_type"] for r in a.instance_rows] == ["box", "box", "point"]
    assert [r["instance_index"] for r in a.instance_rows] == [0, 1, 2]
    for row in a.instance_rows + b.instance_rows:
        mask = decode_rle([row["mask_rle"]])[0]
        assert row["area"] == int(mask.sum())
        assert len(row["topk_labels"]) == 2 and row["topk_labels"][0] == row["label"]
        assert len(row["head_embedding"]) == 64
    assert decode_rle([b.instance_rows[0]["mask_rle"]])[0].shape == (90, 70)
    assert c.image_row["status"] == "decode_error" and c.image_row["error"] == "truncated JPEG" and not c.instance_rows
    assert d.image_row["status"] == "no_prompts" and not d.instance_rows


@pytest.mark.parametrize("store_embeddings", [False, True])
def test_score_columns_are_the_predictors_published_probabilities(vocab_file, store_embeddings):
    """``label_score``, ``topk_scores`` and ``background_score`` are ``softmax(fused)`` as the predictor gives it
    (rows re-scored from the stored float16 embeddings agree within their rounding)."""
    from ovsam import OvsamPredictor

    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, top_k=3, store_embeddings=store_embeddings))
    boxes = [[10, 10, 80, 60], [0, 0, 160, 120], [30, 5, 150, 100]]
    rows = ann([_sample("a", boxes=boxes)])[0].instance_rows
    predictor = OvsamPredictor(ann.model, ann.vocabulary)
    predictor.set_image(_image(120, 160))
    pred = predictor.predict(box=np.asarray(boxes, float))
    atol = 2e-3 if store_embeddings else 1e-6
    for i, row in enumerate(rows):
        assert row["label"] == int(pred.labels[i])
        assert row["label_score"] == pytest.approx(float(pred.label_scores[i, row["label"]]), abs=atol)
        assert row["background_score"] == pytest.approx(float(pred.background_scores[i]), abs=atol)
        assert row["topk_scores"] == pytest.approx(sorted(pred.label_scores[i].tolist(), reverse=True), abs=atol)
        assert sum(row["topk_scores"]) + row["background_score"] == pytest.approx(1.0, abs=1e-5)


def test_model_failure_is_isolated(vocab_file, monkeypatch):
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, prompts="whole-image"))
    import ovsam.batch as batch

    real = batch.prepare_image

    def flaky(model, image, image_format="RGB"):
        if image.shape[0] == 77:
            raise RuntimeError("device fell over")
        return real(model, image, image_format)

    monkeypatch.setattr(batch, "prepare_image", flaky)
    out = ann([_sample("good"), _sample("bad", h=77), _sample("good2", seed=2)])
    assert [r.image_row["status"] for r in out] == ["ok", "model_error", "ok"]
    assert "device fell over" in out[1].image_row["error"]
    assert all(len(r.instance_rows) == 1 for r in (out[0], out[2]))


def test_grid_and_detector_modes(vocab_file, tmp_path):
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, prompts="grid", points_per_side=4,
                                     stability_score_thresh=0.0))
    out = ann([_sample("g")])
    assert out[0].image_row["status"] == "ok"
    assert all(r["prompt_type"] == "grid" for r in out[0].instance_rows)

    import torchvision

    det = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None)
    torch.save(det.state_dict(), tmp_path / "ssd.pth")
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, prompts="detector:ssdlite320_mobilenet_v3_large",
                                     detector_weights=str(tmp_path / "ssd.pth"), detector_score_thresh=0.0,
                                     max_detections=3))
    out = ann([_sample("x")])
    rows = out[0].instance_rows
    assert len(rows) == 3 and all(r["prompt_type"] == "detector:ssdlite320_mobilenet_v3_large" for r in rows)
    assert all(isinstance(r["detector_score"], float) and isinstance(r["detector_label"], str) for r in rows)


def test_prompt_mode_parsing():
    assert parse_prompt_mode("detector:fasterrcnn_resnet50_fpn_v2") == ("detector", "fasterrcnn_resnet50_fpn_v2")
    assert parse_prompt_mode("grid") == ("grid", None)
    with pytest.raises(ValueError, match="unknown --prompts"):
        parse_prompt_mode("boxes")
    with pytest.raises(ValueError, match="needs a model name"):
        parse_prompt_mode("detector")


def test_extremely_thin_images_are_annotated(vocab_file):
    from ovsam.transforms import preprocess_shape

    assert preprocess_shape(1, 20000, 256) == (1, 256) and preprocess_shape(20000, 1, 256) == (256, 1)
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, prompts="whole-image"))
    samples = [SampleInput(key=f"{h}x{w}", image=np.full((h, w, 3), 90, np.uint8), width=w, height=h)
               for h, w in ((1, 20000), (20000, 1))]
    for result in ann(samples):
        assert result.image_row["status"] == "ok", result.image_row["error"]
        assert len(result.instance_rows) == 1


def test_prompts_are_decoded_in_memory_bounded_chunks(vocab_file, monkeypatch):
    import pipeline.annotate.stages as stages

    assert stages.prompts_per_chunk(480, 640) == 64 and stages.prompts_per_chunk(8000, 8000) == 1
    boxes = [[10 + i, 10, 80 + i, 60] for i in range(7)]
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file))
    whole = ann([_sample("a", boxes=boxes, points=[[40, 40], [60, 50]])])[0].instance_rows
    monkeypatch.setattr(stages, "MASK_BUDGET_BYTES", 3 * 5 * 120 * 160)  # 3 prompts per chunk
    props_scores = [0.1 * i for i in range(7)]
    sample = _sample("a", boxes=boxes, points=[[40, 40], [60, 50]])
    sample.proposals.scores = props_scores
    import ovsam.batch

    calls = []
    real = ovsam.batch.predict_prompts

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ovsam.batch, "predict_prompts", counting)
    chunked = ann([sample])[0].instance_rows
    assert calls == [3, 3, 1, 2]
    assert [r["instance_index"] for r in chunked] == list(range(9))
    assert [r["detector_score"] for r in chunked[:7]] == props_scores
    for a, b in zip(whole, chunked):
        assert a["mask_rle"] == b["mask_rle"] and a["label"] == b["label"] and a["prompt_type"] == b["prompt_type"]


def test_device_rle_rows_equal_host_rle_rows(vocab_file):
    """On an accelerator the model part makes the RLE (ovsam.rle) and no dense mask leaves it; forced on the CPU,
    the rows are those of the row thread's pycocotools encoding."""
    ann = Annotator(ModelStageConfig(vocabulary=vocab_file, top_k=2))
    assert ann.device_rle is False  # CPU: encoded beside the model by the row thread
    samples = lambda: [_sample("a", boxes=[[10, 10, 80, 60], [0, 0, 160, 120]], points=[[40, 40]]),  # noqa: E731
                       _sample("b", h=91, w=67, seed=1, points=[[10, 10], [50, 60]])]
    host = ann(samples())
    ann.device_rle = True
    device = ann(samples())
    for a, b in zip(host, device):
        assert a.image_row == b.image_row
        assert a.instance_rows == b.instance_rows
