"""The systems ``bench/model.py`` compares, each split into an image-level pass and a per-box pass.

- ``ovsam-rn50x16`` / ``ovsam-convnext-large``: the project's model through its public batch functions:
  ``ovsam.batch.encode_images`` (image side), then ``decode_prompts`` over the boxes of every image of the batch
  (prompt encoder, label-token decoder, recognition, scores against the vocabulary) and ``finish_prediction`` per
  image (masks upscaled to the original size and thresholded, their boxes, labels), as ``predict_images`` does.
- ``image-crop``: the baseline users build today. SAM ViT-H's encoder and decoder give a mask per box; each box is
  cropped from the input image with the pixels outside its mask set to CLIP's mean colour, resized to CLIP's input
  (384 x 384 for RN50x16) and embedded by the whole CLIP RN50x16 visual tower (trunk + attention pool), in chunks;
  the embedding is scored against the vocabulary (cosine, max over synonyms, softmax).
- ``feature-crop``: SAM ViT-H's masks plus one CLIP RN50x16 trunk pass over the 1024 x 1024 input; C5 (stride 32,
  3,072 wide) is averaged inside each mask (the mask logits resized to C5's grid, > 0) and that mean stands for the
  attention pool's mean token (plus its positional embedding): with a single token the pool's attention is the
  identity, so it reduces to its value and output projections, giving the CLIP embedding, scored as above.

Every system runs its reduced precisions under ``torch.autocast`` with conv inputs in channels_last: the model
systems through the project's prediction functions (which autocast to ``model.precision``), the baselines'
own code here under ``torch.autocast`` around the same SAM functions and the CLIP tower.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import input_size_for, params_millions, sync

SYSTEMS = ("ovsam-rn50x16", "image-crop", "feature-crop", "ovsam-convnext-large")
DEFAULT_CROP_CHUNK = 32
LOGIT_SCALE = 4.6052  # CLIP's log(100), as the recognition configs use


class StageClock:
    """Accumulates seconds per named stage; each ``with clock(name):`` synchronises the device on both sides."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t


@dataclass
class Inputs:
    """One pass's images: ``x`` ``[B, 3, S, S]`` normalised and zero-padded, ``pixels`` the same images in 0-255
    (what the image-crop baseline crops from), ``input_size`` / ``original_size`` (H, W)."""

    x: torch.Tensor
    pixels: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def make_inputs(batch: int, image_size: int, original_size: tuple[int, int], device: torch.device | str,
                memory_format: torch.memory_format = torch.contiguous_format, seed: int = 0) -> Inputs:
    h, w = input_size_for(image_size, original_size)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(batch, 3, image_size, image_size)
    pixels[:, :, :h, :w] = torch.rand(batch, 3, h, w, generator=g) * 255
    x = torch.zeros_like(pixels)
    x[:, :, :h, :w] = (pixels[:, :, :h, :w] - 127.5) / 58.0
    return Inputs(x.to(device).contiguous(memory_format=memory_format), pixels.to(device), (h, w), original_size)


