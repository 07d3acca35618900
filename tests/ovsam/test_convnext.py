"""The ConvNeXt variant: same code path, frozen-CLIP branch by mask pooling (OVSAM_SPEC §1.8)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ovsam import OvsamPredictor
from ovsam.build import build_model
from ovsam.config import ClipConfig, load_config

from .utils import make_image, randomize_


def _tiny_convnext():
    base = load_config("ovsam-tiny")
    clip = ClipConfig(
        name="tiny-convnext-clip",
        stage_channels=(40, 80, 160, 320),
        roi_size=0,
        model_cfg={
            "embed_dim": 64,
            "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
    )
    cfg = dataclasses.replace(base, name="ovsam-tiny-convnext", clip=clip)
    torch.manual_seed(0)
    return randomize_(build_model(cfg), seed=7, scale=0.3).eval()


def test_convnext_mask_pooling_branch():
    model = _tiny_convnext()
    assert not model.backbone.has_box_pool

    class Vocab:
        names = ["a", "b", "c"]
        clip_model = model.clip_model_name
        embeddings = F.normalize(torch.randn(3, 2, model.text_dim), dim=-1)
        indicator = torch.tensor([1, 2, 2])

    p = OvsamPredictor(model, Vocab())
    image = make_image(180, 240)
    p.set_image(image)
    boxes = np.array([[10, 10, 120, 100], [50, 60, 230, 170]], dtype=float)
    pred = p.predict(box=boxes)
    assert pred.labels.shape == (2,)
    # independent mask pooling on the last stage: resize logits, binarise at 0, masked mean, trunk head, projection
    c5 = p.features.clip_feats[-1]
    low = torch.as_tensor(pred.low_res_logits)
    m = (F.interpolate(low, size=c5.shape[-2:], mode="bilinear", align_corners=False) > 0).float()
    pooled = (c5 * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-8)
    visual = model.backbone.visual
    expected = visual.head(visual.trunk.head(pooled[:, :, None, None]))
    torch.testing.assert_close(torch.as_tensor(pred.clip_embeddings), expected, atol=1e-5, rtol=1e-5)
