"""OV-SAM inference against a plain re-statement of OVSAM_SPEC §1, written loop by loop from the spec.

The reference below reads the model's weights from its state dict and recomputes each step with explicit
tensor operations (per-RoI loops, probability-space fusion, the mmdet ``mask2bbox`` rule), then the predictor's
low-res logits, region embeddings, labels, fused scores and masks must agree.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ovsam import OvsamPredictor

from .utils import make_image

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


class TextVocab:
    def __init__(self, model, c=5, p=3, split=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.names = [f"class{i}" for i in range(c)]
        self.clip_model = model.clip_model_name
        self.embeddings = F.normalize(torch.randn(c, p, model.text_dim, generator=g), dim=-1)
        self.indicator = torch.full((c,), 2, dtype=torch.long) if split is None else torch.tensor(split)


def ref_preprocess(image, size):
    h, w = image.shape[:2]
    s = size / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x = (torch.as_tensor(resized).permute(2, 0, 1).float() - MEAN) / STD
    out = torch.zeros(3, size, size)
    out[:, :nh, :nw] = x
    return out[None], (nh, nw)


def ref_fpn(sd, feats):
    lat = [F.conv2d(f, sd[f"fpn_neck.lateral_convs.{i}.conv.weight"], sd[f"fpn_neck.lateral_convs.{i}.conv.bias"])
           for i, f in enumerate(feats)]
    for i in (3, 2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    return [F.conv2d(x, sd[f"fpn_neck.fpn_convs.{i}.conv.weight"], sd[f"fpn_neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(lat)]


def ref_decoder(model, sd, emb, sparse, dense):
    """Tokens [label, mask, prompts...]; SAM's two-way transformer; hypernetwork MLP 0 on the mask token."""
    n = sparse.shape[0]
    tokens = torch.cat([sd["mask_decoder.label_token.weight"], sd["mask_decoder.mask_decoder.mask_tokens.weight"]])
    tokens = torch.cat([tokens[None].expand(n, -1, -1), sparse], dim=1)
    src = emb.expand(n, -1, -1, -1) + dense
    pe = model.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
    md = model.mask_decoder.mask_decoder
    hs, keys = md.transformer(src, pe, tokens)
    b, c, h, w = src.shape
    up = md.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    x = hs[:, 1]
    for j in range(3):
        x = F.linear(x, sd[f"mask_decoder.mask_decoder.output_hypernetworks_mlps.0.layers.{j}.weight"],
                     sd[f"mask_decoder.mask_decoder.output_hypernetworks_mlps.0.layers.{j}.bias"])
        if j < 2:
            x = F.relu(x)
    return torch.einsum("nc,nchw->nhw", x, up)[:, None]


