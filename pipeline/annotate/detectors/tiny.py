"""Tiny random-weight open-vocabulary detectors (and SAM 3), written offline as hub-style checkpoints.

Each ``save_*`` function builds a transformers model from a tiny config with a fixed torch seed and writes it with
``save_pretrained`` -- model *and* processor -- so that tests and benchmarks load the directory exactly as they would
load a checkpoint from the hub (``AutoModelForZeroShotObjectDetection.from_pretrained(dir)``,
``AutoProcessor.from_pretrained(dir)``). Nothing is downloaded:

- CLIP-tokenized models (OWL-ViT, OWLv2, OmDet-Turbo, SAM 3) get CLIP's real BPE, rebuilt from the merges file that
  ``open_clip`` ships (:func:`clip_tokenizer_files`), so token ids and lengths are those of the real checkpoints;
- BERT-tokenized models (Grounding DINO, MM Grounding DINO) get a small word-piece vocabulary that covers any lowercase
  ascii text (:func:`wordpiece_vocab`), and a tiny ``BertConfig`` built in place of ``bert-base-uncased``.

The weights are random, so the outputs mean nothing, but they vary: boxes and scores spread over the image and over
(0, 1), so score thresholds keep some boxes and drop others.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
import string
from collections.abc import Iterable
from pathlib import Path

TINY_DETECTORS = ("owlv2", "owlvit", "grounding-dino", "mm-grounding-dino", "omdet-turbo")

_CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 bytes + '</w>', the merges, SOT and EOT: 49408
_CLIP_VOCAB_SIZE = 49408

#: whole words of the tiny BERT vocabulary: prompt words and COCO's class names (unknown words fall back to letters)
_WORDS = """a an the photo of picture image object thing this that and or in on with
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter bench
bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard
sports ball kite baseball bat glove skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl
banana apple sandwich orange broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv
laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase scissors teddy hair
drier toothbrush"""


# ----------------------------------------------------------------------------------------------------- tokenizers


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes onto printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return dict(zip(printable + extra, map(chr, codes), strict=True))


def _clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # the package dir, without importing open_clip (and torch, timm)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is needed for CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CLIP's vocabulary and merges, built the way CLIP's own tokenizer builds them from its merges file."""
    with gzip.open(_clip_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : _CLIP_MERGES + 1]
    chars = list(_byte_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == _CLIP_VOCAB_SIZE, len(vocab)
    return tuple(vocab), tuple(merges)


def clip_tokenizer_files(directory) -> Path:
    """Write CLIP's real BPE as a ``CLIPTokenizer``'s ``vocab.json`` + ``merges.txt`` into ``directory``.

    Built the way CLIP's own tokenizer builds its vocabulary from the merges file that ``open_clip`` ships.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                          encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def _clip_tokenizer(model_max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()  # the same tokenizer as CLIPTokenizer(vocab.json, merges.txt), without the files
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
    tokenizer.model_max_length = model_max_length  # the text encoder's max_position_embeddings
    return tokenizer


#: token id -> token that Grounding DINO's phrase masks depend on (bert-base-uncased's ids)
_BERT_PINNED = {101: "[CLS]", 102: "[SEP]", 1012: ".", 1029: "?"}


def wordpiece_vocab(words: Iterable[str]) -> list[str]:
    """A small BERT word-piece vocabulary on which any lowercase ascii text tokenizes without ``[UNK]``.

    Special tokens, every ascii punctuation character (BERT splits each into its own token), digits, letters,
    ``##``-continuations of letters and digits, then ``words`` (lowercased, split on whitespace and punctuation).
    """
    vocab = ["[PAD]", "[UNK]", "[MASK]", *string.punctuation, *string.digits]
    vocab += [*string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase + string.digits)]
    for text in words:
        vocab += re.findall(r"[^\W_]+", text.lower())
    vocab = [t for t in dict.fromkeys(vocab) if t not in _BERT_PINNED.values()]
    # Grounding DINO splits its caption into phrases at bert-base-uncased's ids of [CLS], [SEP], "." and "?"
    # (its SPECIAL_TOKENS), so those four keep their ids here, with [unused] fillers as bert-base's vocabulary has
    size = max(len(vocab) + len(_BERT_PINNED), max(_BERT_PINNED) + 1)
    out, rest, unused = [], iter(vocab), 0
    for i in range(size):
        if i in _BERT_PINNED:
            out.append(_BERT_PINNED[i])
        else:
            token = next(rest, None)
            if token is None:
                token, unused = f"[unused{unused}]", unused + 1
            out.append(token)
    return out


def _bert_tokenizer(vocab: list[str]):
    from transformers import BertTokenizer

    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=512)


# ------------------------------------------------------------------------------------------------ init adjustments


def _reinit(linear, gain: float, bias: float = 0.0) -> None:
    """Normal weights of std ``gain / sqrt(fan_in)`` (output std ~ ``gain`` for unit-scale inputs), constant bias."""
    import torch

    with torch.no_grad():
        linear.weight.normal_(0.0, gain / linear.weight[0].numel() ** 0.5)
        if linear.bias is not None:
            linear.bias.fill_(bias)


def _spread_owl_heads(model) -> None:
    # transformers initializes OWL's detection heads with std = initializer_factor (1.0): logits of +-100 and boxes
    # of zero or full size. Rescale them so that the logits spread over about +-5 around -1 (sigmoid scores from
    # ~0.01 to ~0.9: a threshold of 0.1 keeps some boxes, drops others) and boxes vary around OWL's per-patch prior.
    head = model.class_head
    _reinit(head.dense0, 1.0)
    _reinit(head.logit_shift, 0.5, bias=-0.3)  # logits = (cosine + shift) * scale
    _reinit(head.logit_scale, 0.1, bias=3.0)  # scale = elu(3 +- 0.1) + 1 ~ 4
    for layer in (model.box_head.dense0, model.box_head.dense1):
        _reinit(layer, 1.0)
    _reinit(model.box_head.dense2, 1.0)  # box deltas of std ~0.6 (in logit space) on top of the grid prior
    if hasattr(model, "objectness_head"):  # OWLv2's class-agnostic proposals
        _reinit(model.objectness_head.dense0, 1.0)
        _reinit(model.objectness_head.dense1, 1.0)
        _reinit(model.objectness_head.dense2, 3.0)  # objectness logits of std ~2


def _spread_grounding_heads(model, mm: bool, shift: float = 2.5) -> None:
    # Class logits are dot products of decoder queries with text tokens, and the post-processing scores a box by its
    # best token. Grounding DINO's are unscaled: with layer-normed d_model=32 vectors they have std ~6 (scores
    # saturate at 0 and 1), so the decoder's output norm is scaled by 1/3; to centre them at -shift, the norm's bias
    # gets -shift/d * ones and the text output norm's bias ones (layer-norm outputs sum to zero over channels, so
    # the dot product moves by exactly -shift, and text attention, softmax over tokens, is unchanged). MM Grounding
    # DINO divides by sqrt(d_model) and adds a bias initialized to the focal-loss prior (-4.6: all scores < 0.2):
    # its norm is scaled by 2 and the bias set to -shift. Either way a threshold of 0.35 keeps some boxes and drops
    # others. The box head's last layer (zero at init: every box would be an encoder proposal of fixed size; its
    # hidden layers at std 0.02 shrink deltas to ~1e-3) is re-initialized so that box sizes vary.
    import torch

    d_model = model.config.d_model
    scale = 2.0 if mm else 1 / 3
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(scale)
        if mm:
            for module in model.class_embed:
                module.bias.fill_(-shift)
        else:
            model.model.decoder.layer_norm.bias.fill_(-shift / d_model)
            model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after.bias.fill_(1.0)
        for mlp in model.bbox_embed:  # its input is the scaled norm's output: box deltas of std ~0.5 (logit space)
            for layer in mlp.layers[:-1]:
                _reinit(layer, 2**0.5)  # ReLU MLP: He init keeps the scale
            _reinit(mlp.layers[-1], 0.5 / scale)


def _unit_gain_convs(module) -> None:
    # OmDet-Turbo's hybrid encoder initializes its convs with std 0.02 and its BatchNorms, in eval mode with fresh
    # statistics, do not renormalize: features shrink ~1e4x by the decoder and every query collapses onto the same
    # vector (identical scores). Unit-gain convs keep the features at unit scale.
    import torch

    for name, conv in module.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and not name.startswith("vision_backbone"):
            _reinit(conv, 1.0)


def _calibrate_omdet_sign(model, processor) -> None:
    # OmDet-Turbo scores are cosine similarities (x 1/0.07) between decoder queries and class projections. At random
    # init all queries share a large common direction, so the sign of the mean logit is a coin flip of the seed: at
    # seed 0, all scores are > 0.9. Negating the class projection (an equally likely draw of the same init) where
    # the mean logit on a fixed probe is positive moves most logits below 0; their spread (std ~1.5-3) remains.
    import numpy as np
    import torch

    probe = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    inputs = processor(images=[probe], text=[["a photo of a cat", "a photo of a dog"]], return_tensors="pt")
    with torch.no_grad():
        if model(**inputs).decoder_class_logits.mean() > 0:
            for head in model.decoder.decoder_class_head:
                head.weight.neg_()
                if head.bias is not None:
                    head.bias.neg_()


# ---------------------------------------------------------------------------------------------------- detectors


def _owl(name: str, image_size: int | None):
    import transformers as tf

    size = image_size or 96
    patch = 16 if size % 16 == 0 else 8
    if size % patch:
        raise ValueError(f"{name}: image_size must be a multiple of 8, got {size}")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text.update(vocab_size=_CLIP_VOCAB_SIZE, max_position_embeddings=16)  # OWL's text limit: 16 CLIP tokens
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=size, patch_size=patch)
    square = {"height": size, "width": size}
    if name == "owlv2":  # pads to a square, then resizes
        config = tf.Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
        model = tf.Owlv2ForObjectDetection(config)
        image_processor = tf.Owlv2ImageProcessor(size=square)
        processor_class = tf.Owlv2Processor
    else:  # resizes (to a square, as the hub's OWL-ViT configs do), then center-crops
        config = tf.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
        model = tf.OwlViTForObjectDetection(config)
        image_processor = tf.OwlViTImageProcessor(size=square, crop_size=square)
        processor_class = tf.OwlViTProcessor
    _spread_owl_heads(model)
    return model, processor_class(image_processor=image_processor, tokenizer=_clip_tokenizer(16))


def _swin(image_size: int, window_size: int):
    from transformers import SwinConfig

    # out_indices [2, 3, 4]: the stages Grounding DINO and OmDet-Turbo take from their Swin-T (here 32/64/128 ch)
    return SwinConfig(image_size=image_size, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                      window_size=window_size, out_indices=[2, 3, 4])


def _grounding_dino(name: str, image_size: int | None):
    import transformers as tf

    shortest = image_size or 80
    longest = shortest * 8 // 5  # 800 / 1333 for the real checkpoints
    vocab = wordpiece_vocab([_WORDS])
    # the text encoder is built in place from this config, never fetched as "bert-base-uncased"
    text = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
    kwargs = dict(backbone_config=_swin(shortest, 4), text_config=text, d_model=32, encoder_layers=1,
                  decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                  decoder_attention_heads=4, num_queries=40, max_text_len=256)  # 256 text tokens, as the real ones
    if name == "grounding-dino":
        model = tf.GroundingDinoForObjectDetection(tf.GroundingDinoConfig(**kwargs))
    else:
        model = tf.MMGroundingDinoForObjectDetection(tf.MMGroundingDinoConfig(**kwargs))
    _spread_grounding_heads(model, mm=name == "mm-grounding-dino")
    image_processor = tf.GroundingDinoImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest})
    return model, tf.GroundingDinoProcessor(image_processor=image_processor, tokenizer=_bert_tokenizer(vocab))


def _omdet_turbo(image_size: int | None):
    import transformers as tf

    size = image_size or 96
    if size % 32:
        raise ValueError(f"omdet-turbo: image_size must be a multiple of 32 (feature strides 8/16/32), got {size}")
    # CLIP text encoder: its hidden size is also the class-embedding size, which must differ from the decoder's
    # (transformers only builds the decoder's task projection when they differ, and uses it unconditionally).
    text = tf.CLIPTextConfig(vocab_size=_CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=64)
    config = tf.OmDetTurboConfig(
        backbone_config=_swin(size, 3), text_config=text, image_size=size,
        # transformers' Swin backbone returns layer-normed NCHW maps; the post-backbone layer norms expect timm's
        # NHWC maps (the real checkpoint uses timm's Swin, which cannot be made tiny through the config)
        apply_layernorm_after_vision_backbone=False, encoder_in_channels=[32, 64, 128],
        text_projection_in_dim=64, text_projection_out_dim=64, class_embed_dim=64, task_encoder_hidden_dim=128,
        encoder_hidden_dim=32, vision_features_channels=[32, 32, 32], encoder_attention_heads=4,
        encoder_dim_feedforward=64, decoder_hidden_dim=32, decoder_num_heads=4, decoder_num_layers=2,
        decoder_dim_feedforward=64, num_queries=40,
    )
    model = tf.OmDetTurboForObjectDetection(config).eval()
    _unit_gain_convs(model)
    processor = tf.OmDetTurboProcessor(
        image_processor=tf.DetrImageProcessor(size={"height": size, "width": size}, do_pad=False),
        tokenizer=_clip_tokenizer(77),
    )
    _calibrate_omdet_sign(model, processor)
    return model, processor


def save_tiny_detector(name: str, directory, *, seed: int = 0, image_size: int | None = None) -> Path:
    """Build the tiny ``name`` detector (one of :data:`TINY_DETECTORS`) with random weights and save it + processor.

    ``image_size`` is the vision input size (OWL: the square side; Grounding DINO: the shortest edge; OmDet-Turbo:
    the square side). Returns ``directory``, loadable with ``AutoModelForZeroShotObjectDetection`` and
    ``AutoProcessor``.
    """
    import torch

    if name not in TINY_DETECTORS:
        raise ValueError(f"unknown tiny detector {name!r}; expected one of {TINY_DETECTORS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in ("owlv2", "owlvit"):
            model, processor = _owl(name, image_size)
        elif name in ("grounding-dino", "mm-grounding-dino"):
            model, processor = _grounding_dino(name, image_size)
        else:
            model, processor = _omdet_turbo(image_size)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_sam3(directory, *, seed: int = 0) -> Path:
    """Save a tiny random ``Sam3Model`` + ``Sam3Processor`` (CLIP's real tokenizer) into ``directory``."""
    import torch
    import transformers as tf
    from transformers.models.sam3 import configuration_sam3 as c

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size, patch, hidden = 112, 14, 32
    grid = size // patch  # ViT tokens per side; the FPN scales them by 4, 2, 1 (and 0.5)
    vit = c.Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=size, pretrain_image_size=size, patch_size=patch, window_size=4,
                          global_attn_indexes=[1])
    vision = c.Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=hidden,
                                backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2])
    text = tf.CLIPTextConfig(vocab_size=_CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, projection_dim=32,
                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)
    small = dict(hidden_size=hidden, num_attention_heads=2)
    config = tf.Sam3Config(
        vision_config=vision, text_config=text,
        geometry_encoder_config=c.Sam3GeometryEncoderConfig(**small, num_layers=1, intermediate_size=64),
        detr_encoder_config=c.Sam3DETREncoderConfig(**small, num_layers=1, intermediate_size=64),
        detr_decoder_config=c.Sam3DETRDecoderConfig(**small, num_layers=1, intermediate_size=64, num_queries=20),
        mask_decoder_config=c.Sam3MaskDecoderConfig(**small),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.Sam3Model(config)
        # at init every query scores sigmoid(0) * presence sigmoid(0) = 0.25, under post-processing's default
        # threshold of 0.3: spread the query logits (std ~2) and make the prompt "present" (sigmoid(3) = 0.95)
        _reinit(model.dot_product_scoring.query_proj, 2**0.5)
        _reinit(model.dot_product_scoring.text_proj, 2**0.5)
        with torch.no_grad():
            model.detr_decoder.presence_head.layer3.bias.fill_(3.0)
    image_processor = tf.Sam3ImageProcessor(size={"height": size, "width": size},
                                            mask_size={"height": 4 * grid, "width": 4 * grid})
    model.save_pretrained(directory)
    tf.Sam3Processor(image_processor=image_processor, tokenizer=_clip_tokenizer(32)).save_pretrained(directory)
    return directory
