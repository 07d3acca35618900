"""Checkpoint conversion (released OV-SAM files), the project format, SAM checkpoints and safe loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from ovsam import build_ovsam
from ovsam.checkpoint import (convert_official, export_released, is_project_checkpoint, read_config,
                              read_state_dict, save_checkpoint)

from .released_fixtures import write_released_files
from .utils import randomize_

PARTS = {"sam": ("prompt_encoder", "prompt_encoder"), "sam2clip": ("neck_student", "neck")}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return write_released_files(root)


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ovsam_coco.safetensors"
    model = convert_official(clip=released["clip"], sam=released["sam"], sam2clip=released["sam2clip"],
                             clip2sam=released["clip2sam"], output=out, vocabulary="coco")
    return model, out


def test_converted_tensors_equal_the_files(released, converted):
    model, _ = converted
    state = model.state_dict()
    files = {name: torch.load(path, weights_only=True) for name, path in released.items()}
    checked = 0
    for key, value in files["sam"].items():
        if key.startswith("prompt_encoder."):
            assert torch.equal(state[key], value), key
            checked += 1
    for key, value in files["sam2clip"].items():
        assert torch.equal(state["neck." + key[len("neck_student."):]], value), key
        checked += 1
    for key, value in files["clip2sam"].items():
        assert torch.equal(state[key], value), key
        checked += 1
    for key, value in files["clip"].items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        ours = state["backbone." + key] if key.startswith("visual.") else state["text.clip." + key]
        assert ours.dtype == torch.float32 or not ours.is_floating_point()
        assert torch.equal(ours, value.float() if value.is_floating_point() else value), key
        checked += 1
    assert len(files["sam2clip"]) == 86 and len(files["clip2sam"]) == 16 + 103
    non_buffer = [k for k in state if not k.endswith("num_batches_tracked")]
    assert checked >= len(non_buffer)


def test_project_file_rebuilds_the_model(converted):
    model, out = converted
    assert is_project_checkpoint(out)
    config = read_config(out)
    assert config.name == "ovsam-rn50x16" and config.recognition.roi_size == 12
    rebuilt = build_ovsam(checkpoint=out)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


@pytest.mark.parametrize("role, mutate, match", [
    ("sam2clip", lambda s: s.pop("neck_student.blocks.4.attn.rel_pos_h"), r"(?s)sam2clip.pth \['neck_student.\*'\].*1 missing keys: blocks.4.attn.rel_pos_h"),
    ("clip2sam", lambda s: s.__setitem__("mask_decoder.mask_decoder.iou_token.weight", torch.zeros(1, 256)),
     r"(?s)clip2sam.pth \['mask_decoder.\*'\].*1 unexpected keys: mask_decoder.iou_token.weight"),
    ("clip2sam", lambda s: s.__setitem__("fpn_neck.lateral_convs.0.conv.weight", torch.zeros(256, 96, 1, 1)),
     r"lateral_convs.0.conv.weight: file \(256, 96, 1, 1\) vs model \(256, 384, 1, 1\)"),
    ("sam", lambda s: [s.pop(k) for k in list(s) if k.startswith("prompt_encoder.")],
     r"sam.pth: no 'prompt_encoder.\*' keys"),
])
def test_strict_conversion_names_the_problem(released, tmp_path, role, mutate, match):
    state = torch.load(released[role], weights_only=True)
    mutate(state)
    bad = tmp_path / f"{role}.pth"
    torch.save(state, bad)
    files = {k: str(v) for k, v in released.items()}
    files[role] = str(bad)
    with pytest.raises(ValueError, match=match):
        convert_official(**files)


def test_tiny_round_trips(tmp_path):
    torch.manual_seed(0)
    model = randomize_(build_ovsam("ovsam-tiny"), seed=3)
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    back = build_ovsam(checkpoint=path)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the released layout: export and convert back with a SAM file holding the prompt encoder
    paths = export_released(model, tmp_path / "released", stem="_tiny")
    sam_file = tmp_path / "sam_tiny.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("prompt_encoder.")}, sam_file)
    clip_file = tmp_path / "clip_tiny.pth"
    state = model.state_dict()
    clip_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.visual.")}
    clip_state.update({k[len("text.clip."):]: v for k, v in state.items() if k.startswith("text.clip.")})
    torch.save(clip_state, clip_file)
    again = convert_official(clip=clip_file, sam=sam_file, sam2clip=paths["sam2clip"], clip2sam=paths["clip2sam"],
                             model="ovsam-tiny")
    for k, v in state.items():
        assert torch.equal(again.state_dict()[k], v), k


def test_wrapped_state_dict(tmp_path):
    model = build_ovsam("sam-tiny")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"epoch": 3}}, path)
    assert set(read_state_dict(path)) == set(model.state_dict())


def test_meta_sam_checkpoint_loads_and_wrong_model_is_named(tmp_path):
    ref = randomize_(build_ovsam("sam-tiny"), seed=4)
    path = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), path)
    model = build_ovsam("sam-tiny", checkpoint=path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"is a SAM checkpoint"):
        build_ovsam("ovsam-tiny", checkpoint=path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="state dict of tensors"):
        read_state_dict(tmp_path / "mixed.pth")


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_ovsam("sam-tiny", checkpoint=tmp_path / "nope.pth")