def ref_mask2bbox(low_res):
    out = torch.zeros(low_res.shape[0], 4)
    for i, m in enumerate(low_res[:, 0].sigmoid() > 0.5):
        xs = torch.where(m.any(dim=0))[0]
        ys = torch.where(m.any(dim=1))[0]
        if len(xs) and len(ys):
            out[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return out


def ref_level(box, finest):
    scale = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
    return int(min(max(math.floor(math.log2(scale / finest + 1e-6)), 0), 3))


def ref_cosine(emb, text):
    f = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = torch.stack([torch.stack([(text[k] @ f[n]).max() for k in range(text.shape[0])]) for n in range(f.shape[0])])
    logits = sims * torch.tensor(4.6052, dtype=torch.float32).exp()
    return torch.cat([logits, torch.zeros(f.shape[0], 1)], dim=1)


def ref_fuse(q_logits, c_logits, v, indicator, alpha=0.1, beta=0.9):
    q = q_logits.softmax(-1)
    c = c_logits.softmax(-1)
    ind = torch.cat([indicator, torch.tensor([1])])
    out = torch.empty_like(q)
    for n in range(q.shape[0]):
        for k in range(q.shape[1]):
            w = (alpha if ind[k] == 1 else beta) * float(v[n])
            out[n, k] = torch.log(q[n, k] ** (1 - w) * c[n, k] ** w) if ind[k] != 0 else -1000.0
    return out


def ref_label_probabilities(scores):
    """§1.7 step 6: ``softmax(cls_results)`` over the C + 1 fused scores, then background dropped; returns the
    ``[N, C]`` foreground part and the ``[N]`` background part, one row at a time in probability space."""
    fg = torch.empty(scores.shape[0], scores.shape[1] - 1, dtype=torch.float64)
    bg = torch.empty(scores.shape[0], dtype=torch.float64)
    for n in range(scores.shape[0]):
        e = [math.exp(float(s)) for s in scores[n]]
        total = sum(e)
        for k in range(len(e) - 1):
            fg[n, k] = e[k] / total
        bg[n] = e[-1] / total
    return fg, bg


def ref_predict(model, vocab, image, boxes=None, points=None, clip_boxes=None):
    sd = model.state_dict()
    size = model.image_size
    x, (nh, nw) = ref_preprocess(image, size)
    h, w = image.shape[:2]
    with torch.no_grad():
        feats = model.backbone(x)
        emb = model.neck(feats)
        fpn = ref_fpn(sd, feats)
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
        in_boxes = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32) * scale
        pts = None
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32) * scale[:2]
            pts = (coords, torch.ones(coords.shape[:2], dtype=torch.long))
        sparse, dense = model.prompt_encoder(points=pts, boxes=in_boxes, masks=None)
        low = ref_decoder(model, sd, emb, sparse, dense)
        roi_boxes = ref_mask2bbox(low) * (size / low.shape[-1])
        rec = model.config.recognition
        head = []
        for box in roi_boxes:
            lvl = ref_level(box, rec.finest_scale)
            stride = model.config.neck.strides[lvl]
            r = roi_align(fpn[lvl], torch.cat([torch.zeros(1), box])[None], rec.roi_size, 1.0 / stride, 0, True)
            r = F.relu(F.conv2d(r, sd["mask_decoder.roi_conv.0.conv.weight"]))
            head.append(r.mean(dim=(2, 3))[0])
        head = torch.stack(head)
        if clip_boxes is not None:  # taken as given, in the 1024 frame
            clip_boxes = torch.as_tensor(clip_boxes, dtype=torch.float32)
        else:
            clip_boxes = in_boxes if in_boxes is not None else roi_boxes
        c5 = feats[-1]
        rois = torch.cat([torch.zeros(len(clip_boxes), 1), clip_boxes], dim=1)
        clip_emb = model.backbone.visual.attnpool(roi_align(c5, rois, model.config.clip.roi_size, 1 / 32, 0, True))
        v = (F.interpolate(low, size=c5.shape[-2:], mode="bilinear", align_corners=False) > 0).flatten(1).any(1)
        scores = ref_fuse(ref_cosine(head, vocab.embeddings), ref_cosine(clip_emb, vocab.embeddings), v,
                          vocab.indicator)
        probs, background = ref_label_probabilities(scores)
        labels = probs.argmax(-1)
        up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[..., :nh, :nw]
        masks = (F.interpolate(up, (h, w), mode="bilinear", align_corners=False).sigmoid() > 0.5)[:, 0]
    return dict(low=low, head=head, clip=clip_emb, v=v, scores=scores, labels=labels, masks=masks,
                roi_boxes=roi_boxes, probs=probs, background=background)


