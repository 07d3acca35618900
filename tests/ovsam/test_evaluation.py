"""ovsam.evaluation: the OVSAM_SPEC §5 metric against direct computations, and the evaluation loop's plumbing with
predictions replaced by the ground truth (perfect scores) or by a fixed wrong answer. A few seconds (one
ovsam-tiny build)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovsam import evaluation as E
from ovsam.prediction import Prediction


def test_mask_iou_direct():
    a = np.zeros((2, 4, 4), dtype=bool)
    b = np.zeros((2, 4, 4), dtype=bool)
    a[0, :2, :2] = True  # 4 px
    b[0, :2, :] = True  # 8 px, 4 shared
    a[1, 0, 0] = True  # disjoint
    b[1, 3, 3] = True
    assert E.mask_iou(a, b) == pytest.approx([0.5, 0.0])
    assert E.mask_iou(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), bool)) == pytest.approx([0.0])
    with pytest.raises(ValueError, match="shapes differ"):
        E.mask_iou(a, b[:, :3])


def test_center_points_are_inside_and_central():
    m = np.zeros((3, 20, 30), dtype=bool)
    m[0, 5:16, 10:21] = True  # an 11x11 square: centre (15, 10)
    m[1, 0:20, 0:4] = True  # an L shape: the point must fall inside it
    m[1, 16:20, 0:30] = True
    pts = E.center_points(m)
    assert tuple(pts[0]) == (15, 10)
    x, y = pts[1]
    assert m[1, int(y), int(x)]
    assert tuple(pts[2]) == (0, 0)  # empty mask


def published_centre(mask: np.ndarray, input_size: tuple[int, int]) -> tuple[float, float]:
    """OVSAM_SPEC §1.10 as written, on the whole frame: nearest-neighbour rescale to the input frame, one pixel of
    background padding, kornia's distance transform of the inverse, the padding cropped, the flat argmax."""
    import cv2
    import kornia

    nh, nw = input_size
    r = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
    padded = np.pad(r, 1)
    dist = kornia.contrib.distance_transform(torch.from_numpy(1.0 - padded.astype(np.float32))[None, None])
    dist = dist[0, 0, 1:-1, 1:-1].numpy()
    idx = int(np.argmax(dist))
    y, x = idx // nw, idx % nw
    return x * mask.shape[1] / nw, y * mask.shape[0] / nh


