"""Training set-up: which modules train per stage, AdamW groups, the published schedules and their resumption."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ovsam
from ovsam.training import (OptimConfig, build_optimizer, build_scheduler, clip_gradients, lr_factor,
                            published_optim, set_trainable, train_mode)


@pytest.fixture(scope="module")
def model():
    return ovsam.build_ovsam("ovsam-tiny")


def test_clip2sam_trains_fpn_and_decoder_only(model):
    params = set_trainable(model, "clip2sam")
    ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        trains = name.startswith(("fpn_neck.", "mask_decoder."))
        assert p.requires_grad == trains and (id(p) in ids) == trains, name
    train_mode(model, "clip2sam")
    assert model.mask_decoder.training and model.fpn_neck.training
    assert not model.backbone.training and not model.neck.training and not model.prompt_encoder.training
    set_trainable(model, "sam2clip")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"neck"}
    with pytest.raises(ValueError, match="clip2sam"):
        set_trainable(model, "everything")


def test_norm_weights_are_not_decayed(model):
    set_trainable(model, "clip2sam")
    opt = build_optimizer(model, OptimConfig())
    decay, no_decay = opt.param_groups
    norms = {id(p) for m in model.mask_decoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    assert norms and {id(p) for p in no_decay["params"]} == norms and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.05
    assert id(model.fpn_neck.lateral_convs[0].conv.bias) in {id(p) for p in decay["params"]}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable


def test_published_schedules():
    c2s = published_optim("clip2sam")
    assert c2s.clip_grad_norm == 0.01 and c2s.schedule == "multistep"
    assert lr_factor(0, 1200, c2s) == pytest.approx(1e-3)
    assert lr_factor(250, 1200, c2s) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr_factor(500, 1200, c2s) == 1.0 and lr_factor(799, 1200, c2s) == 1.0
    assert lr_factor(800, 1200, c2s) == pytest.approx(0.1) and lr_factor(1100, 1200, c2s) == pytest.approx(0.01)
    s2c = published_optim("sam2clip")
    assert s2c.clip_grad_norm == 5.0
    assert lr_factor(1000, 1000, s2c) == pytest.approx(0.01)
    assert lr_factor(750, 1000, s2c) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.75)))


def test_scheduler_resumes_at_the_saved_step():
    cfg = OptimConfig(warmup_steps=5, schedule="cosine")
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=cfg.lr)
    sched = build_scheduler(opt, 20, cfg)
    for _ in range(7):
        opt.step()
        sched.step()
    state_o, state_s = opt.state_dict(), sched.state_dict()
    w2 = nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([w2], lr=cfg.lr)
    sched2 = build_scheduler(opt2, 20, cfg)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    assert opt2.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(7, 20, cfg))


def test_gradient_clipping_bounds_the_global_norm():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], 0.01) == pytest.approx(5.0)
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(0.01, rel=1e-4)
    assert clip_gradients([a, b], None) == pytest.approx(0.01, rel=1e-4)


def test_unfreeze_adds_the_clip_trunk_and_the_neck():
    from ovsam.clip2sam import clip2sam_losses
    from ovsam.training import trainable_modules

    model = ovsam.build_ovsam("ovsam-tiny")
    assert trainable_modules("clip2sam", ["neck", "clip", "neck"]) == ("fpn_neck", "mask_decoder", "neck", "backbone")
    with pytest.raises(ValueError, match="cannot unfreeze 'text'"):
        trainable_modules("clip2sam", ["text"])
    with pytest.raises(ValueError, match="cannot unfreeze 'clip'"):
        trainable_modules("sam2clip", ["clip"])
    # frozen by default: no gradient through the trunk, .train() leaves its BatchNorm in eval
    batch = _mask_batch(model)
    set_trainable(model, "clip2sam")
    train_mode(model, "clip2sam")
    assert not model.backbone.training
    losses, _ = clip2sam_losses(model, batch, text=torch.randn(3, 1, model.text_dim))
    losses["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters()) and all(p.grad is None for p in model.neck.parameters())
    params = set_trainable(model, "clip2sam", ["clip", "neck"])
    train_mode(model, "clip2sam", ["clip", "neck"])
    ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        trains = name.startswith(("fpn_neck.", "mask_decoder.", "neck.", "backbone."))
        assert p.requires_grad == trains and (id(p) in ids) == trains, name
    assert model.backbone.training and model.neck.training and not model.text.training
    bn = model.backbone.visual.bn1
    before = bn.running_mean.clone()
    losses, _ = clip2sam_losses(model, batch, text=torch.randn(3, 1, model.text_dim))
    losses["loss"].backward()
    assert not torch.equal(bn.running_mean, before)  # BatchNorm in train mode updates its statistics
    assert model.backbone.visual.conv1.weight.grad.abs().sum() > 0  # the stem; residual bn3 weights start at 0
    assert sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in model.neck.parameters()) > 10
    assert all(p.grad is None for p in model.text.parameters())


def test_trunk_warmup_loss_trains_the_trunk_and_probe_only():
    """The trunk warm-up's region classification reaches the trunk (stride-16 stage and everything before it) and
    the dataset's probe classifier, nothing else; set_trainable afterwards freezes the trunk again (eval mode, no
    gradient)."""
    from torchvision.ops import roi_align

    from ovsam.clip2sam import RegionProbe, trunk_warmup_losses

    model = ovsam.build_ovsam("ovsam-tiny")
    batch = _mask_batch(model)  # dataset "d", labels 0 and 2
    probe = RegionProbe.for_model(model, {"other": 5, "d": 3})
    assert (probe.level, probe.stride) == (2, 16)
    assert [(c.in_features, c.out_features) for c in probe.classifiers] == [(model.config.clip.stage_channels[2], 5),
                                                                            (model.config.clip.stage_channels[2], 3)]
    model.backbone.unfreeze()
    model.eval()
    model.backbone.train()
    losses, stats = trunk_warmup_losses(model, probe, batch)
    losses["loss"].backward()
    assert losses["loss"] > 0 and stats["labelled"] == 4 and 0 <= stats["correct"] <= 4
    assert probe.classifiers[1].weight.grad.abs().sum() > 0 and probe.classifiers[0].weight.grad is None
    assert model.backbone.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.visual.layer4.parameters())  # C5 is not used
    for part in (model.fpn_neck, model.mask_decoder, model.neck, model.text):
        assert all(p.grad is None for p in part.parameters())
    # the probe: the spatial mean of a 7x7 RoIAlign of C4, a linear classifier, a background column of 0
    x = torch.randn(1, 3, model.image_size, model.image_size)
    feats = [f.detach() for f in model.backbone(x)]
    early = model.backbone(x, num_stages=3)  # what the warm-up runs: the stages up to C4
    assert len(early) == 3 and all(torch.allclose(a, b) for a, b in zip(early, feats))
    rois = torch.tensor([[0.0, 24, 16, 120, 80]])
    pooled = roi_align(feats[2], rois, output_size=7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    logits = probe(feats, rois, "d")
    torch.testing.assert_close(logits[:, :3], probe.classifiers[1](pooled.mean((2, 3))))
    assert logits.shape == (1, 4) and logits[0, 3] == 0
    # a dataset without a classifier (class-agnostic) gives a zero loss that still reaches the trunk (DDP-safe)
    losses, stats = trunk_warmup_losses(model, RegionProbe.for_model(model, {"other": 5}), batch)
    assert losses["loss"].item() == 0 and stats["labelled"] == 0
    set_trainable(model, "clip2sam")
    train_mode(model, "clip2sam")
    assert model.backbone.frozen and not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())


def _mask_batch(model):
    from pipeline.training.train_data import TrainSample

    g = torch.Generator().manual_seed(0)
    s = model.image_size
    out = []
    for i in range(2):
        masks = torch.zeros(2, s, s, dtype=torch.bool)
        masks[0, 16:80, 24:120] = True
        masks[1, 120:240, 40:160] = True
        out.append(TrainSample(dataset="d", key=str(i), kind="mask",
                               image=torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8),
                               input_hw=(s, s - 32 * i), boxes=torch.tensor([[24.0, 16, 120, 80], [40, 120, 160, 240]]),
                               points=torch.tensor([[60.0, 40], [100, 180]]), is_point=torch.tensor([False, True]),
                               labels=torch.tensor([0, 2]), masks=masks))
    return out
