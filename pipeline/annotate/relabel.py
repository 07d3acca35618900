"""Re-labelling stored instances: new labels, scores and top-k from the region embeddings an output stored with
``--store-embeddings``, through the model's own classifier and ensemble (``ovsam relabel``, and the model stage for
outputs whose vocabulary changed).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np


logger = logging.getLogger(__name__)


def relabel_rows(rows: list[dict], vocabulary: Any, recognition: Any, top_k: int) -> list[dict]:
    """New labels for stored instance rows from their region embeddings and ``vocabulary``.

    Uses the same classifier and ensemble as the model (``recognition`` = the model config's recognition
    section). Rows without stored embeddings raise ``ValueError``: re-run the job with ``--store-embeddings``.
    """
    import torch

    from ovsam.modeling import recognition as R

    if not rows:
        return []
    if rows[0].get("head_embedding") is None:
        raise ValueError("this output has no stored region embeddings; annotate with --store-embeddings to relabel")
    head = torch.tensor(np.asarray([r["head_embedding"] for r in rows], dtype=np.float32))
    text = vocabulary.embeddings
    q = R.class_logits(head, text, recognition.logit_scale)
    c = valid = None
    if rows[0].get("clip_embedding") is not None:
        c = R.class_logits(torch.tensor(np.asarray([r["clip_embedding"] for r in rows], dtype=np.float32)), text,
                           recognition.logit_scale)
        valid = torch.tensor([bool(r["clip_valid"]) for r in rows])
    scores = R.fuse_scores(q, c, valid, vocabulary.indicator, recognition.alpha, recognition.beta)
    full = R.fused_softmax(scores)
    probs = full[:, :-1]
    labels = scores[:, :-1].argmax(dim=-1)
    k = min(top_k, len(vocabulary))
    top = probs.topk(k, dim=1)
    out = []
    for i, r in enumerate(rows):
        label = int(labels[i])
        out.append({**r, "label": label, "label_name": vocabulary.names[label], "label_score": float(probs[i, label]),
                    "background_score": float(full[i, -1]),
                    "topk_labels": top.indices[i].tolist(), "topk_scores": top.values[i].tolist()})
    return out