@pytest.mark.parametrize("input_size", [(40, 60), (160, 240), (27, 40)])
def test_center_points_follow_the_published_procedure(input_size):
    """Random blobs, masks touching the border, two parts, plateaus (even-sized rectangles): the same points as
    the procedure restated on the whole frame, in frames larger and smaller than the masks'."""
    import cv2

    rng = np.random.default_rng(0)
    masks = []
    for _ in range(6):
        m = np.zeros((40, 60), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            cv2.ellipse(m, (int(rng.integers(0, 60)), int(rng.integers(0, 40))),
                        (int(rng.integers(3, 20)), int(rng.integers(3, 15))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(m.astype(bool))
    rect = np.zeros((40, 60), dtype=bool)
    rect[10:20, 0:16] = True  # even sides and on the border: a plateau of maxima
    masks.append(rect)
    masks = np.stack(masks)
    got = E.center_points(masks, input_size)
    want = np.array([published_centre(m, input_size) for m in masks])
    np.testing.assert_array_equal(got, want)


def _independent_distance(mask: np.ndarray, metric: str) -> np.ndarray:
    """OpenCV's exact distance of each pixel to the nearest background pixel, with the published procedure's pixel
    of background padding (``DIST_C``: chessboard; ``DIST_L2`` with ``DIST_MASK_PRECISE``: Euclidean)."""
    import cv2

    padded = np.pad(mask.astype(np.uint8), 1)
    if metric == "chessboard":
        dist = cv2.distanceTransform(padded, cv2.DIST_C, 3)
    else:
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def _shapes(h: int = 40, w: int = 56) -> list[np.ndarray]:
    """Random blobs (one to three ellipses, some cut by the border), rectangles (some on the border), thin shapes
    (1-3 px lines, a ring) and polygons."""
    import cv2

    rng = np.random.default_rng(5)
    out = []
    for n in range(20):
        m = np.zeros((h, w), dtype=np.uint8)
        kind = n % 5
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                cv2.ellipse(m, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                            (int(rng.integers(2, 24)), int(rng.integers(2, 16))), float(rng.uniform(0, 180)), 0, 360,
                            1, -1)
        elif kind == 1:
            y0, x0 = int(rng.integers(-4, h - 2)), int(rng.integers(-4, w - 2))
            m[max(y0, 0):y0 + int(rng.integers(3, h)), max(x0, 0):x0 + int(rng.integers(3, w))] = 1
        elif kind == 2:
            for _ in range(int(rng.integers(1, 3))):
                cv2.line(m, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                         (int(rng.integers(0, w)), int(rng.integers(0, h))), 1, int(rng.integers(1, 4)))
        elif kind == 3:
            cv2.fillPoly(m, [rng.integers(0, [w, h], size=(int(rng.integers(3, 7)), 2)).astype(np.int32)], 1)
        else:
            centre, r = (int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8))), int(rng.integers(6, 16))
            cv2.circle(m, centre, r, 1, -1)
            cv2.circle(m, centre, r - int(rng.integers(1, 4)), 0, -1)
        if m.any():
            out.append(m.astype(bool))
    return out


def _in_input_frame(masks: np.ndarray, points: np.ndarray, input_size: tuple[int, int] | None):
    """The masks resized to the input frame (nearest neighbour, as the procedure's step 1) and the points there."""
    import cv2

    n, h, w = masks.shape
    nh, nw = input_size or (h, w)
    resized = [m if (nh, nw) == (h, w) else
               cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool) for m in masks]
    pixels = np.rint(points * [nw / w, nh / h]).astype(int)
    np.testing.assert_allclose(pixels, points * [nw / w, nh / h], atol=1e-9)  # whole pixels of the input frame
    return resized, pixels


@pytest.mark.parametrize("input_size", [None, (60, 84)])
def test_center_points_are_maxima_of_an_exact_chessboard_distance(input_size):
    """Parity with an independent transform. kornia's cascade (``kernel_size=3``, ``h=0.35``) grows the background
    one 3x3 ring per step, so its distance is the ring's index (the chessboard distance) minus 1 plus a soft minimum
    over the neighbours reached the step before: between 0.42 (all eight) and sqrt(2) (one diagonal), i.e. within
    [-0.58, +0.42] of OpenCV's exact ``DIST_C``. That spread is under 1, so the chosen point is always a maximum of
    the exact chessboard distance: on blobs, rectangles on the border, thin lines, rings and polygons, in the
    masks' own frame and in a larger input frame."""
    import kornia

    masks = np.stack(_shapes())
    resized, pixels = _in_input_frame(masks, E.center_points(masks, input_size), input_size)
    for m, (x, y) in zip(resized, pixels):
        exact = _independent_distance(m, "chessboard")
        assert m[y, x] and exact[y, x] == exact.max(), (x, y, exact[y, x], exact.max())
    for m in resized[:5]:
        padded = torch.from_numpy(1.0 - np.pad(m, 1).astype(np.float32))[None, None]
        approx = kornia.contrib.distance_transform(padded)[0, 0, 1:-1, 1:-1].numpy()
        diff = (approx - _independent_distance(m, "chessboard"))[m]
        assert -0.6 < diff.min() and diff.max() < 0.45, (diff.min(), diff.max())