def _check(pred, ref, vocab):
    # logits reach a few hundred for empty masks, where float32 summation order alone moves them by a few ulp
    np.testing.assert_allclose(pred.low_res_logits, ref["low"].numpy(), atol=1e-4, rtol=1e-6)
    for got, want in ((pred.head_embeddings, ref["head"]), (pred.clip_embeddings, ref["clip"])):
        scale = np.abs(want.numpy()).max(axis=1, keepdims=True) + 1e-12
        np.testing.assert_allclose(got / scale, want.numpy() / scale, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(pred.clip_valid, ref["v"].numpy())
    np.testing.assert_array_equal(pred.labels, ref["labels"].numpy())
    np.testing.assert_allclose(pred.label_scores, ref["probs"].numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(pred.background_scores, ref["background"].numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(pred.label_scores.sum(1) + pred.background_scores, 1.0, atol=1e-5)
    assert (pred.masks != ref["masks"].numpy()).sum() <= 2 * pred.masks.shape[0]


@pytest.mark.parametrize("hw", [(200, 300), (310, 180)])
def test_box_prompts_match_the_spec(tiny_model, hw):
    vocab = TextVocab(tiny_model, split=[1, 2, 0, 1, 2])
    image = make_image(*hw, seed=hw[0])
    h, w = hw
    boxes = np.array([[2, 3, 20, 22], [10, 10, w * 0.6, h * 0.5], [0, 0, w, h], [w * 0.3, h * 0.4, w - 1, h - 2]])
    p = OvsamPredictor(tiny_model, vocab)
    p.set_image(image)
    pred = p.predict(box=boxes)
    ref = ref_predict(tiny_model, vocab, image, boxes=boxes)
    _check(pred, ref, vocab)
    assert not np.any(pred.labels == 2)  # the excluded class is never chosen


def test_point_prompts_match_the_spec(tiny_model):
    vocab = TextVocab(tiny_model, seed=3)
    image = make_image(240, 160, seed=9)
    points = np.array([[[40.0, 60.0]], [[120.0, 200.0]], [[80.0, 30.0]]])
    p = OvsamPredictor(tiny_model, vocab)
    p.set_image(image)
    pred = p.predict(point_coords=points, point_labels=np.ones((3, 1)))
    ref = ref_predict(tiny_model, vocab, image, points=points)
    _check(pred, ref, vocab)


def test_published_point_evaluation_pools_unscaled_gt_boxes(tiny_model):
    """``clip_boxes`` (the published point-mode quirk, OVSAM_SPEC §6 item 3): the frozen-CLIP branch pools the
    given boxes as they are, here GT boxes in original coordinates of an image that the model scales by 1024/310."""
    from ovsam import predict_batch

    vocab = TextVocab(tiny_model, seed=4)
    image = make_image(310, 180, seed=2)
    points = np.array([[[40.0, 60.0]], [[120.0, 200.0]]])
    gt_boxes = np.array([[20.0, 30.0, 90.0, 110.0], [100.0, 150.0, 170.0, 290.0]])
    [pred] = predict_batch(tiny_model, [image], [{"point_coords": points, "point_labels": np.ones((2, 1)),
                                                   "clip_boxes": gt_boxes}], vocab)
    ref = ref_predict(tiny_model, vocab, image, points=points, clip_boxes=gt_boxes)
    _check(pred, ref, vocab)
    [plain] = predict_batch(tiny_model, [image], [{"point_coords": points, "point_labels": np.ones((2, 1))}], vocab)
    assert not np.allclose(plain.clip_embeddings, pred.clip_embeddings, atol=1e-3)  # the override was used
    np.testing.assert_allclose(plain.low_res_logits, pred.low_res_logits, atol=1e-5)  # masks do not depend on it
    with pytest.raises(ValueError, match="clip_boxes"):
        predict_batch(tiny_model, [image], [{"point_coords": points, "point_labels": np.ones((2, 1)),
                                             "clip_boxes": gt_boxes[:1]}], vocab)


def test_empty_mask_uses_level_zero_box_and_no_clip(tiny_model):
    """An empty mask gives the (0,0,0,0) RoI on P2, v = 0 and scores = log softmax of the head logits."""
    import copy

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.mask_decoder.mask_decoder.output_hypernetworks_mlps[0].layers[2].weight.zero_()
        model.mask_decoder.mask_decoder.output_hypernetworks_mlps[0].layers[2].bias.fill_(-50.0)
        model.mask_decoder.mask_decoder.output_upscaling[3].bias.fill_(1.0)
    vocab = TextVocab(model, split=[1, 2, 2, 1, 1], seed=5)
    image = make_image(200, 260, seed=1)
    p = OvsamPredictor(model, vocab)
    p.set_image(image)
    pred = p.predict(box=np.array([[10, 10, 100, 120], [50, 50, 250, 190]]))
    assert not pred.masks.any() and not pred.clip_valid.any()
    ref = ref_predict(model, vocab, image, boxes=np.array([[10, 10, 100, 120], [50, 50, 250, 190]]))
    assert torch.equal(ref["roi_boxes"], torch.zeros(2, 4))
    _check(pred, ref, vocab)
    q = ref_cosine(ref["head"], vocab.embeddings).softmax(-1)[:, :-1]
    np.testing.assert_allclose(pred.label_scores, q.numpy(), atol=1e-5, rtol=1e-4)


def test_level_rule_and_fusion_by_hand():
    from ovsam.modeling.recognition import fuse_scores, roi_levels

    rois = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 111, 111], [0, 0, 0, 112, 112], [0, 0, 0, 223, 223],
                         [0, 0, 0, 224, 224], [0, 0, 0, 447, 447], [0, 0, 0, 448, 448], [0, 0, 0, 1024, 1024]],
                        dtype=torch.float32)
    assert roi_levels(rois, 4, 56).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    q = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    c = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    ind = torch.tensor([1, 2, 0])
    got = fuse_scores(q, c, torch.tensor([True]), ind, 0.1, 0.9)
    pq, pc = q.softmax(-1)[0], c.softmax(-1)[0]
    expected = [math.log(pq[0] ** 0.9 * pc[0] ** 0.1), math.log(pq[1] ** 0.1 * pc[1] ** 0.9), -1000.0,
                math.log(pq[3] ** 0.9 * pc[3] ** 0.1)]
    np.testing.assert_allclose(got[0].tolist(), expected, rtol=1e-6)
    gated = fuse_scores(q, c, torch.tensor([False]), ind, 0.1, 0.9)
    np.testing.assert_allclose(gated[0, [0, 1, 3]].tolist(), q.log_softmax(-1)[0, [0, 1, 3]].tolist(), rtol=1e-6)


