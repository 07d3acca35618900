"""Plain Segment Anything, built from ``segment_anything``'s modules at any size."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ..config import SamConfig


class SamModel(Sam):
    """``segment_anything.Sam`` with the project's model interface. State-dict keys equal Meta's checkpoints."""

    kind = "sam"

    def __init__(self, config: SamConfig) -> None:
        dec = config.decoder
        grid = config.image_size // config.patch_size
        super().__init__(
            image_encoder=ImageEncoderViT(
                img_size=config.image_size,
                patch_size=config.patch_size,
                embed_dim=config.encoder_embed_dim,
                depth=config.encoder_depth,
                num_heads=config.encoder_num_heads,
                mlp_ratio=config.mlp_ratio,
                out_chans=dec.embed_dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=config.window_size,
                global_attn_indexes=tuple(config.encoder_global_attn_indexes),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dec.embed_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(config.image_size, config.image_size),
                mask_in_chans=dec.mask_in_chans,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=config.num_multimask_outputs,
                transformer=TwoWayTransformer(
                    depth=dec.depth, embedding_dim=dec.embed_dim, mlp_dim=dec.mlp_dim, num_heads=dec.num_heads
                ),
                transformer_dim=dec.embed_dim,
                iou_head_depth=dec.iou_head_depth,
                iou_head_hidden_dim=dec.iou_head_hidden_dim,
            ),
            pixel_mean=list(config.pixel_mean),
            pixel_std=list(config.pixel_std),
        )
        self.config = config

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def low_res_size(self) -> int:
        return self.config.image_size // self.config.patch_size * 4

    @property
    def has_iou_head(self) -> bool:
        return True

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, 3, S, S]`` normalised, padded input -> image embeddings ``[B, C, S/16, S/16]``."""
        return self.image_encoder(x)
