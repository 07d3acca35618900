"""OV-SAM mask decoder with a label token, plus the CLIP2SAM RoI recognition layers (OVSAM_SPEC §1.5–1.6)."""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from ..config import DecoderConfig, RecognitionConfig
from .fpn import ConvUnit


class SingleMaskDecoder(MaskDecoder):
    """SAM's ``MaskDecoder`` with one mask token and no IoU token or IoU head (their keys do not exist)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(
            transformer_dim=cfg.embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.depth, embedding_dim=cfg.embed_dim, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads
            ),
            num_multimask_outputs=0,
        )
        del self.iou_token
        del self.iou_prediction_head

    def forward(self, *args, **kwargs):  # type: ignore[override]
        raise TypeError("SingleMaskDecoder is driven by OvsamHead; call OvsamHead.forward")


class OvsamHead(nn.Module):
    """Label-token mask decoder.

    Tokens per prompt are ``[label_token, mask_token, sparse prompt tokens...]``; the two-way transformer attends
    them to the image embedding. Outputs the single mask's low-res logits and the label token's output query.
    ``label_mlp`` is kept for checkpoint compatibility: in the published model its output is multiplied by zero, so
    it never reaches the logits and is not evaluated here. ``roi_conv`` (1x1 conv + ReLU) maps FPN RoI features to
    the CLIP embedding width.
    """

    def __init__(self, cfg: DecoderConfig, rec: RecognitionConfig, text_dim: int) -> None:
        super().__init__()
        self.mask_decoder = SingleMaskDecoder(cfg)
        self.label_token = nn.Embedding(1, cfg.embed_dim)
        self.label_mlp = MLP(cfg.embed_dim, cfg.embed_dim, text_dim, rec.label_mlp_layers)
        self.roi_conv = nn.Sequential(
            ConvUnit(nn.Conv2d(rec.fpn_channels, text_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True))
        )

    def init_roi_conv(self) -> None:
        """Kaiming-normal (fan_out, ReLU) init of ``roi_conv`` (the published training initialisation)."""
        nn.init.kaiming_normal_(self.roi_conv[0].conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict one mask per prompt.

        Arguments:
          image_embeddings: ``[B, C, h, w]`` image embeddings.
          image_pe: ``[1, C, h, w]`` dense positional encoding.
          sparse_prompt_embeddings: ``[N, T, C]`` prompt tokens.
          dense_prompt_embeddings: ``[N, C, h, w]``.
          image_index: ``[N]`` which image each prompt belongs to (all 0 when None and B == 1).

        Returns:
          ``mask_logits [N, 1, 4h, 4w]`` and ``label_query [N, C]``.
        """
        md = self.mask_decoder
        n = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.label_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_index is None:
            if image_embeddings.shape[0] != 1:
                raise ValueError("image_index is required when more than one image embedding is given")
            src = torch.repeat_interleave(image_embeddings, n, dim=0)
        else:
            src = image_embeddings[image_index]
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, n, dim=0)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        label_query = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = md.output_upscaling(src)
        hyper_in = md.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
        return masks, label_query

    def roi_embeddings(self, roi_feats: torch.Tensor) -> torch.Tensor:
        """``[N, fpn_channels, r, r]`` RoI features -> ``[N, text_dim]`` (roi_conv + ReLU, spatial mean)."""
        return self.roi_conv(roi_feats).mean(dim=(2, 3))
