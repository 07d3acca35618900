"""Vocabulary: equal to open_clip's own text encoding; built-ins; class files; save/load; chunked scoring."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovsam.templates import VILD_TEMPLATES
from ovsam.vocabulary import Vocabulary, split_label

COCO_BASE = {
    "person", "bicycle", "car", "motorcycle", "truck", "boat", "bench", "bird", "horse", "sheep", "zebra", "giraffe",
    "backpack", "handbag", "skis", "kite", "surfboard", "bottle", "spoon", "bowl", "banana", "apple", "orange",
    "broccoli", "carrot", "pizza", "donut", "chair", "bed", "tv", "laptop", "remote", "microwave", "oven",
    "refrigerator", "book", "clock", "vase", "toothbrush", "train", "bear", "suitcase", "frisbee", "fork", "sandwich",
    "toilet", "mouse", "toaster",
}
COCO_NOVEL = {
    "bus", "dog", "cow", "elephant", "umbrella", "tie", "skateboard", "cup", "knife", "cake", "couch", "keyboard",
    "sink", "scissors", "airplane", "cat", "snowboard",
}
COCO_EXCLUDED = {
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "potted plant", "dining table", "cell phone", "teddy bear", "hair drier",
}


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


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_templates_are_the_14_vild_templates():
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    assert VILD_TEMPLATES[:5] == ("a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
                                  "There is the {} in the scene", "a photo of a {} in the scene")
    assert "This is a photo of a medium {}." in VILD_TEMPLATES
    assert VILD_TEMPLATES[-1] == "There is a large {} in the scene."


def test_from_names_equals_open_clip_encoding(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    names = ["couch,sofa,sofas", "cat", "traffic light, stop light", ["dog", "puppy"]]
    vocab = Vocabulary.from_names(names, model, tokenizer=tok, clip_model="tiny", progress=False, batch_size=3)
    synonyms = [["couch", "sofa", "sofas"], ["cat"], ["traffic light", "stop light"], ["dog", "puppy"]]
    assert vocab.synonyms == synonyms and vocab.names == ["couch", "cat", "traffic light", "dog"]
    ref = _reference(model, tok, synonyms)
    assert vocab.embeddings.shape == (4, 3, 32) and vocab.embeddings.dtype == torch.float32
    torch.testing.assert_close(vocab.embeddings, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vocab.embeddings.norm(dim=-1), torch.ones(4, 3), atol=1e-5, rtol=0)
    assert torch.equal(vocab.embeddings[1, 1], vocab.embeddings[1, 0])  # padding repeats the first synonym
    assert torch.equal(vocab.embeddings[1, 2], vocab.embeddings[1, 0])
    assert torch.equal(vocab.embeddings[2, 2], vocab.embeddings[2, 0])
    assert not torch.equal(vocab.embeddings[2, 1], vocab.embeddings[2, 0])
    assert vocab.split is None and vocab.indicator.tolist() == [2, 2, 2, 2]
    assert vocab.indicator.dtype == torch.long and vocab.clip_model == "tiny" and vocab.templates == VILD_TEMPLATES
    # the batch size only changes how prompts are grouped, not the result
    again = Vocabulary.from_names(names, model, tokenizer=tok, clip_model="tiny", progress=False, batch_size=256)
    torch.testing.assert_close(again.embeddings, vocab.embeddings, atol=1e-6, rtol=1e-5)


def test_logits_take_the_best_synonym(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    vocab = Vocabulary.from_names(["couch,sofa", "cat"], model, tokenizer=tok, clip_model="tiny", progress=False)
    region = 3.0 * vocab.embeddings[0, 1:2]  # the second synonym of class 0, not normalised
    logits = vocab.logits(region)
    assert logits.shape == (1, 2)
    assert logits[0, 0].item() == pytest.approx(100.0, abs=1e-4)
    mean_score = 100 * (vocab.embeddings[0] @ vocab.embeddings[0, 1]).mean()
    assert logits[0, 0] > mean_score  # max over prototypes, not their mean


def test_model_mode_is_restored(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    model.train()
    model.visual.eval()
    try:
        Vocabulary.from_names(["cat"], model, tokenizer=tok, clip_model="tiny", progress=False)
        assert model.training and model.transformer.training and not model.visual.training
    finally:
        model.eval()


def test_ovsam_model_text_tower(tiny_model):
    vocab = Vocabulary.from_names(["red square", "blue circle"], tiny_model, progress=False)
    ref = _reference(tiny_model.text.clip, tiny_model.tokenizer, [["red square"], ["blue circle"]])
    torch.testing.assert_close(vocab.embeddings, ref, atol=1e-6, rtol=1e-5)
    assert vocab.clip_model == tiny_model.clip_model_name


def test_model_without_tokenizer_is_refused(clip_and_tokenizer):
    model, _ = clip_and_tokenizer
    with pytest.raises(TypeError, match="tokenizer"):
        Vocabulary.from_names(["cat"], model, progress=False)


def test_normalize_ovsam_applies_split_label(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    vocab = Vocabulary.from_names(["tape_(sticky_cloth_or_paper)", "Aerosol_can"], model, tokenizer=tok,
                                  clip_model="tiny", normalize="ovsam", progress=False)
    assert vocab.synonyms == [["tape (sticky cloth", "paper)"], ["aerosol can"]]
    plain = Vocabulary.from_names(["Aerosol_can"], model, tokenizer=tok, clip_model="tiny", progress=False)
    assert plain.synonyms == [["Aerosol_can"]]
    with pytest.raises(ValueError, match="normalize must be one of plain, ovsam"):
        Vocabulary.from_names(["cat"], model, tokenizer=tok, clip_model="tiny", normalize="lower")


def test_scoring_is_max_over_synonyms():
    emb = torch.zeros(2, 2, 3)
    emb[0, 0] = torch.tensor([1.0, 0, 0])
    emb[0, 1] = torch.tensor([0, 1.0, 0])
    emb[1, :] = torch.tensor([0, 0, 1.0])
    vocab = Vocabulary(["a", "b"], [["a0", "a1"], ["b"]], emb, clip_model="x")
    logits = vocab.logits(torch.tensor([[0.0, 2.0, 0.0]]))
    assert logits[0].tolist() == pytest.approx([100.0, 0.0])
    assert vocab.logits(torch.tensor([[0.0, 2.0, 0.0]]), scale=1.0)[0].tolist() == pytest.approx([1.0, 0.0])


def test_split_label_published_rule():
    assert split_label("tape_(sticky_cloth_or_paper)") == ["tape (sticky cloth", "paper)"]
    assert split_label("Aerosol_can") == ["aerosol can"]
    assert split_label("a/b_c") == ["a", "b c"]
    assert split_label("couch,sofa, ,sofas") == ["couch", "sofa", "sofas"]


def test_builtin_names():
    assert Vocabulary.builtin_names() == ["coco", "lvis", "imagenet21k"]


def test_builtin_coco():
    names, synonyms, split = Vocabulary.class_list("coco")
    assert len(names) == 80 and sum(len(s) for s in synonyms) == 173
    assert max(len(s) for s in synonyms) == 17 and len(synonyms[0]) == 17 and synonyms[0][0] == "person"
    assert split.dtype == np.int8
    assert (split == 1).sum() == 48 and (split == 2).sum() == 17 and (split == 0).sum() == 15
    assert {names[i] for i in np.flatnonzero(split == 1)} == COCO_BASE
    assert {names[i] for i in np.flatnonzero(split == 2)} == COCO_NOVEL
    assert {names[i] for i in np.flatnonzero(split == 0)} == COCO_EXCLUDED
    assert synonyms[names.index("couch")][:2] == ["couch", "sofa"]


def test_from_builtin_coco_matches_reference(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    vocab = Vocabulary.from_builtin("coco", model, tokenizer=tok, clip_model="tiny", progress=False)
    assert vocab.embeddings.shape == (80, 17, 32) and len(vocab) == 80
    names, synonyms, split = Vocabulary.class_list("coco")
    assert vocab.names == names and vocab.synonyms == synonyms and np.array_equal(vocab.split, split)
    assert vocab.indicator.tolist() == split.tolist()
    picked = [0, names.index("couch"), names.index("bicycle")]
    ref = _reference(model, tok, [synonyms[i] for i in picked])
    torch.testing.assert_close(vocab.embeddings[picked], ref, atol=1e-6, rtol=1e-5)


def test_builtin_lvis():
    names, synonyms, split = Vocabulary.class_list("lvis")
    assert len(names) == 1203 and len(set(names)) == 1203 and max(len(s) for s in synonyms) == 2
    assert (split == 1).sum() == 866 and (split == 2).sum() == 337 and (split == 0).sum() == 0
    assert names[0] == "aerosol_can" and synonyms[0] == ["aerosol can"]
    tape = names.index("tape_(sticky_cloth_or_paper)")
    assert synonyms[tape] == ["tape (sticky cloth", "paper)"]
    assert [i for i, s in enumerate(synonyms) if len(s) > 1] == [tape]


def test_builtin_imagenet21k_loads_and_scores_top_k():
    names, synonyms, split = Vocabulary.class_list("imagenet21k")
    assert len(names) == 21841 and split is None
    assert len(set(names)) == len(names)
    assert synonyms[names.index("tench")] == ["tench", "Tinca tinca"]
    assert max(len(s) for s in synonyms) > 2
    vocab = Vocabulary(names, [s[:2] for s in synonyms], _unit(len(names), 2, 16), clip_model="x")
    assert vocab.indicator.tolist() == [2] * 21841
    regions = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    scores, idx = vocab.topk(regions, k=7, chunk_size=3000)
    full = vocab.logits(regions, chunk_size=50_000)
    assert full.shape == (5, 21841)
    ref_s, ref_i = full.topk(7, dim=1)
    torch.testing.assert_close(scores, ref_s)
    assert torch.equal(idx, ref_i)


def test_chunked_logits_equal_unchunked_and_naive():
    vocab = Vocabulary([f"c{i}" for i in range(50)], [["x"]] * 50, _unit(50, 3, 8, seed=1))
    f = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    chunked = vocab.logits(f, chunk_size=7)
    torch.testing.assert_close(chunked, vocab.logits(f, chunk_size=1000))
    naive = 100 * torch.einsum("nd,cpd->ncp", F.normalize(f, dim=-1), vocab.embeddings).amax(-1)
    torch.testing.assert_close(chunked, naive)


def test_topk_edge_cases():
    vocab = Vocabulary(["a", "b", "c"], [["a"], ["b"], ["c"]], _unit(3, 1, 4))
    f = _unit(2, 4, seed=5)
    scores, idx = vocab.topk(f, k=10, chunk_size=2)
    assert scores.shape == idx.shape == (2, 3)
    assert torch.equal(idx, vocab.logits(f).argsort(dim=1, descending=True))
    with pytest.raises(ValueError, match="k must be >= 1"):
        vocab.topk(f, k=0)
    with pytest.raises(ValueError, match=r"region embeddings must be \[N, D=4\], got \(2, 5\)"):
        vocab.logits(torch.zeros(2, 5))


def test_subset_index_and_to():
    vocab = Vocabulary(["a", "b", "c"], [["a", "a2"], ["b"], ["c"]], _unit(3, 2, 4), split=["base", "novel", 0])
    assert vocab.index("c") == 2
    with pytest.raises(ValueError, match="'d' is not in this vocabulary of 3 classes"):
        vocab.index("d")
    sub = vocab.subset([2, 0])
    assert sub.names == ["c", "a"] and sub.synonyms == [["c"], ["a", "a2"]] and sub.split.tolist() == [0, 1]
    assert torch.equal(sub.embeddings, vocab.embeddings[[2, 0]])
    with pytest.raises(ValueError, match="out of range"):
        vocab.subset([3])
    moved = vocab.to("cpu")
    assert moved == vocab and moved.content_hash == vocab.content_hash
    assert "3 classes" in repr(vocab) and "base/novel/excluded=1/1/1" in repr(vocab)


def test_save_load_round_trip(tmp_path, clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    vocab = Vocabulary.from_names(["a,b", "c"], model, tokenizer=tok, clip_model="tiny", split=["base", "novel"],
                                  progress=False)
    path = vocab.save(tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors.tmp").exists()
    back = Vocabulary.load(path)
    assert back.names == vocab.names and back.synonyms == vocab.synonyms
    assert back.split.tolist() == [1, 2] and back.split.dtype == np.int8 and back.content_hash == vocab.content_hash
    assert torch.equal(back.embeddings, vocab.embeddings) and back.clip_model == "tiny"
    assert back.templates == vocab.templates and back == vocab
    assert Vocabulary.resolve(str(path), model=None).content_hash == vocab.content_hash

    nosplit = Vocabulary(["x"], [["x"]], _unit(1, 1, 4), templates=("{}",))
    back = Vocabulary.load(nosplit.save(tmp_path / "n.safetensors"))
    assert back.split is None and back.templates == ("{}",) and back == nosplit


def test_tampered_file_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    vocab = Vocabulary(["a", "b"], [["a"], ["b"]], _unit(2, 1, 4), clip_model="x")
    path = vocab.save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))

    save_file({"embeddings": -tensors["embeddings"]}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"v\.safetensors: .*hash mismatch"):
        Vocabulary.load(path)

    info = json.loads(meta["meta"])
    info["names"] = ["b", "a"]
    save_file(tensors, str(path), metadata={**meta, "meta": json.dumps(info)})
    with pytest.raises(ValueError, match=r"v\.safetensors: .*hash mismatch"):
        Vocabulary.load(path)

    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    with pytest.raises(ValueError, match="other.safetensors is not a saved ovsam vocabulary"):
        Vocabulary.load(other)
    text = tmp_path / "classes.txt"
    text.write_text("cat\n")
    with pytest.raises(ValueError, match="classes.txt is not a saved ovsam vocabulary"):
        Vocabulary.load(text)


def test_hash_changes_with_content():
    emb = _unit(2, 1, 4)
    a = Vocabulary(["a", "b"], [["a"], ["b"]], emb)
    variants = [
        Vocabulary(["a", "b"], [["a"], ["b"]], emb, split=[1, 2]),
        Vocabulary(["a", "c"], [["a"], ["b"]], emb),
        Vocabulary(["a", "b"], [["a"], ["c"]], emb),
        Vocabulary(["a", "b"], [["a"], ["b"]], emb, clip_model="y"),
        Vocabulary(["a", "b"], [["a"], ["b"]], emb, templates=("{}",)),
        Vocabulary(["a", "b"], [["a"], ["b"]], -emb),
    ]
    assert len({a.content_hash, *(v.content_hash for v in variants)}) == 7
    assert a == Vocabulary(["a", "b"], [["a"], ["b"]], emb.clone())
    assert len(a.content_hash) == 64


def test_class_file(tmp_path, clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncouch, sofa | base\n\ncat | novel  # a comment\n")
    assert Vocabulary.read_class_file(path) == ([["couch", "sofa"], ["cat"]], [1, 2])
    vocab = Vocabulary.resolve(path, model, tokenizer=tok, clip_model="tiny", progress=False)
    assert vocab.names == ["couch", "cat"] and vocab.synonyms[0] == ["couch", "sofa"]
    assert vocab.split.tolist() == [1, 2]
    untagged = tmp_path / "plain.txt"
    untagged.write_text("dog\nbird,fowl\n")
    assert Vocabulary.read_class_file(untagged) == ([["dog"], ["bird", "fowl"]], None)


@pytest.mark.parametrize(
    "text, match",
    [
        ("dog\ncat | weird\n", r"bad.txt:2: expected 'synonyms \| base\|novel\|excluded'"),
        ("dog\n , ,\n", r"bad.txt:2: no class name"),
        ("dog | base\ncat\n", r"bad.txt: split tags must be on every line or on none; untagged classes: \['cat'\]"),
        ("# only a comment\n\n", r"bad.txt: no classes found"),
    ],
)
def test_class_file_errors(tmp_path, text, match):
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        Vocabulary.read_class_file(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(names=[], synonyms=[], embeddings=torch.zeros(0, 1, 4)), "at least one class"),
        (dict(names=["a", "a"], synonyms=[["a"], ["b"]]), "duplicate class name 'a' at indices 0 and 1"),
        (dict(names=["a", " "], synonyms=[["a"], ["b"]]), "class 1 has an empty name"),
        (dict(names=["a", "b"], synonyms=[["a"], []]), r"class 1 \('b'\) has no synonyms"),
        (dict(names=["a", "b"], synonyms=[["a"], ["b", ""]]), r"class 1 \('b'\) has an empty synonym"),
        (dict(split=[1, 2, 0]), r"one entry per class \(2\), got 3"),
        (dict(split=[1, 3]), "class 1 has 3"),
        (dict(split=["base", "rare"]), "class 1 has 'rare'"),
        (dict(embeddings=_unit(3, 1, 4)), r"shape \[C=2, P>=1, D\], got \(3, 1, 4\)"),
        (dict(synonyms=[["a", "a2"], ["b"]]), r"shape \[C=2, P>=2, D\], got \(2, 1, 4\)"),
        (dict(embeddings=2 * _unit(2, 1, 4)), "unit-norm rows; class 0 prototype 0 has norm 2"),
        (dict(content_hash="0" * 64), "content hash mismatch"),
    ],
)
def test_validation_errors(kwargs, match):
    args = dict(names=["a", "b"], synonyms=[["a"], ["b"]], embeddings=_unit(2, 1, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Vocabulary(**args)


def test_from_names_validates_before_encoding(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    kw = dict(tokenizer=tok, clip_model="tiny", progress=False)
    with pytest.raises(ValueError, match=r"class 1 \(' , '\) has no synonyms after 'plain' normalisation"):
        Vocabulary.from_names(["cat", " , "], model, **kw)
    with pytest.raises(ValueError, match="duplicate class name 'cat'"):
        Vocabulary.from_names(["cat", "cat,kitty"], model, **kw)
    with pytest.raises(ValueError, match="one entry per class"):
        Vocabulary.from_names(["cat", "dog"], model, split=[1], **kw)


def test_unknown_builtin_lists_choices():
    with pytest.raises(ValueError, match="available: coco, lvis, imagenet21k"):
        Vocabulary.class_list("objects365")


def test_a_synonym_in_two_classes_is_reported(tiny_model, caplog):
    import logging

    from ovsam import Vocabulary

    with caplog.at_level(logging.WARNING, logger="ovsam.vocabulary"):
        Vocabulary.from_names(["couch,sofa", "Sofa,settee", "chair"], tiny_model, progress=False)
    assert "'sofa' (classes 0 'couch' and 1 'Sofa')" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ovsam.vocabulary"):
        Vocabulary.from_names(["couch,sofa", "chair"], tiny_model, progress=False)
    assert "synonym" not in caplog.text
