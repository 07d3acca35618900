"""The Open-Vocabulary SAM model: tensors in, tensors out (OVSAM_SPEC §0–1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ..config import OvsamConfig
from . import recognition as R
from .clip_backbone import ClipBackbone, ClipText
from .fpn import FPN
from .ovsam_head import OvsamHead
from .sam2clip_neck import Sam2ClipNeck


@dataclass
class OvsamImageFeatures:
    """Per-batch image features. ``image_embeddings`` ``[B, C, S/16, S/16]``; ``clip_feats`` the four CLIP stages;
    ``fpn_feats`` the four FPN levels."""

    image_embeddings: torch.Tensor
    clip_feats: list[torch.Tensor]
    fpn_feats: list[torch.Tensor]


@dataclass
class RegionOutput:
    """Recognition for N regions. Embeddings are un-normalised ``[N, D]``; ``clip_valid`` ``[N]`` bool is the
    ensemble gate; ``scores`` ``[N, C + 1]`` are fused log-scores (background last)."""

    head_embeddings: torch.Tensor
    clip_embeddings: torch.Tensor | None
    clip_valid: torch.Tensor | None
    scores: torch.Tensor | None = None


class OvsamModel(nn.Module):
    """Frozen CLIP trunk -> SAM2CLIP neck -> SAM prompt encoder -> label-token decoder, and the CLIP2SAM
    recognition head (FPN over the CLIP stages, RoIAlign, roi_conv, cosine classifier) with the frozen-CLIP
    ensemble.

    Submodule names give the state-dict prefixes: ``backbone`` (CLIP visual, frozen), ``text`` (CLIP text tower,
    frozen), ``neck`` (SAM2CLIP), ``prompt_encoder`` (SAM), ``mask_decoder`` (the head; keys as in the released
    ``clip2sam`` files), ``fpn_neck``.
    """

    kind = "ovsam"

    def __init__(self, config: OvsamConfig, clip: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.backbone = ClipBackbone(clip.visual, config.clip.roi_size)
        self.text = ClipText(clip, tokenizer)
        self.neck = Sam2ClipNeck(config.neck, config.clip.stage_channels, config.image_size)
        grid = self.neck.grid_size
        dec = config.decoder
        self.prompt_encoder = PromptEncoder(
            embed_dim=dec.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=dec.mask_in_chans,
        )
        text_dim = int(self.text.clip.text_projection.shape[-1])
        self.text_dim = text_dim
        self.mask_decoder = OvsamHead(dec, config.recognition, text_dim)
        self.fpn_neck = FPN(config.clip.stage_channels, config.recognition.fpn_channels)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), False)

    # --- shared interface with SamModel -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def low_res_size(self) -> int:
        return self.neck.grid_size * 4

    @property
    def has_iou_head(self) -> bool:
        return False

    @property
    def clip_model_name(self) -> str:
        return self.config.clip.name

    @property
    def tokenizer(self):
        return self.text.tokenizer

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP text embeddings ``[N, D]`` for token ids ``[N, L]``."""
        return self.text.encode_text(tokens.to(self.device), normalize=normalize)

    def encode_image(self, x: torch.Tensor) -> OvsamImageFeatures:
        """``x`` ``[B, 3, S, S]`` normalised, padded input -> image embedding, CLIP stages and FPN levels."""
        clip_feats = self.backbone(x)
        return OvsamImageFeatures(
            image_embeddings=self.neck(clip_feats), clip_feats=clip_feats, fpn_feats=self.fpn_neck(clip_feats)
        )

    def decode(
        self,
        features: OvsamImageFeatures,
        image_index: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        dense_shared: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the label-token decoder for N encoded prompts. Returns ``mask_logits [N, 1, s, s]`` (s = 4 x the
        embedding grid) and ``label_query [N, C]``, in the decoder's dtype: the decoder runs outside autocast, on
        inputs cast to its weights' dtype (float32 unless a reduced precision cast it). ``dense_shared``: no
        prompt has a mask input, so all share one dense embedding (see :meth:`OvsamHead.forward`)."""
        dtype = self.mask_decoder.label_token.weight.dtype
        with torch.autocast(sparse.device.type, enabled=False):
            return self.mask_decoder(
                features.image_embeddings.to(dtype), self.prompt_encoder.get_dense_pe().to(dtype), sparse.to(dtype),
                dense.to(dtype), image_index=image_index, dense_shared=dense_shared
            )

    # --- recognition --------------------------------------------------------------------------------------------
    def region_embeddings(
        self,
        features: OvsamImageFeatures,
        image_index: torch.Tensor,
        roi_boxes: torch.Tensor,
        mask_logits: torch.Tensor,
        clip_boxes: torch.Tensor | None = None,
    ) -> RegionOutput:
        """Region embeddings from the CLIP2SAM head and the frozen-CLIP branch.

        Arguments:
          image_index: ``[N]`` image of each region.
          roi_boxes: ``[N, 4]`` xyxy in the network-input frame for the FPN RoIs (the mask-derived box at inference,
            the ground-truth box in training).
          mask_logits: ``[N, 1, s, s]`` low-res mask logits (gate ``v`` and, for ConvNeXt, mask pooling).
          clip_boxes: ``[N, 4]`` boxes for the frozen-CLIP RoIAlign (RN models); defaults to ``roi_boxes``.
        """
        rec = self.config.recognition
        rois = torch.cat([image_index[:, None].to(roi_boxes.dtype), roi_boxes], dim=1)
        roi_feats = R.multilevel_roi_align(features.fpn_feats, rois, self.config.neck.strides, rec.roi_size,
                                           rec.finest_scale)
        head_emb = self.mask_decoder.roi_embeddings(roi_feats)
        if not rec.ensemble:
            return RegionOutput(head_emb, None, None)
        c5 = features.clip_feats[-1]
        valid = R.mask_valid_for_clip(mask_logits, tuple(c5.shape[-2:]))
        if self.backbone.has_box_pool:
            boxes = roi_boxes if clip_boxes is None else clip_boxes
            clip_rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
            clip_emb = self.backbone.box_embeddings(c5, clip_rois, stride=self.config.neck.strides[-1])
        else:
            clip_emb = self.backbone.mask_embeddings(c5, image_index, mask_logits)
        return RegionOutput(head_emb, clip_emb, valid)

    def classify(self, regions: RegionOutput, text: torch.Tensor | R.ClassPrototypes, indicator: torch.Tensor
                 ) -> torch.Tensor:
        """Fused log-scores ``[N, C + 1]`` for region embeddings against text prototypes ``[C, P, D]`` (or
        :class:`~ovsam.modeling.recognition.ClassPrototypes`)."""
        rec = self.config.recognition
        q = R.class_logits(regions.head_embeddings, text, rec.logit_scale)
        c = None if regions.clip_embeddings is None else R.class_logits(regions.clip_embeddings, text, rec.logit_scale)
        return R.fuse_scores(q, c, regions.clip_valid, indicator, rec.alpha, rec.beta)