def test_center_points_against_an_exact_euclidean_distance():
    """OpenCV's exact Euclidean transform (``DIST_L2``, ``DIST_MASK_PRECISE``): where its maximum is one
    well-separated pixel (discs, odd squares, an odd square on the border) the point is that pixel. Elsewhere the
    point is a chessboard maximum (above), whose Euclidean distance is at least the Euclidean maximum over sqrt(2),
    and no closer bound holds: a disc of radius 16 beside a 27 px square gets the square's centre, more than a
    pixel short of the disc's."""
    import cv2

    unique = []
    for r, (cx, cy) in ((3, (10, 9)), (7, (25, 19)), (12, (30, 20))):
        m = np.zeros((40, 56), dtype=np.uint8)
        cv2.circle(m, (cx, cy), r, 1, -1)
        unique.append(m.astype(bool))
    for side, (x0, y0) in ((5, (3, 4)), (9, (20, 11)), (15, (30, 20)), (9, (0, 0)), (11, (45, 29))):
        m = np.zeros((40, 56), dtype=bool)
        m[y0:y0 + side, x0:x0 + side] = True
        unique.append(m)
    for m, (x, y) in zip(unique, E.center_points(np.stack(unique)).astype(int)):
        exact = _independent_distance(m, "euclidean")
        top = np.argwhere(exact >= exact.max() - 0.5)
        assert len(top) == 1, top  # one maximum, at least half a pixel above the next
        assert (y, x) == tuple(top[0])

    masks = np.stack(_shapes())
    for m, (x, y) in zip(masks, E.center_points(masks).astype(int)):
        exact = _independent_distance(m, "euclidean")
        assert m[y, x] and exact[y, x] >= exact.max() / np.sqrt(2) - 1e-4, (x, y, exact[y, x], exact.max())

    m = np.zeros((40, 80), dtype=np.uint8)
    cv2.circle(m, (18, 20), 16, 1, -1)
    m[7:34, 45:72] = 1
    [(x, y)] = E.center_points(m[None].astype(bool)).astype(int)
    exact = _independent_distance(m.astype(bool), "euclidean")
    assert (x, y) == (58, 20) and exact[20, 18] == exact.max() and exact.max() - exact[y, x] > 1