def test_region_embeddings_on_every_fpn_level(tiny_model):
    """Given RoIs spanning all four levels, the head embedding equals per-RoI RoIAlign on the level the rule picks."""
    sd = tiny_model.state_dict()
    x, _ = ref_preprocess(make_image(256, 256, seed=2), tiny_model.image_size)
    boxes = torch.tensor([[3.0, 4.0, 20.0, 25.0], [10.0, 10.0, 50.0, 60.0], [30.0, 20.0, 130.0, 120.0],
                          [0.0, 0.0, 250.0, 200.0], [0.0, 0.0, 0.0, 0.0]])
    levels = [ref_level(b, tiny_model.config.recognition.finest_scale) for b in boxes]
    assert sorted(set(levels)) == [0, 1, 2, 3]
    with torch.no_grad():
        feats = tiny_model.encode_image(x)
        fpn = ref_fpn(sd, feats.clip_feats)
        for got, want in zip(feats.fpn_feats, fpn):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        idx = torch.zeros(len(boxes), dtype=torch.long)
        low = torch.zeros(len(boxes), 1, 64, 64)
        regions = tiny_model.region_embeddings(feats, idx, boxes, low)
        rec = tiny_model.config.recognition
        for i, (box, lvl) in enumerate(zip(boxes, levels)):
            stride = tiny_model.config.neck.strides[lvl]
            r = roi_align(fpn[lvl], torch.cat([torch.zeros(1), box])[None], rec.roi_size, 1.0 / stride, 0, True)
            want = F.relu(F.conv2d(r, sd["mask_decoder.roi_conv.0.conv.weight"])).mean(dim=(2, 3))[0]
            scale = want.abs().max() + 1e-12
            torch.testing.assert_close(regions.head_embeddings[i] / scale, want / scale, atol=1e-5, rtol=0)
