"""Readers of committed annotation output, the COCO exporter and re-labelling from stored region embeddings.

Only committed shards are read: a shard counts iff ``_manifest/<shard>.json`` exists (the commit point).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class ShardOutput:
    """The committed tables of one shard (pyarrow tables)."""

    shard: str
    images: Any
    instances: Any


def committed_shards(fs: Any, output: str) -> list[str]:
    """Shard names with a manifest under ``output``, sorted."""
    root = output.rstrip("/")
    fs.invalidate_cache(f"{root}/_manifest")  # s3fs would list from a cache that predates the workers' commits
    try:
        paths = fs.glob(f"{root}/_manifest/*.json")
    except FileNotFoundError:
        return []
    return sorted(p.rsplit("/", 1)[-1][: -len(".json")] for p in paths)


def iter_committed(fs: Any, output: str, columns: list[str] | None = None) -> Iterator[ShardOutput]:
    """Yield each committed shard's ``images`` and ``instances`` tables."""
    import pyarrow.parquet as pq

    root = output.rstrip("/")
    for shard in committed_shards(fs, output):
        with fs.open(f"{root}/images/{shard}.parquet", "rb") as f:
            images = pq.read_table(f)
        with fs.open(f"{root}/instances/{shard}.parquet", "rb") as f:
            instances = pq.read_table(f, columns=columns)
        yield ShardOutput(shard, images, instances)


def read_run(fs: Any, output: str) -> dict:
    with fs.open(f"{output.rstrip('/')}/run.json", "r") as f:
        return json.load(f)


def export_coco(fs: Any, output: str, class_names: list[str] | None = None) -> dict:
    """COCO instances JSON (RLE segmentation) for every committed image with status ``ok``.

    Image ids are assigned in (shard, key) order starting at 1; ``file_name`` is ``<shard>/<key>``; category ids are
    vocabulary index + 1; each annotation carries ``score`` (the label score) and ``iscrowd = 0``.
    """
    if class_names is None:
        class_names = list(read_run(fs, output)["vocabulary"]["names"])
    images, annotations = [], []
    cols = ["image_key", "instance_index", "mask_rle", "area", "box_xyxy", "label", "label_score"]
    for part in iter_committed(fs, output, columns=cols):
        img_rows = sorted(part.images.to_pylist(), key=lambda r: r["image_key"])
        ids = {}
        for row in img_rows:
            if row["status"] != "ok":
                continue
            image_id = len(images) + 1
            ids[row["image_key"]] = image_id
            images.append({"id": image_id, "file_name": f"{part.shard}/{row['image_key']}",
                           "width": int(row["width"]), "height": int(row["height"])})
        inst = sorted(part.instances.to_pylist(), key=lambda r: (r["image_key"], r["instance_index"]))
        for row in inst:
            x0, y0, x1, y1 = row["box_xyxy"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": ids[row["image_key"]], "category_id": int(row["label"]) + 1,
                "segmentation": {"size": list(row["mask_rle"]["size"]), "counts": row["mask_rle"]["counts"]},
                "area": float(row["area"]), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                "score": float(row["label_score"]),
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(class_names)]
    return {"info": {"description": f"ovsam annotations of {output}"}, "images": images,
            "annotations": annotations, "categories": categories}


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
    probs = R.fused_probabilities(scores)
    labels = scores[:, :-1].argmax(dim=-1)
    k = min(top_k, len(vocabulary))
    top = probs.topk(k, dim=1)
    out = []
    for i, r in enumerate(rows):
        label = int(labels[i])
        out.append({**r, "label": label, "label_name": vocabulary.names[label], "label_score": float(probs[i, label]),
                    "topk_labels": top.indices[i].tolist(), "topk_scores": top.values[i].tolist()})
    return out
