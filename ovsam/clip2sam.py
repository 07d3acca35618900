"""One CLIP2SAM training step's forward pass and losses (OVSAM_SPEC §4.3), on batches from
``pipeline.training.train_data`` (any object with the :class:`~pipeline.training.train_data.TrainSample` fields works).

- The CLIP trunk, the SAM2CLIP neck and the prompt encoder are frozen and run without gradient, unless the trunk
  or the neck was unfrozen (``ovsam.training.UNFREEZABLE``): then the losses reach them too.
- Classification: RoIAlign on the (trainable) FPN with the **GT boxes** of every prompt, ``roi_conv``, cosine
  logits against the dataset's text embeddings, :func:`~ovsam.losses.classification_loss`. The label token's
  output does not reach the logits in the published model (OVSAM_SPEC §6.1), so for box- and image-level batches,
  which train only the classifier, the mask decoder is not run at all: its output could not change the loss.
- Masks (mask-level batches): box prompts and point prompts (one positive click) are encoded separately and put
  back in prompt order, decoded against the repeated image embedding, and scored with the point-sampled
  :func:`~ovsam.losses.mask_loss` against the padded GT masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

from . import losses as L
from .modeling import recognition as R
from .modeling.ovsam import OvsamImageFeatures, OvsamModel


@dataclass(frozen=True)
class LossConfig:
    """Loss settings; defaults are the published ones except ``mask_points`` (see ``ovsam train --help``)."""

    cls_weight: float = 2.0
    bg_weight: float = 0.1
    mask_points: int = L.PUBLISHED_NUM_POINTS
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    bce_weight: float = 5.0
    dice_weight: float = 5.0


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def batch_inputs(model: OvsamModel, batch: Sequence[Any]) -> torch.Tensor:
    """Normalised ``[B, 3, S, S]`` inputs, zero outside each image's ``input_hw`` (as inference pads)."""
    x = torch.stack([s.image for s in batch]).to(model.device).float()
    x = (x - model.pixel_mean) / model.pixel_std
    for i, s in enumerate(batch):
        h, w = s.input_hw
        x[i, :, h:, :] = 0
        x[i, :, :, w:] = 0
    return x


