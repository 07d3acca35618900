"""Everything mode: equals SamAutomaticMaskGenerator on SAM models; labels records on OV-SAM models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import rle_to_mask

from ovsam import OvsamMaskGenerator, build_ovsam
from ovsam.masks import decode_rle

from .utils import make_image, randomize_


@pytest.fixture(scope="module")
def sam_tiny():
    torch.manual_seed(0)
    return randomize_(build_ovsam("sam-tiny"), seed=5, scale=0.3)


@pytest.mark.parametrize("nms", [1.0, 0.7])
def test_matches_segment_anything_generator(sam_tiny, nms):
    image = make_image(150, 210, seed=3)
    kw = dict(points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
              box_nms_thresh=nms)
    ref = SamAutomaticMaskGenerator(sam_tiny, output_mode="uncompressed_rle", **kw).generate(image)
    ours = OvsamMaskGenerator(sam_tiny, output_mode="binary_mask", **kw).generate(image)
    assert len(ref) > (100 if nms == 1.0 else 0)
    assert len(ours) == len(ref)
    def key(r):
        return (tuple(r["point_coords"][0]), round(r["predicted_iou"], 3))

    ref_by_key = {key(r): r for r in ref}
    assert len(ref_by_key) == len(ref)
    for rec in ours:
        match = ref_by_key[key(rec)]
        assert np.array_equal(rec["segmentation"], rle_to_mask(match["segmentation"]))
        assert rec["area"] == match["area"]
        assert rec["predicted_iou"] == pytest.approx(match["predicted_iou"], abs=1e-5)
        assert rec["stability_score"] == pytest.approx(match["stability_score"], abs=1e-5)


def test_thresholds_filter(sam_tiny):
    image = make_image(150, 210, seed=3)
    all_recs = OvsamMaskGenerator(sam_tiny, points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0,
                                  box_nms_thresh=1.0).generate(image)
    strict = OvsamMaskGenerator(sam_tiny, points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0.9,
                                box_nms_thresh=1.0).generate(image)
    assert all(r["stability_score"] >= 0.9 for r in strict)
    assert len(strict) == sum(r["stability_score"] >= 0.9 for r in all_recs)
    nms = OvsamMaskGenerator(sam_tiny, points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0,
                             box_nms_thresh=0.5).generate(image)
    assert len(nms) < len(all_recs)


def test_ovsam_records_are_labelled(tiny_model, tiny_vocab):
    image = make_image(160, 200, seed=4)
    gen = OvsamMaskGenerator(tiny_model, tiny_vocab, points_per_side=6, stability_score_thresh=0.0,
                             output_mode="coco_rle", top_k=3)
    records = gen.generate(image)
    assert records
    for rec in records:
        mask = decode_rle([rec["segmentation"]])[0]
        assert mask.shape == (160, 200) and mask.sum() == rec["area"] > 0
        assert 0 <= rec["label"] < len(tiny_vocab)
        assert rec["label_name"] == tiny_vocab.names[rec["label"]]
        assert rec["top_labels"][0] == rec["label"] and len(rec["top_labels"]) == 3
        assert rec["top_scores"] == sorted(rec["top_scores"], reverse=True)
        ys, xs = np.nonzero(mask)
        assert rec["box_xyxy"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    strict = OvsamMaskGenerator(tiny_model, tiny_vocab, points_per_side=6, stability_score_thresh=0.0,
                                label_score_thresh=1.01).generate(image)
    assert strict == []


def test_bad_arguments(sam_tiny):
    with pytest.raises(ValueError, match="output_mode"):
        OvsamMaskGenerator(sam_tiny, output_mode="png")
    with pytest.raises(ValueError, match="plain SAM"):
        OvsamMaskGenerator(sam_tiny, vocabulary=object())


def test_defaults_follow_the_model_and_the_cli_uses_the_measured_ones(sam_tiny, tiny_model, tiny_vocab):
    """SAM models keep segment-anything's filters; OV-SAM models (no IoU head: stability alone) get the ones
    bench/grid.py measured, and annotate's and predict's grid options default to them."""
    import argparse

    from jobs.args import add_grid_arguments
    from ovsam.automatic import OVSAM_GRID_DEFAULTS, SAM_GRID_DEFAULTS
    from pipeline.annotate.stages import ModelStageConfig

    sam = OvsamMaskGenerator(sam_tiny)
    ov = OvsamMaskGenerator(tiny_model, tiny_vocab)
    assert (sam.stability_score_thresh, sam.box_nms_thresh) == tuple(SAM_GRID_DEFAULTS.values()) == (0.95, 0.7)
    assert (ov.stability_score_thresh, ov.box_nms_thresh) == tuple(OVSAM_GRID_DEFAULTS.values())
    p = argparse.ArgumentParser()
    add_grid_arguments(p)
    args = p.parse_args([])
    stage = ModelStageConfig()
    for name, value in OVSAM_GRID_DEFAULTS.items():
        assert getattr(args, name) == getattr(stage, name) == value
    assert args.points_per_side == stage.points_per_side == ov.points_per_side == 32
