"""Checkpoint conversion (released OV-SAM files), the project format, SAM checkpoints and safe loading.

One full-size conversion per module (``converted``): the released-layout files are written once, assembled into
``ovsam-rn50x16`` and saved; the other full-size tests reuse those files. Everything else runs on the tiny configs.
"""

from __future__ import annotations

import logging
import os
import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from ovsam.build import build_model, build_ovsam
from ovsam.checkpoint import (export_released, is_project_checkpoint, load_sam_checkpoint, read_clip_state_dict,
                              read_config, read_state_dict, save_checkpoint)
from ovsam.config import load_config
from ovsam.convert import convert_official

from . import released_fixtures as rf
from .utils import randomize_

OPENAI_INTS = ("input_resolution", "context_length", "vocab_size")


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k


# --- the released layout ------------------------------------------------------------------------------------------

def test_fixture_layout_is_the_published_one():
    """The synthesized files have the spec's key counts and sizes, and the reference libraries accept them."""
    from open_clip.model import build_model_from_openai_state_dict
    from segment_anything import sam_model_registry

    def numel(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(torch.Size(s).numel() for s in shapes.values())

    assert (len(rf.sam2clip_shapes()), numel(rf.sam2clip_shapes())) == (86, 134_087_648)
    assert (len(rf.fpn_shapes()), numel(rf.fpn_shapes())) == (16, 3_835_904)
    assert (len(rf.head_shapes()), numel(rf.head_shapes())) == (103, 4_031_104)
    assert (len(rf.prompt_encoder_shapes()), numel(rf.prompt_encoder_shapes())) == (17, 6_476)
    clip = rf.openai_rn_clip_shapes()
    visual = {k: s for k, (s, _) in clip.items() if k.startswith("visual.")}
    assert (len(visual), numel(visual), len(clip)) == (771, 167_522_959, 924)

    with torch.device("meta"):
        sam_h = sam_model_registry["vit_h"]().state_dict()
        openai = build_model_from_openai_state_dict({k: torch.empty(s, dtype=d) for k, (s, d) in clip.items()})
    for key, shape in rf.sam_vit_h_shapes().items():
        assert tuple(sam_h[key].shape) == shape, key
    assert {k for k in sam_h if k.startswith("prompt_encoder.")} == set(rf.prompt_encoder_shapes())
    head_from_sam = rf.sam_decoder_shapes("mask_decoder", num_mask_tokens=4, iou_head=True)
    assert head_from_sam == {k: tuple(v.shape) for k, v in sam_h.items() if k.startswith("mask_decoder.")}
    assert (openai.visual.image_size, openai.text_projection.shape[1]) == (384, 768)


@pytest.mark.parametrize("size", ["b", "l", "h"])
def test_sam_configs_have_metas_key_layout(size):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[f"vit_{size}"]().state_dict()
        ours = build_model(load_config(f"sam-vit-{size}")).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


# --- full size: ovsam-rn50x16 from released-layout files ----------------------------------------------------------

@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    return rf.write_released_files(tmp_path_factory.mktemp("released"), seed=0)


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ovsam_coco.safetensors"
    model = convert_official(clip=released["clip"], sam=released["sam"], sam2clip=released["sam2clip"],
                             clip2sam=released["clip2sam"], output=out, vocabulary="coco")
    return model, out


def test_converted_tensors_equal_the_files(released, converted):
    model, _ = converted
    state = model.state_dict()
    files = {role: torch.load(path, weights_only=True) for role, path in released.items()}
    expected: dict[str, torch.Tensor] = {}
    expected.update({k: v for k, v in files["sam"].items() if k.startswith("prompt_encoder.")})
    expected.update({"neck." + k[len("neck_student."):]: v for k, v in files["sam2clip"].items()})
    expected.update(files["clip2sam"])
    for k, v in files["clip"].items():
        if k not in OPENAI_INTS:
            expected[("backbone." if k.startswith("visual.") else "text.clip.") + k] = v
    assert len(expected) == len(state) == 17 + 86 + 16 + 103 + 771 + 150
    assert set(expected) == set(state)
    for key, value in expected.items():
        ours = state[key]
        if value.is_floating_point():
            assert ours.dtype == torch.float32, key
            value = value.float()
        assert ours.dtype == value.dtype and torch.equal(ours, value), key
    assert model.config.recognition.roi_size == 12 and not model.training


def test_project_file_rebuilds_the_model(converted):
    model, out = converted
    assert is_project_checkpoint(out)
    assert read_config(out) == model.config
    rebuilt = build_ovsam(checkpoint=out)
    assert rebuilt.config == model.config
    _assert_same_state(rebuilt.state_dict(), model.state_dict())


def _drop(key: str):
    return lambda s: s.pop(key)


def _put(key: str, shape: tuple[int, ...]):
    return lambda s: s.__setitem__(key, torch.zeros(shape))


@pytest.mark.parametrize("role, mutate, match", [
    ("sam2clip", _drop("neck_student.blocks.4.attn.rel_pos_h"),
     r"sam2clip_vith_rn50x16.pth \['neck_student.\*'\].*\n  1 missing keys: blocks.4.attn.rel_pos_h$"),
    ("sam2clip", _put("neck_student.pos_embed", (1, 32, 32, 1280)),
     (r"sam2clip_vith_rn50x16.pth \['neck_student.\*'\].*\n  1 shape mismatches: "
      r"pos_embed: file \(1, 32, 32, 1280\) vs model \(1, 64, 64, 1280\)$")),
    ("clip2sam", _put("mask_decoder.mask_decoder.iou_token.weight", (1, 256)),
     r"clip2sam_coco_rn50x16.pth \['mask_decoder.\*'\].*\n  1 unexpected keys: mask_decoder.iou_token.weight$"),
    ("clip2sam", _put("fpn_neck.lateral_convs.0.conv.weight", (256, 96, 1, 1)),
     (r"clip2sam_coco_rn50x16.pth \['fpn_neck.\*'\].*\n  1 shape mismatches: "
      r"lateral_convs.0.conv.weight: file \(256, 96, 1, 1\) vs model \(256, 384, 1, 1\)$")),
    ("clip2sam", _drop("mask_decoder.roi_conv.0.conv.weight"),
     r"clip2sam_coco_rn50x16.pth \['mask_decoder.\*'\].*\n  1 missing keys: roi_conv.0.conv.weight$"),
    ("sam", lambda s: [s.pop(k) for k in list(s) if k.startswith("prompt_encoder.")],
     r"sam_vit_h_4b8939.pth: no 'prompt_encoder.\*' keys \(found image_encoder.\* \(9\), mask_decoder.\* \(4\)\)"),
    ("sam", _put("prompt_encoder.point_embeddings.4.weight", (1, 256)),
     r"sam_vit_h_4b8939.pth \['prompt_encoder.\*'\].*\n  1 unexpected keys: point_embeddings.4.weight$"),
])
def test_strict_conversion_names_the_key_and_file(released, tmp_path, role, mutate, match):
    state = torch.load(released[role], weights_only=True)
    mutate(state)
    bad = tmp_path / released[role].name
    torch.save(state, bad)
    files = {k: str(v) for k, v in released.items()}
    files[role] = str(bad)
    with pytest.raises(ValueError, match=r"(?m)" + match):
        convert_official(**files)


def test_every_problem_is_reported_at_once(released, tmp_path):
    files = {k: str(v) for k, v in released.items()}
    clip2sam = torch.load(released["clip2sam"], weights_only=True)
    clip2sam.pop("fpn_neck.fpn_convs.3.conv.bias")
    clip2sam["mask_decoder.label_token.weight"] = torch.zeros(2, 256)
    files["clip2sam"] = str(tmp_path / "clip2sam.pth")
    torch.save(clip2sam, files["clip2sam"])
    files["sam2clip"] = files["sam"]  # the wrong file for the neck
    with pytest.raises(ValueError) as info:
        convert_official(**files)
    msg = str(info.value)
    assert "fpn_convs.3.conv.bias" in msg and "label_token.weight: file (2, 256) vs model (1, 256)" in msg
    assert "sam_vit_h_4b8939.pth: no 'neck_student.*' keys" in msg and "is this the sam2clip file?" in msg


def test_a_pickled_object_is_never_run(released, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "sam2clip_vith_rn50x16.pth"
    with open(evil, "wb") as f:
        pickle.dump({"neck_student.pos_embed": _Evil(str(marker))}, f)
    with pytest.raises(ValueError, match=r"sam2clip_vith_rn50x16.pth: cannot be read as a weights-only checkpoint"):
        convert_official(clip=released["clip"], sam=released["sam"], sam2clip=evil, clip2sam=released["clip2sam"])
    assert not marker.exists()


# --- tiny: the same paths on ovsam-tiny ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return randomize_(build_ovsam("ovsam-tiny"), seed=3)


def _clip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The CLIP half of an OV-SAM model in open_clip's (= OpenAI's) layout."""
    state = model.state_dict()
    out = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.visual.")}
    out.update({k[len("text.clip."):]: v for k, v in state.items() if k.startswith("text.clip.")})
    return out


def _tiny_files(model: nn.Module, root: Path, wrap: bool = False) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = export_released(model, root, stem="_tiny")
    state = model.state_dict()
    paths["sam"] = root / "sam_tiny.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("prompt_encoder.")}
               | {"image_encoder.pos_embed": torch.zeros(1, 16, 16, 32)}, paths["sam"])
    paths["clip"] = root / "clip_tiny.pth"
    torch.save(_clip_state(model), paths["clip"])
    if wrap:
        for role, path in paths.items():
            inner = torch.load(path, weights_only=True)
            if role == "clip":  # an open_clip training checkpoint: DDP prefix and a state_dict wrapper
                inner = {"module." + k: v for k, v in inner.items()}
            torch.save({"state_dict": inner, "epoch": 3}, path)
    return paths


def test_tiny_save_and_build_round_trip(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors", vocabulary={"name": "coco"})
    back = build_ovsam(checkpoint=path)
    assert back.config == tiny.config
    _assert_same_state(back.state_dict(), tiny.state_dict())


def test_the_files_config_wins_over_the_model_name(tiny, tmp_path):
    import dataclasses

    rec = dataclasses.replace(tiny.config.recognition, roi_box="largest_component", ensemble=False)
    trained = build_ovsam(dataclasses.replace(tiny.config, recognition=rec))
    trained.load_state_dict(tiny.state_dict())
    path = save_checkpoint(trained, tmp_path / "trained.safetensors")
    assert build_ovsam(checkpoint=path).config.recognition == rec
    assert build_ovsam("ovsam-tiny", checkpoint=path).config.recognition == rec
    # an explicit config of the same model overrides the file's
    assert build_ovsam(tiny.config, checkpoint=path).config.recognition == tiny.config.recognition


def test_export_released_layout(tiny, tmp_path):
    paths = export_released(tiny, tmp_path)
    assert {p.name for p in paths.values()} == {"sam2clip.pth", "clip2sam.pth"}
    neck = torch.load(paths["sam2clip"], weights_only=True)
    head = torch.load(paths["clip2sam"], weights_only=True)
    state = tiny.state_dict()
    assert {k.split(".", 1)[0] for k in neck} == {"neck_student"}
    assert {k.split(".", 1)[0] for k in head} == {"fpn_neck", "mask_decoder"}
    for k, v in neck.items():
        assert torch.equal(v, state["neck." + k[len("neck_student."):]]), k
    for k, v in head.items():
        assert torch.equal(v, state[k]), k
    assert len(neck) == sum(k.startswith("neck.") for k in state)
    assert len(head) == sum(k.startswith(("fpn_neck.", "mask_decoder.")) for k in state)
    with pytest.raises(TypeError, match="needs an OV-SAM model"):
        export_released(build_ovsam("sam-tiny"), tmp_path / "sam")


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "wrapped"])
def test_tiny_export_and_convert_back(tiny, tmp_path, caplog, wrap):
    paths = _tiny_files(tiny, tmp_path / "files", wrap=wrap)
    caplog.set_level(logging.INFO, logger="ovsam.checkpoint")
    caplog.set_level(logging.INFO, logger="ovsam.convert")
    out = tmp_path / "out" / "tiny.safetensors"
    again = convert_official(clip=paths["clip"], sam=paths["sam"], sam2clip=paths["sam2clip"],
                             clip2sam=paths["clip2sam"], model="ovsam-tiny", output=out)
    _assert_same_state(again.state_dict(), tiny.state_dict())
    _assert_same_state(build_ovsam(checkpoint=out).state_dict(), tiny.state_dict())
    log = caplog.text
    assert "sam_tiny.pth (sam): 18 tensors under image_encoder.* (1), prompt_encoder.* (17)" in log
    assert "sam2clip_tiny.pth (sam2clip):" in log and "neck_student.* (" in log
    assert "clip2sam_tiny.pth (clip2sam):" in log and "fpn_neck.* (16), mask_decoder.* (" in log


def test_roi_size_is_saved_in_the_config(tiny, tmp_path, caplog):
    paths = _tiny_files(tiny, tmp_path)
    files = {role: paths[role] for role in ("clip", "sam", "sam2clip", "clip2sam")}
    lvis = convert_official(**files, model="ovsam-tiny", vocabulary="lvis", roi_size=None)
    assert lvis.config.recognition.roi_size == 7  # the published LVIS test setting
    import shutil

    named = tmp_path / "clip2sam_lvis_tiny.pth"
    shutil.copy(paths["clip2sam"], named)
    unnamed = convert_official(**{**files, "clip2sam": named}, model="ovsam-tiny")
    assert unnamed.config.recognition.roi_size == load_config("ovsam-tiny").recognition.roi_size
    assert "the published LVIS test configuration uses 7x7 (pass roi_size=7)" in caplog.text
    out = tmp_path / "roi5.safetensors"
    model = convert_official(**files, model="ovsam-tiny", roi_size=5, output=out)
    assert model.config.recognition.roi_size == 5 and read_config(out).recognition.roi_size == 5
    assert build_ovsam(checkpoint=out).config.recognition.roi_size == 5
    with pytest.raises(ValueError, match="roi_size must be a positive integer, got 0"):
        convert_official(**files, model="ovsam-tiny", roi_size=0)
    with pytest.raises(ValueError, match="convert_official builds OV-SAM models; 'sam-tiny' is a sam model"):
        convert_official(**files, model="sam-tiny")


def test_prompt_encoder_copy_in_clip2sam_is_checked(tiny, tmp_path, caplog):
    paths = _tiny_files(tiny, tmp_path)
    clip2sam = torch.load(paths["clip2sam"], weights_only=True)
    pe = {"pe." + k[len("prompt_encoder."):]: v for k, v in tiny.state_dict().items()
          if k.startswith("prompt_encoder.")}
    files = {role: paths[role] for role in ("clip", "sam", "sam2clip")}
    caplog.set_level(logging.INFO, logger="ovsam.checkpoint")
    caplog.set_level(logging.INFO, logger="ovsam.convert")

    torch.save(clip2sam | pe, paths["clip2sam"])
    model = convert_official(**files, clip2sam=paths["clip2sam"], model="ovsam-tiny")
    assert "its 'pe.*' copy equals the SAM prompt encoder" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    caplog.clear()
    pe["pe.no_mask_embed.weight"] = pe["pe.no_mask_embed.weight"] + 1
    torch.save(clip2sam | pe, paths["clip2sam"])
    model = convert_official(**files, clip2sam=paths["clip2sam"], model="ovsam-tiny")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "differs from" in warnings[0] and "no_mask_embed.weight" in warnings[0]
    assert torch.equal(model.prompt_encoder.no_mask_embed.weight, tiny.prompt_encoder.no_mask_embed.weight)


def test_clip_problems_are_named(tiny, tmp_path):
    paths = _tiny_files(tiny, tmp_path)
    clip = torch.load(paths["clip"], weights_only=True)
    clip.pop("visual.attnpool.c_proj.bias")
    clip.pop("ln_final.weight")
    torch.save(clip, paths["clip"])
    files = {role: paths[role] for role in ("clip", "sam", "sam2clip", "clip2sam")}
    with pytest.raises(ValueError) as info:
        convert_official(**files, model="ovsam-tiny")
    msg = str(info.value)
    assert "clip_tiny.pth ['visual.*']" in msg and "attnpool.c_proj.bias" in msg
    assert "clip_tiny.pth [text tower]" in msg and "ln_final.weight" in msg
    with pytest.raises(ValueError, match=r"CLIP file not found: .*nope\.pt"):
        convert_official(**(files | {"clip": tmp_path / "nope.pt"}), model="ovsam-tiny")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_clip_from_an_openai_torchscript_archive(tiny, tmp_path):
    """OpenAI ships CLIP as a TorchScript archive holding the weights plus the three integer entries."""
    from ovsam.modeling.clip_backbone import create_clip

    clip = create_clip(tiny.config.clip)
    clip.load_state_dict(_clip_state(tiny))
    for k, v in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(clip, k):  # open_clip keeps these as plain ints; OpenAI's archive stores them as tensors
            delattr(clip, k)
        clip.register_buffer(k, torch.tensor(v))
    traced = torch.jit.trace_module(clip.eval(), {"encode_image": torch.zeros(1, 3, 224, 224)}, check_trace=False)
    archive = tmp_path / "RN_tiny.pt"
    traced.save(str(archive))
    with pytest.raises(ValueError, match="is a TorchScript archive, not a weights-only checkpoint"):
        read_state_dict(archive)
    paths = _tiny_files(tiny, tmp_path / "files")
    model = convert_official(clip=archive, sam=paths["sam"], sam2clip=paths["sam2clip"],
                             clip2sam=paths["clip2sam"], model="ovsam-tiny")
    _assert_same_state(model.state_dict(), tiny.state_dict())


def test_clip_tags_resolve_through_open_clip(tmp_path, monkeypatch):
    import open_clip.pretrained

    fake = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.ones(2, 3, 3, 3, dtype=torch.float16),
               "logit_scale": torch.tensor(4.6)}, str(fake))
    seen = {}

    def download(cfg, **kwargs):
        seen.update(cfg)
        return str(fake)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", download)
    rn = load_config("ovsam-rn50x16")
    state = read_clip_state_dict("openai", rn)
    assert "RN50x16.pt" in seen["url"] and seen["quick_gelu"] is True
    assert state["visual.conv1.weight"].dtype == torch.float32 and torch.equal(state["logit_scale"], torch.tensor(4.6))
    with pytest.raises(ValueError, match=r"nor an open_clip pretrained tag of 'RN50x16-quickgelu'; available tags: "
                                         r"openai"):
        read_clip_state_dict("laion400m", rn)
    with pytest.raises(ValueError, match="defined inline"):
        read_clip_state_dict("openai", load_config("ovsam-tiny"))


# --- SAM checkpoints ----------------------------------------------------------------------------------------------

def _segment_anything_sam(name: str, **overrides) -> nn.Module:
    """A ``segment_anything`` ``Sam`` built the way ``sam_model_registry`` builds it, at a project config's sizes."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = load_config(name)
    depth = overrides.get("encoder_depth", cfg.encoder_depth)
    grid = cfg.image_size // cfg.patch_size
    d = cfg.decoder
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=cfg.encoder_embed_dim, img_size=cfg.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes, window_size=cfg.window_size, out_chans=d.embed_dim),
        prompt_encoder=PromptEncoder(embed_dim=d.embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=d.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=d.embed_dim, iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim,
            transformer=TwoWayTransformer(depth=d.depth, embedding_dim=d.embed_dim, mlp_dim=d.mlp_dim,
                                          num_heads=d.num_heads)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def test_meta_sam_checkpoint_loads(tmp_path):
    ref = randomize_(_segment_anything_sam("sam-tiny"), seed=4)
    path = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), path)
    model = build_ovsam("sam-tiny", checkpoint=path)
    _assert_same_state(model.state_dict(), ref.state_dict())
    fresh = build_model(load_config("sam-tiny"))
    load_sam_checkpoint(fresh, path)
    _assert_same_state(fresh.state_dict(), ref.state_dict())