def test_instance_metric_micro_averages_and_split():
    metric = E.InstanceMetric()
    split = np.array([1, 1, 2])  # classes 0, 1 base; class 2 novel
    metric.update(np.array([0, 1, 2]), np.array([0, 2, 2]), ious=np.array([1.0, 0.5, 0.0]),
                  head_labels=np.array([0, 1, 1]), split=split)
    metric.update(np.array([2]), np.array([1]), ious=np.array([0.25]), head_labels=np.array([2]), split=split)
    s = E.InstanceMetric.summary(metric.sums)
    assert s["count"] == 4
    assert s["acc"] == pytest.approx(2 / 4) and s["head_acc"] == pytest.approx(3 / 4)
    assert s["miou"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.25) / 4)
    assert s["base_acc"] == pytest.approx(1 / 2) and s["base_miou"] == pytest.approx(0.75)
    assert s["novel_acc"] == pytest.approx(1 / 2) and s["novel_miou"] == pytest.approx(0.125)
    # sums from two workers add up to the metric of all instances
    a, b = E.InstanceMetric(), E.InstanceMetric()
    a.update(np.array([0, 1]), np.array([0, 0]), ious=np.array([0.2, 0.4]))
    b.update(np.array([1]), np.array([1]), ious=np.array([0.9]))
    total = {k: a.sums[k] + b.sums[k] for k in a.sums}
    assert E.InstanceMetric.summary(total)["miou"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny():
    from ovsam import Vocabulary, build_ovsam

    model = build_ovsam("ovsam-tiny")
    vocab = Vocabulary.from_names(["red square", "blue circle", "green triangle"], model, progress=False,
                                  split=["base", "base", "novel"])
    return model, vocab


def _samples():
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((60, 80), (90, 50)):
        masks = np.zeros((2, h, w), dtype=bool)
        masks[0, 5:25, 5:30] = True
        masks[1, 30:50, 10:40] = True
        boxes = np.array([[5, 5, 30, 25], [10, 30, 40, 50]], dtype=np.float32)
        out.append((rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                    {"labels": np.array([0, 2]), "boxes": boxes, "masks": masks}))
    return out


def _fake_predict(answer):
    def predict_batch(model, images, prompts, vocabulary, **kw):
        preds = []
        for image, prompt in zip(images, prompts):
            target = answer(image)
            n = len(target["labels"])
            emb = vocabulary.embeddings[:, 0][target["head"]] if "head" in target else torch.zeros(n, vocabulary.dim)
            preds.append(Prediction(masks=target["masks"], low_res_logits=None, iou_scores=np.ones(n),
                                    boxes_xyxy=np.zeros((n, 4)), labels=target["labels"], head_embeddings=emb))
        return preds
    return predict_batch


def test_evaluate_samples_perfect_and_wrong_predictions(tiny, monkeypatch):
    import ovsam.batch

    model, vocab = tiny
    samples = _samples()
    by_image = {id(img): t for img, t in samples}
    perfect = _fake_predict(lambda img: {**by_image[id(img)], "head": by_image[id(img)]["labels"]})
    monkeypatch.setattr(ovsam.batch, "predict_batch", perfect)
    gt_box = []
    for prompt in ("box", "point"):
        s = E.InstanceMetric.summary(E.evaluate_samples(model, samples, vocab, prompt=prompt, batch_size=1).sums)
        gt_box.append({k: s.pop(k) for k in list(s) if "gt_box" in k})
        assert s == pytest.approx({"acc": 1.0, "head_acc": 1.0, "miou": 1.0, "base_acc": 1.0, "base_head_acc": 1.0,
                                   "base_miou": 1.0, "novel_acc": 1.0, "novel_head_acc": 1.0, "novel_miou": 1.0,
                                   "count": 4.0}, abs=1e-9)
    wrong = _fake_predict(lambda img: {"labels": np.array([1, 1]), "masks": ~by_image[id(img)]["masks"],
                                       "head": np.array([1, 1])})
    monkeypatch.setattr(ovsam.batch, "predict_batch", wrong)
    s = E.InstanceMetric.summary(E.evaluate_samples(model, samples, vocab).sums)
    assert s["acc"] == 0.0 and s["head_acc"] == 0.0 and s["miou"] == 0.0 and s["count"] == 4
    # the GT-box accuracy runs the model's own classifier on the GT boxes: independent of the predictions
    assert gt_box[0] == gt_box[1] == {k: s[k] for k in s if "gt_box" in k} and "gt_box_acc" in gt_box[0]


def test_evaluate_samples_runs_the_model(tiny):
    model, vocab = tiny
    metric = E.evaluate_samples(model, _samples(), vocab, prompt="point", batch_size=2)
    s = E.InstanceMetric.summary(metric.sums)
    assert s["count"] == 4 and 0.0 <= s["miou"] <= 1.0 and 0.0 <= s["acc"] <= 1.0
    with pytest.raises(ValueError, match="point prompts need mask targets"):
        E.evaluate_samples(model, [(np.zeros((8, 8, 3), np.uint8), {"labels": np.array([0]),
                                                                    "boxes": np.zeros((1, 4))})], vocab,
                           prompt="point")


def test_evaluate_samples_at_bf16_agrees_with_fp32(tiny):
    import copy

    from ovsam.precision import set_precision

    model, vocab = tiny
    low = set_precision(copy.deepcopy(model), "bf16")
    ref = E.InstanceMetric.summary(E.evaluate_samples(model, _samples(), vocab, prompt="box").sums)
    got = E.InstanceMetric.summary(E.evaluate_samples(low, _samples(), vocab, prompt="box").sums)
    assert got["count"] == ref["count"] == 4
    assert got["acc"] == ref["acc"] and got["gt_box_acc"] == ref["gt_box_acc"]
    assert abs(got["miou"] - ref["miou"]) < 0.02