def tiny_convnext_config() -> dict[str, Any]:
    """``ovsam-tiny`` with a timm ``convnext_atto`` CLIP trunk (mask pooling), the tiny stand-in for
    ``ovsam-convnext-large``."""
    cfg = json.loads(resources.files("ovsam").joinpath("model_configs/ovsam-tiny.json").read_text())
    cfg["name"] = "ovsam-tiny-convnext"
    cfg["clip"] = {
        "name": "ovsam-tiny-convnext-clip", "stage_channels": [40, 80, 160, 320], "roi_size": 0,
        "model_cfg": {"embed_dim": 64, "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                                      "timm_pool": "", "timm_proj": "mlp", "image_size": 224},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    }
    return cfg


def model_name(system: str, tiny: bool) -> Any:
    """The ``build_ovsam`` name (or config) of an OV-SAM system, or of the SAM that a baseline uses."""
    if system == "ovsam-rn50x16":
        return "ovsam-tiny" if tiny else "ovsam-rn50x16"
    if system == "ovsam-convnext-large":
        return tiny_convnext_config() if tiny else "ovsam-convnext-large"
    if system in ("image-crop", "feature-crop"):
        return "sam-tiny" if tiny else "sam-vit-h"
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


def build_clip_visual(tiny: bool, device: torch.device | str) -> tuple[torch.nn.Module, str]:
    """A random-init open_clip ``RN50x16-quickgelu`` visual tower (or ``ovsam-tiny``'s tiny CLIP), eval, frozen.
    Returns ``(visual, clip model name)``."""
    from ovsam.config import load_config
    from ovsam.modeling.clip_backbone import create_clip

    cfg = load_config("ovsam-tiny" if tiny else "ovsam-rn50x16").clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = create_clip(cfg)
    visual = clip.visual.to(device).eval().requires_grad_(False)
    return visual, cfg.name


def _autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    from ovsam.precision import DTYPES

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class System:
    """A system under test. ``image_pass`` runs the image-level work of a batch and returns its features;
    ``box_pass`` runs the per-box work of every image in the batch. Both record their stages in a ``StageClock``.
    Where ``image_pass`` is one public call, ``has_breakdown`` is set and ``breakdown`` times the image side again
    stage by stage."""

    name: str
    description: str
    image_size: int
    params_m: float
    device: torch.device
    precision: str
    compiled: bool = False
    memory_format: torch.memory_format = torch.contiguous_format

    def image_pass(self, inputs: Inputs, clock: StageClock) -> Any:
        raise NotImplementedError

    def box_pass(self, features: Any, inputs: Inputs, boxes: list[torch.Tensor], clock: StageClock) -> Any:
        raise NotImplementedError

    def breakdown(self, inputs: Inputs, clock: StageClock) -> None:
        return None

    has_breakdown = False

    def compile(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Run as fp32 inside the block (FLOPs are counted so: see ``bench.common.count_flops``)."""
        saved = [(obj, obj.precision) for obj in self._precision_holders()]
        try:
            for obj, _ in saved:
                obj.precision = "fp32"
            yield
        finally:
            for obj, value in saved:
                obj.precision = value

    def _precision_holders(self) -> list[Any]:
        return [self]


class OvsamSystem(System):
    """An OV-SAM model through ``encode_images`` and ``predict_torch_prompts``."""

    def __init__(self, system: str, tiny: bool, device: str, precision: str, vocabulary_classes: int | str,
                 prototypes: int | None = None) -> None:
        import ovsam
        from ovsam.precision import conv_memory_format

        from bench.common import random_vocabulary

        self.name = system
        self.model = ovsam.build_ovsam(model_name(system, tiny), device=device, precision=precision)
        self.model.requires_grad_(False)
        m = self.model
        self.description = m.config.name
        self.device = m.device
        self.image_size = m.image_size
        self.params_m = params_millions(m.backbone, m.neck, m.prompt_encoder, m.mask_decoder, m.fpn_neck)
        self.vocabulary = random_vocabulary(vocabulary_classes, m.text_dim, m.clip_model_name, prototypes).to(m.device)
        self.memory_format = conv_memory_format(m)
        self.has_breakdown = True

    def set_vocabulary(self, vocabulary: Any) -> None:
        self.vocabulary = vocabulary.to(self.device)

    @property
    def precision(self) -> str:
        return self.model.precision

    def image_pass(self, inputs: Inputs, clock: StageClock) -> Any:
        from ovsam.batch import encode_images

        with clock("encode_images"):
            return encode_images(self.model, inputs.x)

    @torch.no_grad()
    def breakdown(self, inputs: Inputs, clock: StageClock) -> None:
        """The image side stage by stage, each under the model's autocast: CLIP trunk, SAM2CLIP neck, FPN."""
        from ovsam.precision import autocast

        m, x = self.model, inputs.x
        with autocast(m, x):
            with clock("trunk"):
                feats = m.backbone(x)
            with clock("neck"):
                m.neck(feats)
            with clock("fpn"):
                m.fpn_neck(feats)

    def box_pass(self, features: Any, inputs: Inputs, boxes: list[torch.Tensor], clock: StageClock) -> Any:
        """Every image's boxes decoded together (``decode_prompts``, as ``predict_images`` does for a batch), then
        each image's masks finished at its original size (``finish_prediction``); where those functions are
        missing, ``predict_torch_prompts`` image by image (one stage)."""
        import ovsam.batch as B

        vocab, size = self.vocabulary, (inputs.original_size, inputs.input_size)
        if not (hasattr(B, "decode_prompts") and hasattr(B, "finish_prediction")):
            with clock("decode+recognition"):
                return [B.predict_torch_prompts(self.model, features, i, None, b, None, *size, vocabulary=vocab)
                        for i, b in enumerate(boxes)]
        with clock("decode+recognition"):
            index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
            decoded = B.decode_prompts(self.model, features, index.to(self.device), None, torch.cat(boxes), None,
                                       vocabulary=vocab)
        out, offset = [], 0
        with clock("masks+labels"):
            for b in boxes:
                part = decoded.select(slice(offset, offset + len(b)))
                out.append(B.finish_prediction(self.model, part, *size, vocabulary=vocab))
                offset += len(b)
        return out

    def compile(self) -> None:
        from ovsam.build import compile_model

        if not self.compiled:
            compile_model(self.model)
            self.compiled = True

    def _precision_holders(self) -> list[Any]:
        return [self.model]


class SamClipSystem(System):
    """The two SAM + CLIP baselines (``image-crop``, ``feature-crop``), composed here from SAM (``sam-vit-h``, or
    ``sam-tiny``) and a random CLIP RN50x16 visual tower; see the module docstring."""

    def __init__(self, system: str, tiny: bool, device: str, precision: str, vocabulary_classes: int | str,
                 prototypes: int | None = None, crop_chunk: int = DEFAULT_CROP_CHUNK) -> None:
        import ovsam
        from ovsam.precision import conv_memory_format

        from bench.common import random_vocabulary

        if system not in ("image-crop", "feature-crop"):
            raise ValueError(f"SamClipSystem runs image-crop or feature-crop, not {system!r}")
        self.name = system
        self.crop = system == "image-crop"
        self.sam = ovsam.build_ovsam(model_name(system, tiny), device=device, precision=precision)
        self.sam.requires_grad_(False)
        self.device = self.sam.device
        self.precision = self.sam.precision
        self.image_size = self.sam.image_size
        self.visual, clip_name = build_clip_visual(tiny, self.device)
        self.memory_format = conv_memory_format(self.sam)
        self.visual.to(memory_format=self.memory_format)
        size = self.visual.image_size
        self.crop_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.crop_chunk = crop_chunk
        dim = int(self.visual.attnpool.c_proj.out_features)
        self.vocabulary = random_vocabulary(vocabulary_classes, dim, clip_name, prototypes).to(self.device)
        self.clip_mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=self.device).view(1, 3, 1, 1)
        self.clip_std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=self.device).view(1, 3, 1, 1)
        pool = self.visual.attnpool
        modules = [self.sam, self.visual] if self.crop else [self.sam, *[m for n, m in self.visual.named_children()
                                                                         if n != "attnpool"], pool.v_proj, pool.c_proj]
        self.params_m = params_millions(*modules)
        self.description = (f"{self.sam.config.name} masks + CLIP {clip_name} on {self.crop_size}px masked crops"
                            if self.crop else f"{self.sam.config.name} masks + CLIP {clip_name} trunk at "
                                              f"{self.image_size}px, mask-pooled C5")
        self._visual = self.visual
        self._trunk = self._trunk_forward

    def _trunk_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ovsam.modeling.clip_backbone import backbone_forward

        return backbone_forward(self.visual, x)[-1]

    @torch.no_grad()
    def image_pass(self, inputs: Inputs, clock: StageClock) -> Any:
        from ovsam.batch import encode_images

        x = inputs.x
        with _autocast(self.precision, self.device):
            with clock("sam_encoder"):
                sam_feats = encode_images(self.sam, x.contiguous())
            c5 = None
            if not self.crop:
                with clock("clip_trunk"):
                    c5 = self._trunk(x.contiguous(memory_format=self.memory_format))
        return sam_feats, c5

    @torch.no_grad()
    def box_pass(self, features: Any, inputs: Inputs, boxes: list[torch.Tensor], clock: StageClock) -> Any:
        from ovsam.batch import predict_torch_prompts
        from ovsam.modeling import recognition as R

        sam_feats, c5 = features
        out = []
        with _autocast(self.precision, self.device):
            for i, b in enumerate(boxes):
                with clock("sam_decode"):
                    pred = predict_torch_prompts(self.sam, sam_feats, i, None, b, None, inputs.original_size,
                                                 inputs.input_size)
                low_res = pred.low_res_logits.float()  # [N, 1, s, s] in the padded input frame
                if self.crop:
                    emb = self._crop_embeddings(inputs.pixels[i : i + 1], b, low_res, clock)
                else:
                    with clock("mask_pool+proj"):
                        emb = self._pooled_embeddings(c5[i : i + 1], low_res)
                with clock("classify"):
                    logits = R.class_logits(emb.float(), self.vocabulary.embeddings, LOGIT_SCALE)[:, :-1]
                    probs = logits.softmax(dim=-1)
                    out.append((pred.masks, probs.argmax(dim=-1), probs))
        return out

    def _crop_embeddings(self, pixels: torch.Tensor, boxes: torch.Tensor, low_res: torch.Tensor,
                         clock: StageClock) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, s = boxes.shape[0], self.crop_size
        embs = []
        for start in range(0, n, self.crop_chunk):
            b = boxes[start : start + self.crop_chunk].float()
            k = b.shape[0]
            with clock("crops"):
                rois = torch.cat([b.new_zeros(k, 1), b], dim=1)
                crops = roi_align(pixels.float(), rois, output_size=s, spatial_scale=1.0, sampling_ratio=2,
                                  aligned=True)
                mask_rois = torch.cat([torch.arange(k, device=b.device, dtype=b.dtype)[:, None], b], dim=1)
                keep = roi_align(low_res[start : start + k], mask_rois, output_size=s,
                                 spatial_scale=low_res.shape[-1] / self.image_size, sampling_ratio=2, aligned=True) > 0
                mean = self.clip_mean * 255
                crops = torch.where(keep, crops, mean)
                crops = ((crops / 255 - self.clip_mean) / self.clip_std).contiguous(memory_format=self.memory_format)
            with clock("clip_crops"):
                embs.append(self._visual(crops))
        return torch.cat(embs)

    def _pooled_embeddings(self, c5: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        pool = self.visual.attnpool
        masks = (F.interpolate(low_res, size=c5.shape[-2:], mode="bilinear", align_corners=False) > 0).to(c5.dtype)
        pooled = torch.einsum("nhw,chw->nc", masks[:, 0], c5[0]) / (masks.sum(dim=(1, 2, 3))[:, None] + 1e-8)
        token = pooled + pool.positional_embedding[0].to(pooled.dtype)
        return pool.c_proj(pool.v_proj(token))

    def compile(self) -> None:
        from ovsam.build import compile_model

        if not self.compiled:
            compile_model(self.sam)
            self._visual = torch.compile(self.visual, dynamic=False)
            self._trunk = torch.compile(self._trunk_forward, dynamic=False)
            self.compiled = True

    def _precision_holders(self) -> list[Any]:
        return [self, self.sam]


def build_system(system: str, *, tiny: bool, device: str, precision: str, classes: int | str = 80,
                 prototypes: int | None = None, crop_chunk: int = DEFAULT_CROP_CHUNK) -> System:
    """Build one of :data:`SYSTEMS` (random weights) on ``device`` in ``precision``."""
    if system in ("ovsam-rn50x16", "ovsam-convnext-large"):
        return OvsamSystem(system, tiny, device, precision, classes, prototypes)
    if system in ("image-crop", "feature-crop"):
        return SamClipSystem(system, tiny, device, precision, classes, prototypes, crop_chunk)
    raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")


__all__ = ["SYSTEMS", "Inputs", "OvsamSystem", "SamClipSystem", "StageClock", "System", "build_system",
           "make_inputs", "tiny_convnext_config"]
