"""Class-agnostic proposals from a torchvision two-stage detector's RPN (``pipeline.annotate.detectors.rpn``).

The model is ``fasterrcnn_mobilenet_v3_large_320_fpn`` with random weights (fixed seed), saved as a state dict. The
reference is the model's own pieces run the way ``GeneralizedRCNN`` runs them: ``model.transform``,
``model.backbone``, ``model.rpn(images, features)`` (its forward, which returns boxes only), then torchvision's
``resize_boxes`` back to original pixels, as ``transform.postprocess`` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.transform import resize_boxes

from pipeline.annotate.detectors.rpn import TWO_STAGE, RpnProposals

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _random_model() -> torch.nn.Module:
    """A randomly initialised detector (seed 0) whose RPN scores and boxes vary: at torchvision's initialisation the
    backbone's eval-mode activations vanish (BatchNorm running stats 0/1) and every objectness is 0.5, a tie in
    every place. So BatchNorm takes one batch's statistics of random images, and the RPN head's two output convs are
    scaled to objectness logits of std 2 and box deltas of std 0.2 on them."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    batch = [torch.rand(3, 320, 320) for _ in range(4)]
    with torch.no_grad():
        model.train()
        model.backbone(model.transform(batch)[0].tensors)
        model.eval()
        logits, deltas = model.rpn.head(list(model.backbone(model.transform(batch)[0].tensors).values()))
        head = model.rpn.head
        head.cls_logits.weight.mul_(2.0 / torch.cat([t.flatten() for t in logits]).std())
        head.bbox_pred.weight.mul_(0.2 / torch.cat([t.flatten() for t in deltas]).std())
        head.cls_logits.bias.zero_()
        head.bbox_pred.bias.zero_()
    return model


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    model = _random_model()
    path = tmp_path_factory.mktemp("rpn") / "frcnn.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(120, 200, 3), dtype=np.uint8),
            rng.integers(0, 256, size=(256, 150, 3), dtype=np.uint8)]


def _reference(model, images) -> list[np.ndarray]:
    tensors = [torch.as_tensor(im).permute(2, 0, 1).float().div(255) for im in images]
    with torch.no_grad():
        batch, _ = model.transform(tensors)
        features = model.backbone(batch.tensors)
        boxes, _ = model.rpn(batch, features)
    return [resize_boxes(b, new, im.shape[:2]).double().numpy() for b, new, im in zip(boxes, batch.image_sizes, images)]


def test_two_stage_names() -> None:
    assert NAME in TWO_STAGE and "maskrcnn_resnet50_fpn" in TWO_STAGE and "keypointrcnn_resnet50_fpn" in TWO_STAGE
    assert not any(n.startswith(("retinanet", "fcos", "ssd")) for n in TWO_STAGE)


def test_boxes_equal_the_models_own_rpn(detector, images) -> None:
    model, path = detector
    props = RpnProposals(NAME, path, score_thresh=0.0, nms_thresh=1.0, max_detections=1000)
    got = props(images)
    want = _reference(model, images)
    assert len(got) == 2
    for p, w, im in zip(got, want, images):
        assert p.boxes.dtype == np.float64 and p.boxes.shape == w.shape and len(w) > 50
        np.testing.assert_allclose(p.boxes, np.clip(w, 0, [im.shape[1], im.shape[0]] * 2), atol=1e-3, rtol=0)
        scores = np.array(p.scores)
        assert len(scores) == len(w) and np.all(np.diff(scores) <= 0)
        assert len(set(scores)) == len(scores)  # no ties: the order is the RPN's, not a tie-break
        assert scores.min() >= 0.0 and scores.max() <= 1.0
        assert p.labels == [None] * len(w) and p.points.shape == (0, 2)
        h, w_ = im.shape[:2]
        assert p.boxes[:, [0, 2]].max() <= w_ and p.boxes[:, [1, 3]].max() <= h and p.boxes.min() >= 0
    # one image alone equals the reference of that image alone (a batch pads to its largest image, so the
    # features near an image's padded border, and with them its proposals, depend on the batch)
    alone = props([images[1]])[0]
    np.testing.assert_allclose(alone.boxes, _reference(model, [images[1]])[0].clip(0, [150, 256] * 2), atol=1e-3,
                               rtol=0)
    assert props([]) == []


def test_max_detections_nms_and_score_thresholds(detector, images) -> None:
    from torchvision.ops import box_iou

    _, path = detector
    full = RpnProposals(NAME, path, max_detections=1000)(images)[0]
    top = RpnProposals(NAME, path, max_detections=7)(images)[0]
    assert len(top) == 7
    np.testing.assert_array_equal(top.boxes, full.boxes[:7])
    assert top.scores == full.scores[:7]

    nmsed = RpnProposals(NAME, path, nms_thresh=0.3, max_detections=1000)(images)[0]
    assert 0 < len(nmsed) < len(full)
    iou = box_iou(torch.as_tensor(nmsed.boxes), torch.as_tensor(nmsed.boxes)).numpy()
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.3 + 1e-6
    assert nmsed.scores[0] == full.scores[0] and np.all(np.diff(nmsed.scores) <= 0)

    thresh = float(np.median(full.scores))
    high = RpnProposals(NAME, path, score_thresh=thresh, max_detections=1000)(images)[0]
    assert len(high) == sum(s >= thresh for s in full.scores) < len(full)  # kept: objectness >= score_thresh
    np.testing.assert_array_equal(high.boxes, full.boxes[: len(high)])


def test_low_precision_runs(detector, images) -> None:
    _, path = detector
    out = RpnProposals(NAME, path, precision="bf16", max_detections=20)(images)
    assert [len(p) for p in out] == [20, 20]
    assert all(np.all(np.diff(p.scores) <= 0) for p in out)


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
                                  "no_such_model"])
def test_one_stage_or_unknown_detector_is_refused(detector, name) -> None:
    _, path = detector
    with pytest.raises(ValueError, match="two-stage") as e:
        RpnProposals(name, path)
    assert NAME in str(e.value)
