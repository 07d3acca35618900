"""Vocabulary: equal to open_clip's own text encoding; built-ins; save/load; chunked scoring."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovsam import Vocabulary
from ovsam.templates import VILD_TEMPLATES
from ovsam.vocabulary import split_label


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, image_size=64),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        quick_gelu=True,
    ).eval()
    return model, open_clip.get_tokenizer("RN50x16-quickgelu")


def _reference(model, tokenizer, synonyms):
    """Independent: encode every template x synonym, normalise, average, renormalise, pad with synonym 0."""
    vecs = []
    with torch.no_grad():
        for syn in synonyms:
            per = []
            for s in syn:
                e = model.encode_text(tokenizer([t.format(s) for t in VILD_TEMPLATES]))
                e = F.normalize(e, dim=-1).mean(0)
                per.append(F.normalize(e, dim=0))
            vecs.append(per)
    p = max(len(v) for v in vecs)
    return torch.stack([torch.stack(v + [v[0]] * (p - len(v))) for v in vecs])


def test_from_names_equals_open_clip_encoding(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    names = ["couch,sofa,sofas", "cat", "traffic light,stop light", "dog"]
    vocab = Vocabulary.from_names(names, model, tokenizer=tok, clip_model="tiny", progress=False, batch_size=3)
    ref = _reference(model, tok, [n.split(",") for n in names])
    assert vocab.embeddings.shape == (4, 3, 32)
    torch.testing.assert_close(vocab.embeddings, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vocab.embeddings.norm(dim=-1), torch.ones(4, 3), atol=1e-5, rtol=0)
    assert torch.equal(vocab.embeddings[1, 1], vocab.embeddings[1, 0])  # padding repeats the first synonym
    assert vocab.names == ["couch", "cat", "traffic light", "dog"]
    assert vocab.split is None and vocab.indicator.tolist() == [2, 2, 2, 2]


def test_ovsam_model_text_tower(tiny_model):
    vocab = Vocabulary.from_names(["red square", "blue circle"], tiny_model, progress=False)
    ref = _reference(tiny_model.text.clip, tiny_model.tokenizer, [["red square"], ["blue circle"]])
    torch.testing.assert_close(vocab.embeddings, ref, atol=1e-6, rtol=1e-5)
    assert vocab.clip_model == tiny_model.clip_model_name


def test_scoring_is_max_over_synonyms():
    emb = torch.zeros(2, 2, 3)
    emb[0, 0] = torch.tensor([1.0, 0, 0])
    emb[0, 1] = torch.tensor([0, 1.0, 0])
    emb[1, :] = torch.tensor([0, 0, 1.0])
    vocab = Vocabulary(["a", "b"], [["a0", "a1"], ["b"]], emb, clip_model="x")
    logits = vocab.logits(torch.tensor([[0.0, 2.0, 0.0]]))
    assert logits[0].tolist() == pytest.approx([100.0, 0.0])


def test_split_label_published_rule():
    assert split_label("tape_(sticky_cloth_or_paper)") == ["tape (sticky cloth", "paper)"]
    assert split_label("Aerosol_can") == ["aerosol can"]
    assert split_label("a/b_c") == ["a", "b c"]


def test_builtin_coco():
    names, synonyms, split = Vocabulary.class_list("coco")
    assert len(names) == 80 and sum(len(s) for s in synonyms) == 173
    assert max(len(s) for s in synonyms) == 17 and synonyms[0][0] == "person"
    assert (split == 1).sum() == 48 and (split == 2).sum() == 17 and (split == 0).sum() == 15
    novel = {names[i] for i in np.flatnonzero(split == 2)}
    assert novel == {"bus", "dog", "cow", "elephant", "umbrella", "tie", "skateboard", "cup", "knife", "cake",
                     "couch", "keyboard", "sink", "scissors", "airplane", "cat", "snowboard"}
    excluded = {names[i] for i in np.flatnonzero(split == 0)}
    assert {"traffic light", "hair drier", "teddy bear", "dining table"} <= excluded


def test_builtin_lvis():
    names, synonyms, split = Vocabulary.class_list("lvis")
    assert len(names) == 1203 and max(len(s) for s in synonyms) == 2
    assert (split == 1).sum() == 866 and (split == 2).sum() == 337
    assert synonyms[0] == ["aerosol can"]


def test_builtin_imagenet21k_loads_and_scores_top_k():
    names, synonyms, split = Vocabulary.class_list("imagenet21k")
    assert len(names) == 21841 and split is None
    assert len(set(names)) == len(names)
    p = max(len(s) for s in synonyms)
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(len(names), 2, 16, generator=g), dim=-1)
    vocab = Vocabulary(names, [s[:2] for s in synonyms], emb, clip_model="x")
    regions = torch.randn(5, 16, generator=g)
    scores, idx = vocab.topk(regions, k=7, chunk_size=3000)
    full = vocab.logits(regions, chunk_size=50_000)
    ref_s, ref_i = full.topk(7, dim=1)
    torch.testing.assert_close(scores, ref_s)
    assert torch.equal(idx, ref_i)
    assert p >= 2


def test_chunked_logits_equal_unchunked():
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(50, 3, 8, generator=g), dim=-1)
    vocab = Vocabulary([f"c{i}" for i in range(50)], [["x"]] * 50, emb)
    f = torch.randn(4, 8, generator=g)
    torch.testing.assert_close(vocab.logits(f, chunk_size=7), vocab.logits(f, chunk_size=1000))


def test_save_load_round_trip(tmp_path, clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    vocab = Vocabulary.from_names(["a,b", "c"], model, tokenizer=tok, clip_model="tiny", split=["base", "novel"],
                                  progress=False)
    path = vocab.save(tmp_path / "v.safetensors")
    back = Vocabulary.load(path)
    assert back.names == vocab.names and back.synonyms == vocab.synonyms
    assert back.split.tolist() == [1, 2] and back.content_hash == vocab.content_hash
    assert torch.equal(back.embeddings, vocab.embeddings) and back.clip_model == "tiny"
    assert back.templates == vocab.templates
    assert Vocabulary.resolve(str(path), model=None).content_hash == vocab.content_hash


def test_tampered_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    vocab = Vocabulary(["a", "b"], [["a"], ["b"]], F.normalize(torch.randn(2, 1, 4), dim=-1), clip_model="x")
    path = vocab.save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["embeddings"] = tensors["embeddings"] * 2
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="hash mismatch"):
        Vocabulary.load(path)


def test_hash_changes_with_content():
    emb = F.normalize(torch.randn(2, 1, 4), dim=-1)
    a = Vocabulary(["a", "b"], [["a"], ["b"]], emb)
    b = Vocabulary(["a", "b"], [["a"], ["b"]], emb, split=[1, 2])
    c = Vocabulary(["a", "c"], [["a"], ["b"]], emb)
    assert len({a.content_hash, b.content_hash, c.content_hash}) == 3


def test_class_file(tmp_path, clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncouch, sofa | base\n\ncat | novel\n")
    vocab = Vocabulary.resolve(path, model, tokenizer=tok, clip_model="tiny", progress=False)
    assert vocab.names == ["couch", "cat"] and vocab.synonyms[0] == ["couch", "sofa"]
    assert vocab.split.tolist() == [1, 2]
    bad = tmp_path / "bad.txt"
    bad.write_text("cat | weird\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: unknown split tag"):
        Vocabulary.read_class_file(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(names=[], synonyms=[], embeddings=torch.zeros(0, 1, 4)), "at least one class"),
        (dict(names=["a", "a"], synonyms=[["a"], ["b"]], embeddings=torch.zeros(2, 1, 4)), "duplicate class name 'a'"),
        (dict(names=["a", "b"], synonyms=[["a"], []], embeddings=torch.zeros(2, 1, 4)), r"class 1 \('b'\) has no syn"),
        (dict(names=["a"], synonyms=[["a"]], embeddings=torch.zeros(1, 1, 4), split=[1, 2]), "one entry per class"),
        (dict(names=["a"], synonyms=[["a"]], embeddings=torch.zeros(1, 1, 4), split=[3]), "class 0 has 3"),
        (dict(names=["a"], synonyms=[["a"]], embeddings=torch.zeros(2, 1, 4)), "embeddings must have shape"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Vocabulary(**kwargs)


def test_unknown_builtin_lists_choices():
    with pytest.raises(ValueError, match="available: coco, lvis, imagenet21k"):
        Vocabulary.class_list("objects365")
