"""Precision (bf16/fp16 against fp32), the cheap frozen-CLIP attention pool, multi-image decoding and the padded
chunks of compiled models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import roi_align

from ovsam import OvsamPredictor, build_ovsam, predict_batch
from ovsam import precision as P
from ovsam.modeling.clip_backbone import attention_pool_first_token

from .utils import make_image

BOXES = np.array([[10, 12, 120, 90], [60, 40, 190, 150], [0, 0, 200, 160], [30, 30, 80, 140]], dtype=float)


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(P, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert P.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(P, "_cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert P.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(P, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"
    if not torch.cuda.is_available():
        assert not P.native_bf16("cuda")
    with pytest.raises(ValueError, match="unknown precision 'bfloat'; expected one of auto, fp32, bf16, fp16"):
        P.resolve_precision("bfloat")


@pytest.mark.parametrize("spatial,width,heads,out", [(12, 3072, 48, 768), (7, 2048, 32, 1024), (3, 64, 4, 32)])
def test_first_token_attention_pool_equals_open_clip(spatial, width, heads, out):
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial, width, heads, out).eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.05)
        x = torch.randn(6, width, spatial, spatial) * 2
        ref = pool(x)
        got = attention_pool_first_token(pool, x)
        exact = pool.double()(x.double())
    assert got.shape == ref.shape == (6, out)
    scale = exact.abs().max().item()
    # no further from the float64 result than open_clip's own float32 pass
    assert (got.double() - exact).abs().max().item() <= max(2 * (ref.double() - exact).abs().max().item(),
                                                             1e-6 * scale)


def test_frozen_clip_regions_cost_a_fraction_of_the_attention_pool():
    """The pool's keys and values are never projected: per region ~4C^2 + 4H(hw+1)C multiply-adds, not 3(hw+1)C^2."""
    torch.manual_seed(0)
    spatial, width, heads, out, n = 12, 512, 8, 128, 10
    pool = AttentionPool2d(spatial, width, heads, out).eval().requires_grad_(False)
    x = torch.randn(n, width, spatial, spatial)
    with FlopCounterMode(display=False) as fast:
        attention_pool_first_token(pool, x)
    with FlopCounterMode(display=False) as ref:
        pool(x)
    tokens = spatial * spatial + 1
    bound = 2 * n * (4 * width * width + 4 * heads * tokens * width + width * out)
    assert fast.get_total_flops() <= bound
    assert ref.get_total_flops() > 10 * fast.get_total_flops()


def test_box_embeddings_equal_roi_align_then_pool(tiny_model):
    backbone = tiny_model.backbone
    c5 = torch.randn(2, tiny_model.config.clip.stage_channels[-1], 8, 8)
    rois = torch.tensor([[0, 0, 0, 256, 256], [1, 10.5, 20, 100, 200], [0, 300, 300, 310, 305]], dtype=torch.float32)
    got = backbone.box_embeddings(c5, rois)
    pool = copy.deepcopy(backbone.visual.attnpool).double()
    with torch.no_grad():
        ref = pool(roi_align(c5.double(), rois.double(), backbone.roi_size, 1 / 32, 0, True))
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)


def _reduced(model, precision):
    return P.set_precision(copy.deepcopy(model), precision)


@pytest.fixture(scope="module")
def calibrated():
    """The tiny model as built: a calibrated trunk with unit-scale activations (the randomised ``tiny_model``'s
    reach 1e8, past float16's range)."""
    from ovsam import Vocabulary

    model = build_ovsam("ovsam-tiny")
    return model, Vocabulary.from_names(["red square", "blue circle", "green triangle"], model, progress=False)


@pytest.mark.parametrize("precision,which", [("bf16", "randomised"), ("bf16", "calibrated"),
                                             ("fp16", "calibrated")])
