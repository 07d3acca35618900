"""Full-size open-world models with random weights, saved as checkpoint directories offline, for
``bench/open_world.py``: OWLv2 base-patch16 and Grounding DINO tiny with their processors (CLIP's real BPE from
open_clip; a word-piece vocabulary of the COCO and LVIS class words)."""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.annotate.detectors.tiny import clip_tokenizer_files, wordpiece_vocab


def clip_tokenizer(directory: str, max_length: int) -> Any:
    """CLIP's real BPE tokenizer (``tiny.clip_tokenizer_files``), as the OWLv2 and SAM 3 checkpoints ship it."""
    from transformers import CLIPTokenizer

    files = clip_tokenizer_files(os.path.join(directory, "_clip_bpe"))
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    tokenizer.model_max_length = max_length
    return tokenizer


def save_full_detector(name: str, directory: str) -> None:
    """Random full-size ``owlv2`` (base-patch16, 960 px) or ``grounding-dino`` (tiny: Swin-T, BERT-base) + its
    processor, saved as a checkpoint directory. Grounding DINO's word pieces: every word of the COCO and LVIS
    class lists is one token (BERT's real vocabulary splits a few rare LVIS words into 2-3)."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "owlv2":
            model = tf.Owlv2ForObjectDetection(tf.Owlv2Config(vision_config={"image_size": 960, "patch_size": 16}))
            processor = tf.Owlv2Processor(image_processor=tf.Owlv2ImageProcessor(),
                                          tokenizer=clip_tokenizer(directory, 16))
        elif name == "grounding-dino":
            from ovsam import Vocabulary

            words = ["a photo of a"]
            for lst in ("coco", "lvis"):
                words += [s for syns in Vocabulary.class_list(lst)[1] for s in syns]
            vocab = wordpiece_vocab(words)
            model = tf.GroundingDinoForObjectDetection(tf.GroundingDinoConfig(text_config=tf.BertConfig()))
            tokenizer = tf.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=512)
            processor = tf.GroundingDinoProcessor(image_processor=tf.GroundingDinoImageProcessor(),
                                                  tokenizer=tokenizer)
        else:
            raise ValueError(f"no full-size builder for {name!r}")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
