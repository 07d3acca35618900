"""Training precision (``ovsam train/distill --precision``): autocast forward, fp32 master weights and optimiser
state, loss scaling for fp16; bf16 and fp32 steps agree, and the resolved precision is recorded."""

from __future__ import annotations

import pytest
import torch

import ovsam.precision
from jobs.train import TrainJobConfig, run_train
from ovsam.checkpoint import read_metadata
from ovsam.training import MixedPrecision
from pipeline.training.train_specs import DatasetSpec


@pytest.mark.parametrize("flags, want", [(frozenset(), "fp32"), (frozenset({"amx_bf16"}), "bf16"),
                                         (frozenset({"avx512_bf16"}), "bf16")])
def test_auto_picks_fp32_where_bf16_is_emulated(monkeypatch, flags, want):
    monkeypatch.setattr(ovsam.precision, "_cpu_flags", lambda: flags)
    assert MixedPrecision("auto", "cpu").precision == want
    assert MixedPrecision("fp32", "cpu").precision == "fp32"


def test_fp16_scales_the_loss_and_keeps_fp32_master_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mp = MixedPrecision("fp16", "cpu")
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    before = [p.detach().clone() for p in model.parameters()]
    scales = []
    for _ in range(20):
        with mp.autocast():
            out = model(x)
        assert out.dtype == torch.float16
        loss = torch.nn.functional.mse_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        mp.backward(loss)
        scaled = model[0].weight.grad.abs().max().item()
        mp.unscale(opt)
        assert model[0].weight.grad.abs().max().item() <= scaled  # scaled up for the backward pass, now back
        mp.step(opt)
        scales.append(mp.scaler.get_scale())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert min(scales) < 65536.0  # overflowing steps were skipped and the scale came down
    assert mp.state_dict()["precision"] == "fp16" and "scaler" in mp.state_dict()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from pipeline.training.packers.synthetic import pack_synthetic

    root = tmp_path_factory.mktemp("precision")
    pack_synthetic(str(root / "data"), kind="mask", num_train=8, num_heldout=1, max_objects=3)
    return root


def _run(root, precision, monkeypatch):
    import ovsam.clip2sam

    losses = []
    real = ovsam.clip2sam.clip2sam_losses

    def recording(model, batch, text, cfg, generator=None):
        out = real(model, batch, text, cfg, generator)
        losses.append(float(out[0]["loss"].detach()))
        return out

    cfg = TrainJobConfig(datasets=(DatasetSpec("synthetic", str(root / "data" / "train"), "mask", 1.0),),
                         name=f"p-{precision}", storage_path=str(root / "runs"), steps=4, batch_size=2,
                         num_prompts=4, mask_points=64, checkpoint_every=4, num_workers=0, precision=precision,
                         progress_every=3600.0, quiet=True)
    with monkeypatch.context() as m:
        m.setattr(ovsam.clip2sam, "clip2sam_losses", recording)
        run_train(cfg)
    model_file = next((root / "runs" / f"p-{precision}").rglob("model.safetensors"))
    return losses, read_metadata(model_file)


def test_bf16_and_fp32_training_steps_agree(synthetic, monkeypatch):
    fp32, meta32 = _run(synthetic, "fp32", monkeypatch)
    bf16, meta16 = _run(synthetic, "bf16", monkeypatch)
    assert meta32["training_precision"] == "fp32" and meta16["training_precision"] == "bf16"
    assert len(fp32) == len(bf16) == 4
    for a, b in zip(fp32, bf16):  # the same batches and prompts; bf16 rounds to 8 mantissa bits
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, (fp32, bf16)