def test_reduced_precision_returns_float32_and_agrees_with_fp32(tiny_model, tiny_vocab, calibrated, precision,
                                                                which):
    if which == "calibrated":
        tiny_model, tiny_vocab = calibrated
    low = _reduced(tiny_model, precision)
    assert low.precision == precision and tiny_model.precision == "fp32"
    assert P.decoder_dtype(low) == P.DTYPES[precision]
    conv = next(m for m in low.backbone.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = [make_image(160, 200, 0), make_image(300, 120, 1)]
    prompts = [{"box": BOXES}, {"point_coords": np.array([[[30, 40]], [[60, 200]]], float),
                                "point_labels": np.ones((2, 1))}]
    ref = predict_batch(tiny_model, images, prompts, tiny_vocab)
    got = predict_batch(low, images, prompts, tiny_vocab)
    for a, b in zip(ref, got):
        for name in ("low_res_logits", "iou_scores", "label_scores", "head_embeddings", "clip_embeddings"):
            assert getattr(b, name).dtype == np.float32, name
        assert b.masks.dtype == bool
        np.testing.assert_array_equal(a.labels, b.labels)
        inter = (a.masks & b.masks).sum(axis=(1, 2))
        union = np.maximum((a.masks | b.masks).sum(axis=(1, 2)), 1)
        assert (inter / union).mean() >= 0.95
        np.testing.assert_allclose(a.label_scores, b.label_scores, atol=0.02)
    # the predictor gives the same as the batch function at that precision
    p = OvsamPredictor(low, tiny_vocab)
    p.set_image(images[0])
    single = p.predict(box=BOXES)
    np.testing.assert_allclose(single.low_res_logits, got[0].low_res_logits, atol=1e-5)
    assert p.get_image_embedding().dtype == torch.float32


def test_prompts_of_several_images_share_decoder_calls(tiny_model, tiny_vocab, monkeypatch):
    head = tiny_model.mask_decoder
    calls = []
    real = head.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["image_index"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(head, "forward", counting)
    images = [make_image(160, 200, 0), make_image(300, 120, 1), make_image(256, 256, 2)]
    prompts = [{"box": BOXES}, {"box": BOXES[[0, 3]] / 2}, {"box": BOXES[1:]}]
    preds = predict_batch(tiny_model, images, prompts, tiny_vocab)
    assert calls == [[0] * 4 + [1] * 2 + [2] * 3]
    calls.clear()
    one = predict_batch(tiny_model, images[1:2], prompts[1:2], tiny_vocab)[0]
    # another batch composition rounds differently (GEMM blocking follows the batch and the thread count)
    np.testing.assert_allclose(one.low_res_logits, preds[1].low_res_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(one.masks, preds[1].masks)


def test_compiled_models_decode_padded_chunks_with_the_same_results(tiny_model, tiny_vocab, monkeypatch):
    """A compiled model pads every chunk to ``prompt_chunk`` prompts (static shapes); padding changes nothing."""
    padded = copy.deepcopy(tiny_model)
    padded.compiled = True
    sizes = []
    real = padded.mask_decoder.forward

    def recording(*args, **kwargs):
        sizes.append(int(kwargs["image_index"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(padded.mask_decoder, "forward", recording)
    images = [make_image(160, 200, 0), make_image(300, 120, 1)]
    prompts = [{"box": BOXES}, {"box": BOXES[:3] / 2}]
    ref = predict_batch(tiny_model, images, prompts, tiny_vocab, prompt_chunk=4)
    got = predict_batch(padded, images, prompts, tiny_vocab, prompt_chunk=4)
    assert sizes == [4, 4]
    for a, b in zip(ref, got):  # a chunk of 3 and one of 4 round differently at the last float32 digits
        assert len(a) == len(b)
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-4)
        np.testing.assert_allclose(a.label_scores, b.label_scores, atol=1e-4)


def test_compile_equals_eager(tiny_model, tiny_vocab):
    compiled = build_ovsam("ovsam-tiny", compile=True)
    compiled.load_state_dict(tiny_model.state_dict())
    images = [make_image(160, 200, 0)]
    ref = predict_batch(tiny_model, images, [{"box": BOXES}], tiny_vocab)[0]
    got = predict_batch(compiled, images, [{"box": BOXES}], tiny_vocab)[0]
    np.testing.assert_allclose(got.low_res_logits, ref.low_res_logits, atol=1e-4)
    np.testing.assert_array_equal(got.labels, ref.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_agrees_with_cpu(tiny_model, tiny_vocab, precision):
    gpu = P.set_precision(copy.deepcopy(tiny_model).to("cuda"), precision)
    images = [make_image(160, 200, 0)]
    ref = predict_batch(tiny_model, images, [{"box": BOXES}], tiny_vocab)[0]
    got = predict_batch(gpu, images, [{"box": BOXES}], tiny_vocab)[0]
    np.testing.assert_array_equal(got.labels, ref.labels)
    inter = (got.masks & ref.masks).sum(axis=(1, 2))
    assert (inter / np.maximum((got.masks | ref.masks).sum(axis=(1, 2)), 1)).mean() >= 0.95


def test_shared_first_layer_equals_the_two_way_transformer(tiny_model):
    """Prompts without a mask input share the image tokens entering the decoder; projecting them once per image
    gives the transformer's results on per-prompt copies."""
    head = tiny_model.mask_decoder
    torch.manual_seed(0)
    emb = tiny_model.neck.grid_size
    c = head.label_token.weight.shape[1]
    images = torch.randn(2, c, emb, emb)
    pe = tiny_model.prompt_encoder.get_dense_pe()
    boxes = torch.tensor([[10., 20, 100, 200], [0, 0, 256, 256], [50, 60, 70, 90], [5, 5, 30, 200]])
    sparse, dense = tiny_model.prompt_encoder(points=None, boxes=boxes, masks=None)
    index = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        shared = head(images, pe, sparse, dense, image_index=index, dense_shared=True)
        copies = head(images, pe, sparse, dense, image_index=index, dense_shared=False)
        one = head(images[:1], pe, sparse, dense, image_index=torch.zeros(4, dtype=torch.long), dense_shared=True)
        one_ref = head(images[:1], pe, sparse, dense, dense_shared=False)
    for a, b in ((shared, copies), (one, one_ref)):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_unpadded_prototypes_classify_like_the_padded_ones():
    from ovsam import Vocabulary
    from ovsam.modeling import recognition as R

    torch.manual_seed(0)
    synonyms = [["a"], ["b", "bb", "bbb"], ["c", "cc"], ["d"]]
    emb = torch.nn.functional.normalize(torch.randn(4, 3, 16), dim=-1)
    for i, syn in enumerate(synonyms):
        emb[i, len(syn):] = emb[i, 0]
    vocab = Vocabulary(["a", "b", "c", "d"], synonyms, emb, clip_model="x")
    protos = vocab.prototypes()
    assert protos.vectors.shape == (7, 16) and protos.owner.tolist() == [0, 1, 1, 1, 2, 2, 3]
    regions = torch.randn(5, 16)
    torch.testing.assert_close(R.class_logits(regions, protos, 4.6), R.class_logits(regions, emb, 4.6))
    low = R.class_logits(regions, vocab.prototypes("cpu", torch.bfloat16), 4.6)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, R.class_logits(regions, emb, 4.6), atol=0.5, rtol=0.01)
    assert vocab.prototypes() is protos  # cached
    single = Vocabulary(["a", "b"], [["a"], ["b"]], emb[:2, :1], clip_model="x")
    torch.testing.assert_close(R.class_logits(regions, single.prototypes(), 4.6),
                               R.class_logits(regions, single.embeddings, 4.6))
