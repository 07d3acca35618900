"""The result record of a prediction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .prompts import PromptSet


@dataclass
class Prediction:
    """Masks (and, for OV-SAM with a vocabulary, labels) for N prompts of one image.

    Arrays are numpy from ``predict``/``predict_batch`` and torch tensors from ``predict_torch``. With
    ``multimask_output=False`` (always, for OV-SAM) M = 1 and the M axis is dropped from ``masks``,
    ``iou_scores`` and ``boxes_xyxy``.

    Attributes:
      masks: ``[N, H, W]`` (or ``[N, M, H, W]``) bool in the original frame; float logits if ``return_logits``.
      low_res_logits: ``[N, M, s, s]`` decoder logits (s = 256 for 1024-pixel models); usable as ``mask_input``.
      iou_scores: ``[N]`` (or ``[N, M]``). SAM models: the IoU head's prediction. OV-SAM has no IoU head: this is
        the mask's stability score (IoU of the low-res mask at logit thresholds +1 and -1), in [0, 1].
      boxes_xyxy: ``[N, 4]`` (or ``[N, M, 4]``) tight box of each mask in original pixels, exclusive max; zeros for
        an empty mask.
      labels: ``[N]`` vocabulary index of the best class (OV-SAM with a vocabulary), else None.
      label_scores: ``[N, C]`` class probabilities as the published code forms them: ``softmax(s)[:, :C]`` of the
        C + 1 fused log-scores ``s_k = log(q_k^(1 - w v) * c_k^(w v))``, the weighted geometric mean of the CLIP2SAM
        head's and the frozen CLIP's class probabilities (OVSAM_SPEC §1.7, §1.9), normalised with the background
        and the background then dropped; 0 for excluded classes; else None. ``labels`` is their argmax.
      background_scores: ``[N]`` the background's probability ``softmax(s)[:, C]``; with ``label_scores`` a row
        sums to 1. Else None.
      label_names: names of ``labels``, else None.
      head_embeddings / clip_embeddings: ``[N, D]`` region embeddings of the CLIP2SAM head and the frozen-CLIP
        branch; with ``clip_valid`` ``[N]`` they re-score regions against any vocabulary.
      prompt: the prompts answered, in the original frame.
    """

    masks: Any
    low_res_logits: Any
    iou_scores: Any
    boxes_xyxy: Any
    prompt: PromptSet = field(default_factory=PromptSet)
    labels: Any = None
    label_scores: Any = None
    background_scores: Any = None
    label_names: list[str] | None = None
    head_embeddings: Any = None
    clip_embeddings: Any = None
    clip_valid: Any = None

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def numpy(self) -> "Prediction":
        """A copy with every tensor converted to numpy."""

        def conv(v):
            return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v

        return Prediction(
            masks=conv(self.masks), low_res_logits=conv(self.low_res_logits), iou_scores=conv(self.iou_scores),
            boxes_xyxy=conv(self.boxes_xyxy), prompt=self.prompt, labels=conv(self.labels),
            label_scores=conv(self.label_scores), background_scores=conv(self.background_scores),
            label_names=self.label_names,
            head_embeddings=conv(self.head_embeddings), clip_embeddings=conv(self.clip_embeddings),
            clip_valid=conv(self.clip_valid),
        )

    def to_records(self) -> list[dict]:
        """One plain dict per prompt with RLE masks (``masks`` must be boolean ``[N, H, W]``)."""
        from .masks import encode_rle

        p = self.numpy()
        if p.masks.ndim != 3 or p.masks.dtype != bool:
            raise ValueError("to_records needs boolean single-output masks [N, H, W]")
        rles = encode_rle(p.masks)
        out = []
        for i, rle in enumerate(rles):
            rec = {"mask_rle": rle, "area": int(p.masks[i].sum()), "box_xyxy": p.boxes_xyxy[i].tolist(),
                   "quality": float(p.iou_scores[i])}
            if p.labels is not None:
                rec["label"] = int(p.labels[i])
                rec["label_score"] = float(p.label_scores[i, p.labels[i]])
                if p.background_scores is not None:
                    rec["background_score"] = float(p.background_scores[i])
                if p.label_names is not None:
                    rec["label_name"] = p.label_names[int(p.labels[i])]
            out.append(rec)
        return out

