"""OvsamPredictor on plain SAM models equals segment_anything.SamPredictor with the same weights."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor, sam_model_registry

from ovsam import OvsamPredictor, build_ovsam
from ovsam.build import build_model
from ovsam.config import load_config

from .utils import randomize_


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((480, 640), (700, 300)):
        img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (200, 40, 40)
        out.append(img)
    return out


PROMPTS = [
    dict(box=np.array([30.0, 40.0, 250.0, 290.0])),
    dict(point_coords=np.array([[100.0, 120.0], [150.0, 200.0], [60.0, 60.0]]), point_labels=np.array([1, 1, 0])),
    dict(point_coords=np.array([[120.0, 150.0]]), point_labels=np.array([1]), box=np.array([10.0, 20.0, 280.0, 260.0])),
]


def _compare(ours: OvsamPredictor, ref: SamPredictor, image: np.ndarray) -> None:
    ours.set_image(image)
    ref.set_image(image)
    torch.testing.assert_close(ours.get_image_embedding(), ref.get_image_embedding(), atol=1e-5, rtol=1e-5)
    for prompt in PROMPTS:
        for multimask in (False, True):
            ref_masks, ref_iou, ref_low = ref.predict(**prompt, multimask_output=multimask)
            got = ours.predict(**prompt, multimask_output=multimask)
            got_masks = got.masks[0] if multimask else got.masks[:1]
            got_iou = got.iou_scores[0] if multimask else got.iou_scores[:1]
            assert got.low_res_logits.shape[1:] == ref_low.shape
            assert np.abs(got.low_res_logits[0] - ref_low).max() <= 1e-4
            np.testing.assert_allclose(got_iou, ref_iou, atol=1e-5)
            # logits agree to 1e-4; pixels whose upsampled logit is within that of the threshold may flip
            ref_logits, _, _ = ref.predict(**prompt, multimask_output=multimask, return_logits=True)
            border = np.abs(ref_logits) < 1e-3
            assert np.array_equal(got_masks[~border], ref_masks[~border])
            assert got_masks.shape == ref_masks.shape


def _reference_and_file(kind: str, config_name: str, tmp_path, seed: int):
    if kind in sam_model_registry:
        ref_model = sam_model_registry[kind]()
    else:
        ref_model = build_model(load_config(config_name))
    randomize_(ref_model, seed)
    path = tmp_path / f"{config_name}.pth"
    torch.save(ref_model.state_dict(), path)
    return ref_model.eval(), path


def test_sam_tiny_parity(tmp_path):
    ref_model, path = _reference_and_file("tiny", "sam-tiny", tmp_path, 1)
    ours = OvsamPredictor(build_ovsam("sam-tiny", checkpoint=path))
    from segment_anything.modeling import Sam

    assert isinstance(ref_model, Sam)
    for image in _images():
        _compare(ours, SamPredictor(ref_model), image)


def test_sam_vit_b_parity(tmp_path):
    """A segment_anything ViT-B state dict loaded through build_ovsam answers like SamPredictor."""
    ref_model, path = _reference_and_file("vit_b", "sam-vit-b", tmp_path, 2)
    ours = OvsamPredictor(build_ovsam("sam-vit-b", checkpoint=path))
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, ref_model.state_dict()[name]), name
    # one non-square image: a ViT-B embedding takes ~30 s on 2 CPU cores
    _compare(ours, SamPredictor(ref_model), _images()[0])


def test_many_prompts_one_call_equal_single_calls(tmp_path):
    ref_model, path = _reference_and_file("tiny", "sam-tiny", tmp_path, 3)
    ours = OvsamPredictor(build_ovsam("sam-tiny", checkpoint=path))
    ref = SamPredictor(ref_model)
    image = _images()[0]
    ours.set_image(image)
    ref.set_image(image)
    boxes = np.array([[10, 10, 200, 200], [300, 100, 600, 400], [0, 0, 640, 480]], dtype=float)
    got = ours.predict(box=boxes)
    for i, b in enumerate(boxes):
        _, ref_iou, ref_low = ref.predict(box=b, multimask_output=False)
        assert np.abs(got.low_res_logits[i] - ref_low).max() <= 1e-4
        np.testing.assert_allclose(got.iou_scores[i], ref_iou[0], atol=1e-5)
    # torch twin with input-frame prompts
    tb = ref.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), image.shape[:2])
    masks_t, iou_t, low_t = ref.predict_torch(None, None, boxes=tb, multimask_output=True)
    got_t = ours.predict_torch(boxes=tb, multimask_output=True)
    torch.testing.assert_close(got_t.low_res_logits, low_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_t.iou_scores, iou_t, atol=1e-5, rtol=0)