def encode_prompts(model: OvsamModel, boxes: torch.Tensor, points: torch.Tensor,
                   is_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse ``[N, 2, C]`` and dense embeddings of N prompts: a box where ``is_point`` is False, else one
    positive click (SAM pads it with a "not a point" token, so both kinds give 2 tokens)."""
    pe = model.prompt_encoder
    n = boxes.shape[0]
    with torch.no_grad():
        sparse = None
        dense = None
        for mask, kwargs in ((~is_point, lambda idx: {"points": None, "boxes": boxes[idx]}),
                             (is_point, lambda idx: {"points": (points[idx][:, None, :],
                                                                torch.ones(int(idx.numel()), 1,
                                                                           device=boxes.device)),
                                                     "boxes": None})):
            idx = torch.nonzero(mask, as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            sp, dn = pe(masks=None, **kwargs(idx))
            if sparse is None:
                sparse = sp.new_zeros(n, sp.shape[1], sp.shape[2])
                dense = dn[:1].expand(n, -1, -1, -1)
            sparse[idx] = sp
    assert sparse is not None and dense is not None
    return sparse, dense


def clip2sam_losses(model: OvsamModel, batch: Sequence[Any], text: torch.Tensor | None,
                    cfg: LossConfig = LossConfig(), generator: torch.Generator | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Losses of one single-dataset batch and training statistics.

    ``text`` is the dataset's ``[C, P, D]`` class embeddings (None for a class-agnostic dataset: no
    classification loss). Returns ``({"loss", "loss_cls"[, "loss_mask", "loss_dice"]}, {"prompts", "correct",
    "labelled"})``; ``correct`` counts top-1 hits of the classifier over the labelled prompts."""
    kinds = {s.kind for s in batch}
    if len(kinds) != 1 or len({s.dataset for s in batch}) != 1:
        raise ValueError(f"a batch must hold one dataset of one kind, got datasets "
                         f"{sorted({s.dataset for s in batch})} and kinds {sorted(kinds)}")
    kind = kinds.pop()
    dev = model.device
    x = batch_inputs(model, batch)
    with torch.set_grad_enabled(_trains(model.backbone)):
        clip_feats = model.backbone(x)
    fpn_feats = model.fpn_neck(clip_feats)
    image_index = torch.cat([torch.full((len(s.labels),), i, dtype=torch.long) for i, s in enumerate(batch)]).to(dev)
    boxes = torch.cat([s.boxes for s in batch]).to(dev)
    labels = torch.cat([s.labels for s in batch]).to(dev)
    losses: dict[str, torch.Tensor] = {}
    stats = {"prompts": float(len(labels)), "correct": 0.0, "labelled": 0.0}
    if text is not None and text.shape[0] > 0:
        rec = model.config.recognition
        rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
        roi_feats = R.multilevel_roi_align(fpn_feats, rois, model.config.neck.strides, rec.roi_size,
                                           rec.finest_scale)
        logits = R.class_logits(model.mask_decoder.roi_embeddings(roi_feats), text.to(dev), rec.logit_scale)
        losses["loss_cls"] = L.classification_loss(logits, labels, bg_weight=cfg.bg_weight,
                                                   loss_weight=cfg.cls_weight)
        labelled = labels >= 0
        stats["labelled"] = float(labelled.sum())
        stats["correct"] = float((logits[:, :-1].argmax(1) == labels)[labelled].sum())
    else:
        losses["loss_cls"] = sum(f.sum() for f in fpn_feats) * 0.0
    if kind == "mask":
        with torch.set_grad_enabled(_trains(model.neck)):
            image_embeddings = model.neck(clip_feats)
        features = OvsamImageFeatures(image_embeddings, clip_feats, fpn_feats)
        points = torch.cat([s.points for s in batch]).to(dev)
        is_point = torch.cat([s.is_point for s in batch]).to(dev)
        sparse, dense = encode_prompts(model, boxes, points, is_point)
        mask_logits, _ = model.decode(features, image_index, sparse, dense)
        gt = torch.cat([s.masks for s in batch]).to(dev)
        losses.update(L.mask_loss(mask_logits, gt, num_points=cfg.mask_points, oversample_ratio=cfg.oversample_ratio,
                                  importance_sample_ratio=cfg.importance_sample_ratio, bce_weight=cfg.bce_weight,
                                  dice_weight=cfg.dice_weight, generator=generator))
    losses["loss"] = sum(losses.values())
    return losses, stats


class RegionProbe(nn.Module):
    """The classifier of the trunk warm-up (``ovsam train --trunk-warmup``): the spatial mean of a RoIAlign of one
    CLIP stage (C4, stride 16, by default) and one linear classifier per dataset.

    It exists for training only and is not part of the model. A linear classifier on spatially averaged C4 features
    can only be right if the trunk's channels tell the classes apart (shape included), so the region
    classification loss trains the trunk to do that before the CLIP2SAM losses start. It does not score against the
    text embeddings: a random text tower's class embeddings can be near-parallel, which slows such a classifier
    down."""

    def __init__(self, in_channels: int, num_classes: Mapping[str, int], *, level: int = 2, stride: int = 16,
                 roi_size: int = 7) -> None:
        super().__init__()
        self.level, self.stride, self.roi_size = level, stride, roi_size
        self.datasets = tuple(num_classes)
        self.classifiers = nn.ModuleList(nn.Linear(in_channels, int(n)) for n in num_classes.values())

    @classmethod
    def for_model(cls, model: OvsamModel, num_classes: Mapping[str, int], level: int = 2) -> "RegionProbe":
        return cls(model.config.clip.stage_channels[level], num_classes, level=level,
                   stride=model.config.neck.strides[level], roi_size=model.config.clip.roi_size)

    def features(self, clip_feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``[N, C]``: the spatial mean of ``rois`` (``[N, 5]``: image index, x1, y1, x2, y2 in input pixels)."""
        feat = clip_feats[self.level]
        pooled = roi_align(feat, rois.to(feat.dtype), output_size=self.roi_size, spatial_scale=1.0 / self.stride,
                           sampling_ratio=0, aligned=True)
        return pooled.mean(dim=(2, 3))

    def forward(self, clip_feats: Sequence[torch.Tensor], rois: torch.Tensor, dataset: str) -> torch.Tensor:
        """``[N, K + 1]`` logits over ``dataset``'s K classes, background last (always 0)."""
        logits = self.classifiers[self.datasets.index(dataset)](self.features(clip_feats, rois))
        return torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)


def trunk_warmup_losses(model: OvsamModel, probe: RegionProbe, batch: Sequence[Any],
                        cfg: LossConfig = LossConfig()) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Region classification of one batch's GT boxes through the CLIP trunk and ``probe`` (the trunk warm-up).

    Returns ``({"loss", "loss_probe"}, stats)`` like :func:`clip2sam_losses`; a batch of a dataset the probe has
    no classifier for (a class-agnostic one) gives a zero loss."""
    datasets = {s.dataset for s in batch}
    if len(datasets) != 1:
        raise ValueError(f"a batch must hold one dataset, got {sorted(datasets)}")
    dataset = datasets.pop()
    dev = model.device
    clip_feats = model.backbone(batch_inputs(model, batch), num_stages=probe.level + 1)
    image_index = torch.cat([torch.full((len(s.labels),), i, dtype=torch.long) for i, s in enumerate(batch)]).to(dev)
    boxes = torch.cat([s.boxes for s in batch]).to(dev)
    labels = torch.cat([s.labels for s in batch]).to(dev)
    stats = {"prompts": float(len(labels)), "correct": 0.0, "labelled": 0.0}
    if dataset not in probe.datasets:
        loss = sum(f.sum() for f in clip_feats) * 0.0 + sum(p.sum() for p in probe.parameters()) * 0.0
    else:
        rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
        logits = probe(clip_feats, rois, dataset)
        loss = L.classification_loss(logits, labels, bg_weight=cfg.bg_weight, loss_weight=1.0)
        labelled = labels >= 0
        stats["labelled"] = float(labelled.sum())
        stats["correct"] = float((logits[:, :-1].argmax(1) == labels)[labelled].sum())
    return {"loss_probe": loss, "loss": loss}, stats


__all__ = ["LossConfig", "RegionProbe", "batch_inputs", "clip2sam_losses", "encode_prompts", "trunk_warmup_losses"]
