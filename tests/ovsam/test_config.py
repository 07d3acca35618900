"""Model configs: every named model builds; the published model has the released sizes; bad configs are refused."""

from __future__ import annotations

import json

import pytest
import torch

from ovsam import build_ovsam, list_models, load_config
from ovsam.build import build_model
from ovsam.config import OvsamConfig


def test_list_models():
    assert list_models() == sorted(
        ["ovsam-rn50x16", "ovsam-convnext-large", "ovsam-tiny", "sam-vit-h", "sam-vit-l", "sam-vit-b", "sam-tiny"]
    )


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds(name):
    with torch.device("meta"):
        model = build_model(load_config(name))
    assert model.config.name == name
    assert sum(p.numel() for p in model.parameters()) > 0


def _counts(model, prefix):
    sd = model.state_dict()
    keys = [k for k in sd if k.startswith(prefix + ".")]
    return len(keys), sum(sd[k].numel() for k in keys)


def test_published_model_sizes_match_released_files():
    """Key counts and element counts of OVSAM_SPEC §2.4 (neck = the 536 MB sam2clip file, head + FPN = 31.5 MB)."""
    with torch.device("meta"):
        model = build_model(load_config("ovsam-rn50x16"))
    assert _counts(model, "neck") == (86, 134_087_648)
    assert _counts(model, "fpn_neck") == (16, 3_835_904)
    assert _counts(model, "mask_decoder") == (103, 4_031_104)
    assert _counts(model, "prompt_encoder")[1] == 6_476
    assert _counts(model, "backbone") == (771, 167_522_959)
    sd = model.state_dict()
    assert tuple(sd["neck.pos_embed"].shape) == (1, 64, 64, 1280)
    assert tuple(sd["neck.blocks.0.attn.rel_pos_h"].shape) == (27, 80)
    assert tuple(sd["neck.blocks.4.attn.rel_pos_h"].shape) == (127, 80)
    assert tuple(sd["neck.patch_embeds.3.projection.weight"].shape) == (3072, 1280, 2, 2)
    assert tuple(sd["mask_decoder.mask_decoder.mask_tokens.weight"].shape) == (1, 256)
    assert tuple(sd["mask_decoder.roi_conv.0.conv.weight"].shape) == (768, 256, 1, 1)
    assert not any("iou" in k for k in sd if k.startswith("mask_decoder."))
    assert tuple(sd["backbone.visual.attnpool.positional_embedding"].shape) == (145, 3072)


def test_published_text_tower_uses_quickgelu():
    with torch.device("meta"):
        model = build_model(load_config("ovsam-rn50x16"))
    acts = {type(m).__name__ for m in model.text.modules()}
    assert "QuickGELU" in acts


def test_tiny_model_forward_shapes(tiny_model):
    x = torch.zeros(2, 3, 256, 256)
    feats = tiny_model.encode_image(x)
    assert feats.image_embeddings.shape == (2, 64, 16, 16)
    assert [tuple(f.shape[-2:]) for f in feats.fpn_feats] == [(64, 64), (32, 32), (16, 16), (8, 8)]


def test_frozen_parts_stay_frozen(tiny_model):
    tiny_model.train()
    try:
        assert not tiny_model.backbone.training and not tiny_model.text.training
        assert not any(p.requires_grad for p in tiny_model.backbone.parameters())
        assert not any(p.requires_grad for p in tiny_model.text.parameters())
    finally:
        tiny_model.eval()


def test_from_dict_rejects_unknown_keys():
    data = json.loads(json.dumps(load_config("ovsam-tiny").to_dict()))
    data["neck"]["depht"] = 3
    with pytest.raises(ValueError, match=r"neck: unknown key\(s\) \['depht'\]"):
        OvsamConfig.from_dict(data)
    data = load_config("ovsam-tiny").to_dict()
    del data["clip"]
    with pytest.raises(ValueError, match="missing required key 'clip'"):
        OvsamConfig.from_dict(data)


def test_config_round_trips_through_dict_and_json(tmp_path):
    for name in list_models():
        cfg = load_config(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        assert load_config(str(path)) == cfg


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown model 'ovsam-rn50'; available: ovsam-convnext-large, ovsam-rn50x16"):
        build_ovsam("ovsam-rn50")


def test_bad_values_are_refused():
    data = load_config("ovsam-tiny").to_dict()
    data["resize"] = "bicubic"
    with pytest.raises(ValueError, match="resize must be one of"):
        OvsamConfig.from_dict(data)
    data = load_config("ovsam-tiny").to_dict()
    data["recognition"]["roi_box"] = "convex_hull"
    with pytest.raises(ValueError, match="roi_box must be one of"):
        OvsamConfig.from_dict(data)


def test_random_init_is_reproducible_across_builds():
    a = build_ovsam("ovsam-tiny").state_dict()
    torch.manual_seed(123)
    b = build_ovsam("ovsam-tiny").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _with_random_init(name, random_init):
    data = load_config(name).to_dict()
    data["clip"]["random_init"] = random_init
    return OvsamConfig.from_dict(data)


def _smooth_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 32, size // 32, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_calibrated_random_trunk_gives_unit_scale_image_dependent_features():
    """open_clip's from-scratch init leaves a frozen random ResNet trunk nearly silent (zero last-BN weights,
    identity statistics); ``random_init: calibrated`` gives every stage unit-scale outputs that the neck passes on."""
    x = _smooth_images(4, 256, seed=5)
    spread = {}
    for random_init in ("open_clip", "calibrated"):
        state = torch.random.get_rng_state()
        model = build_model(_with_random_init("ovsam-tiny", random_init))
        assert torch.equal(torch.random.get_rng_state(), state)
        feats = model.backbone(x)
        stds = [float(f.std()) for f in feats]
        with torch.no_grad():
            emb = model.neck(feats)
        spread[random_init] = float(emb.std(0).mean() / emb.std())
        if random_init == "calibrated":
            assert all(0.3 < s < 10 for s in stds), stds
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if threads > 1 else 2)  # e.g. a Ray worker's one thread against a driver's two
            try:
                again = build_model(_with_random_init("ovsam-tiny", random_init)).state_dict()
            finally:
                torch.set_num_threads(threads)
            assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
        else:
            assert all(s < 0.05 for s in stds), stds
    assert spread["open_clip"] < 0.01 < 0.1 < spread["calibrated"], spread


def test_unknown_random_init_is_refused():
    with pytest.raises(ValueError, match="unknown random_init"):
        _with_random_init("ovsam-tiny", "xavier")
