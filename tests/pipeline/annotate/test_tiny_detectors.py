"""Tiny random-weight open-vocabulary detectors and SAM 3, saved and loaded offline like hub checkpoints."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from pipeline.annotate.detectors.tiny import (  # noqa: E402
    TINY_DETECTORS,
    clip_tokenizer_files,
    save_tiny_detector,
    save_tiny_sam3,
    wordpiece_vocab,
)

SIZES = [(50, 70), (90, 40)]  # (height, width): different sizes and aspect ratios in one batch
QUERIES = ["a photo of a cat", "a photo of a dog"]
#: the model cards' / READMEs' score thresholds (pipeline.annotate.detectors.spec), and OmDet-Turbo's default
THRESHOLDS = {"owlv2": 0.1, "owlvit": 0.1, "grounding-dino": 0.35, "mm-grounding-dino": 0.35, "omdet-turbo": 0.3}


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when the hub is imported


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def test_clip_tokenizer_files_are_clips_bpe(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from transformers import CLIPTokenizer

    directory = clip_tokenizer_files(tmp_path)
    assert directory == tmp_path
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in ["a photo of a cat", "Two hot-dogs, a teddy bear's (small) 42 toys!"]:
        expected = open_clip.tokenizer.tokenize([text])[0]
        assert tokenizer(text).input_ids == expected[expected != 0].tolist()


def test_wordpiece_vocab_covers_lowercase_ascii():
    from transformers import BertTokenizer

    vocab = wordpiece_vocab(["a photo of a cat", "Hot-Dog teddy_bear", "cat"])
    assert vocab[:3] == ["[PAD]", "[UNK]", "[MASK]"]
    # Grounding DINO's phrase masks read bert-base-uncased's ids of [CLS], [SEP], "." and "?"
    assert [vocab[i] for i in (101, 102, 1012, 1029)] == ["[CLS]", "[SEP]", ".", "?"]
    assert len(vocab) == len(set(vocab)) and vocab == wordpiece_vocab(["a photo of a cat", "Hot-Dog teddy_bear"])
    assert {".", ",", "-", "'", "(", ")", "/", "&", "7", "q", "##q", "##7", "photo", "hot", "dog", "bear"} <= set(vocab)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer.tokenize("a photo of a cat.") == ["a", "photo", "of", "a", "cat", "."]
    chars = string.ascii_lowercase + string.digits + string.punctuation + " \t\n"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 50)))
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text


def _text_ids(name, inputs):
    return inputs["classes_input_ids"] if name == "omdet-turbo" else inputs["input_ids"]


def _detect(name, directory):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    images = _images()
    if "grounding-dino" in name:  # Grounding DINO takes the classes merged into one period-separated prompt
        inputs = processor(images=images, text=[". ".join(QUERIES) + "."] * 2, return_tensors="pt")
    else:
        inputs = processor(images=images, text=[QUERIES] * 2, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    if name in ("owlv2", "owlvit"):
        results = processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=SIZES, text_labels=[QUERIES] * 2)
    elif "grounding-dino" in name:
        results = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=SIZES)
    else:
        results = processor.post_process_grounded_object_detection(
            outputs, text_labels=[QUERIES] * 2, threshold=0.0, target_sizes=SIZES)
    return model, inputs, outputs, results


@pytest.mark.parametrize("name", TINY_DETECTORS)
def test_tiny_detector_loads_and_detects(name, tmp_path, offline):
    directory = save_tiny_detector(name, tmp_path / name)
    assert directory == tmp_path / name
    assert json.loads((directory / "config.json").read_text())["model_type"] == name
    model, inputs, outputs, results = _detect(name, directory)
    assert type(model).__name__.endswith("ForObjectDetection")
    if "grounding-dino" not in name:  # CLIP's real BPE: the ids of open_clip's tokenizer, SOT ... EOT
        assert _text_ids(name, inputs)[0][:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]

    assert len(results) == 2
    for result, (h, w) in zip(results, SIZES, strict=True):
        boxes, scores = result["boxes"], result["scores"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 10 and scores.shape == (len(boxes),)
        assert torch.isfinite(boxes).all() and ((scores >= 0) & (scores <= 1)).all()
        assert scores.std() > 0.02 and scores.max() - scores.min() > 0.2  # not collapsed: thresholds select
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert boxes[:, :2].std(0).min() > 0.5 and (boxes[:, 2:] - boxes[:, :2]).std(0).min() > 0.1  # varying
        center = (boxes[:, :2] + boxes[:, 2:]) / 2  # box centres lie in (or, for OWLv2's padding, near) the image
        assert (center > -0.5 * max(h, w)).all() and (center < 1.5 * max(h, w)).all()
        assert len(result["text_labels"]) == len(boxes)
        if "grounding-dino" not in name:  # Grounding DINO's labels are the prompt's spans above text_threshold
            assert set(result["text_labels"]) <= set(QUERIES)
    scores = torch.cat([result["scores"] for result in results])
    assert 0 < (scores > THRESHOLDS[name]).sum() < len(scores)  # the usual threshold keeps some, drops others


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_tiny_detector_is_seeded(tmp_path):
    a, b, c = (_weights(save_tiny_detector("grounding-dino", tmp_path / f"{i}", seed=seed))
               for i, seed in enumerate([3, 3, 4]))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(("name", "expected"), [("owlv2", (128, 128)), ("grounding-dino", (204, 179))])
def test_tiny_detector_image_size(name, expected, tmp_path, offline):
    from transformers import AutoConfig, AutoProcessor

    directory = save_tiny_detector(name, tmp_path / name, image_size=128)
    text = [". ".join(QUERIES) + "."] * 2 if "grounding" in name else [QUERIES] * 2
    inputs = AutoProcessor.from_pretrained(directory)(images=_images(), text=text, return_tensors="pt")
    # Grounding DINO: shortest edge 128, longest 204 (the real 800 / 1333), batch padded to (204, 179)
    assert tuple(inputs["pixel_values"].shape[-2:]) == expected
    config = AutoConfig.from_pretrained(directory)
    if name.startswith("owl"):
        assert config.vision_config.image_size == 128


def test_tiny_detector_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny detector"):
        save_tiny_detector("yolo", tmp_path)


def test_tiny_sam3_segments_a_text_prompt(tmp_path, offline):
    from transformers import AutoProcessor, Sam3Model

    directory = save_tiny_sam3(tmp_path / "sam3")
    assert json.loads((directory / "config.json").read_text())["model_type"] == "sam3"
    model = Sam3Model.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    image = _images()[0]
    inputs = processor(images=image, text="a cat", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    (everything,) = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=inputs["original_sizes"].tolist())
    (result,) = processor.post_process_instance_segmentation(  # the default threshold (0.3) keeps some
        outputs, target_sizes=inputs["original_sizes"].tolist())
    assert 0 < len(result["scores"]) < len(everything["scores"]) == 20  # the tiny config's 20 queries
    n = len(result["scores"])
    assert result["boxes"].shape == (n, 4) and result["masks"].shape == (n, *SIZES[0])
    assert torch.isfinite(result["boxes"]).all() and result["masks"].any()
