"""OV-SAM mask decoder with a label token, plus the CLIP2SAM RoI recognition layers (OVSAM_SPEC §1.5–1.6)."""

from __future__ import annotations

import math

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
        dense_shared: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict one mask per prompt.

        Arguments:
          image_embeddings: ``[B, C, h, w]`` image embeddings.
          image_pe: ``[1, C, h, w]`` dense positional encoding.
          sparse_prompt_embeddings: ``[N, T, C]`` prompt tokens.
          dense_prompt_embeddings: ``[N, C, h, w]``.
          image_index: ``[N]`` which image each prompt belongs to (all 0 when None and B == 1).
          dense_shared: every prompt's dense embedding is the same (prompts without a mask input: SAM's
            no-mask embedding). The image tokens entering the first layer are then the same for all prompts of an
            image, and that layer's image-side projections are computed once per image (:meth:`_two_way`).

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
            image_index = torch.zeros(n, dtype=torch.long, device=tokens.device)
        b, c, h, w = n, *image_embeddings.shape[1:]
        if dense_shared and n:
            hs, src = self._two_way(image_embeddings + dense_prompt_embeddings[:1], image_pe, tokens, image_index)
        else:
            src = image_embeddings[image_index] + dense_prompt_embeddings
            hs, src = md.transformer(src, torch.repeat_interleave(image_pe, n, dim=0), tokens)
        label_query = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = md.output_upscaling(src)
        hyper_in = md.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
        return masks, label_query

    def _two_way(self, src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``TwoWayTransformer.forward`` for prompts whose image tokens enter the first layer unchanged from the
        image (``src`` ``[B, C, h, w]``, one per image): the first layer's token-to-image keys and values and its
        image-to-token queries are projections of those tokens, so they are computed per image and shared by the
        image's prompts. The other layers are the transformer's own. Equal to the transformer on per-prompt copies
        of ``src`` up to float rounding. Returns ``(queries [N, T, C], keys [N, h*w, C])``."""
        t = self.mask_decoder.transformer
        first = t.layers[0]
        keys = src.flatten(2).permute(0, 2, 1)  # [B, hw, C]
        key_pe = image_pe.flatten(2).permute(0, 2, 1)  # [1, hw, C]
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))  # the first layer skips the PE here
        t2i = first.cross_attn_token_to_image
        k_img, v_img = t2i.k_proj(keys + key_pe), t2i.v_proj(keys)
        out = _attend(t2i, t2i.q_proj(queries + tokens), _per_prompt(k_img, image_index),
                      _per_prompt(v_img, image_index))
        queries = first.norm2(queries + out)
        queries = first.norm3(queries + first.mlp(queries))
        i2t = first.cross_attn_image_to_token
        out = _attend(i2t, _per_prompt(i2t.q_proj(keys + key_pe), image_index), i2t.k_proj(queries + tokens),
                      i2t.v_proj(queries))
        keys = first.norm4(_per_prompt(keys, image_index) + out)
        for layer in t.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
        out = t.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        return t.norm_final_attn(queries + out), keys

    def roi_embeddings(self, roi_feats: torch.Tensor) -> torch.Tensor:
        """``[N, fpn_channels, r, r]`` RoI features -> ``[N, text_dim]`` (roi_conv + ReLU, spatial mean)."""
        return self.roi_conv(roi_feats).mean(dim=(2, 3))


def _per_prompt(x: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Per-image rows ``[B, ...]`` -> per-prompt rows ``[N, ...]`` (a view when there is one image)."""
    if x.shape[0] == 1:
        return x.expand(image_index.shape[0], *x.shape[1:])
    return x[image_index]


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything ``Attention.forward`` after its three input projections (``q``/``k``/``v`` projected)."""
    q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
    weights = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(attn._recombine_heads(weights @ v))