def test_wrong_sam_files_are_named(tmp_path, tiny):
    deeper = tmp_path / "sam_deeper.pth"
    torch.save(_segment_anything_sam("sam-tiny", encoder_depth=3).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"image encoder has width 32 \(image_encoder.patch_embed.proj.weight "
                                         r"\(32, 3, 16, 16\)\) and 3 blocks .* 'sam-tiny' expects width 32 and 2"):
        build_ovsam("sam-tiny", checkpoint=deeper)
    sam = tmp_path / "sam.pth"
    state = randomize_(_segment_anything_sam("sam-tiny"), seed=5).state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra"] = torch.zeros(1)
    torch.save(state, sam)
    with pytest.raises(ValueError, match=r"(?s)1 missing keys: mask_decoder.iou_token.weight.*"
                                         r"1 unexpected keys: mask_decoder.extra"):
        build_ovsam("sam-tiny", checkpoint=sam)
    with pytest.raises(ValueError, match="is a SAM checkpoint"):
        build_ovsam("ovsam-tiny", checkpoint=deeper)
    part = export_released(tiny, tmp_path / "released")["sam2clip"]
    with pytest.raises(ValueError, match=r"is not a SAM checkpoint: found neck_student.\* \(\d+\); it is a released"):
        build_ovsam("sam-tiny", checkpoint=part)
    with pytest.raises(ValueError, match="is a released OV-SAM part"):
        build_ovsam("ovsam-tiny", checkpoint=part)
    with pytest.raises(TypeError, match="loads into a SAM model"):
        load_sam_checkpoint(tiny, sam)


@pytest.mark.slow
def test_meta_sam_vit_b_checkpoint_loads(tmp_path):
    from segment_anything import sam_model_registry

    ref = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(ref.state_dict(), path)
    model = build_ovsam("sam-vit-b", checkpoint=path)
    _assert_same_state(model.state_dict(), ref.state_dict())


# --- safe loading -------------------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this would create a directory; a weights-only load must refuse it first."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_arbitrary_pickles_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil(str(marker))}, f)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)
    torch.save({"weight": _Evil(str(marker))}, tmp_path / "evil_torch.pth")
    with pytest.raises(ValueError, match="weights-only"):
        build_ovsam("sam-tiny", checkpoint=tmp_path / "evil_torch.pth")
    assert not marker.exists()
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"state dict of tensors, got dict with values of types \['Tensor', 'list'\]"):
        read_state_dict(tmp_path / "mixed.pth")


def test_wrapped_state_dict(tmp_path):
    state = build_ovsam("sam-tiny").state_dict()
    for wrapper in ("state_dict", "model"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: state, "meta": {"epoch": 3}}, path)
        _assert_same_state(read_state_dict(path), state)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_ovsam("sam-tiny", checkpoint=tmp_path / "nope.pth")
