"""The synthetic-world packer: train and held-out shard sets of ``pipeline.training.synthetic`` scenes.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Any


from schemas.training import ClassesFile, TrainingRecord

from pipeline.training.packers.writer import PackedSample, PackPlan, PackSummary, SkipItem, write_plan
from pipeline.training.packers.common import encode_mask

logger = logging.getLogger(__name__)


SYNTHETIC_SPLITS = ("train", "heldout")


def plan_synthetic(kind: str, num_samples: int, *, split: str = "train", seed: int = 0,
                   max_objects: int | None = None) -> PackPlan:
    """Plan ``num_samples`` synthetic scenes (``pipeline/training/synthetic.py``) of one split.

    Scene ``i`` is drawn from its own generator seeded by ``(seed, split, i)``, so splits never share scenes and
    a resumed run draws the same scenes. ``kind`` ``"mask"``: every visible object's box, class and exact visible
    mask; ``"box"``: boxes and classes; ``"image"``: the class of the largest visible object as ``image_labels``
    (scenes hold one object unless ``max_objects`` says otherwise; default 4 for box/mask).
    """
    import numpy as np

    from pipeline.training.synthetic import CLASS_NAMES, SIZES, draw_scene

    if kind not in ("image", "box", "mask"):
        raise ValueError(f"kind must be image, box or mask, got {kind!r}")
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    objects_max = max_objects if max_objects is not None else (1 if kind == "image" else 4)
    if objects_max < 1:
        raise ValueError(f"max_objects must be >= 1, got {objects_max}")
    split_code = SYNTHETIC_SPLITS.index(split)
    class_index = {n: i for i, n in enumerate(CLASS_NAMES)}

    def load(i: int) -> PackedSample:
        from PIL import Image

        rng = np.random.default_rng([seed, split_code, i])
        height, width = SIZES[int(rng.integers(len(SIZES)))]
        image, objects = draw_scene(rng, height, width, int(rng.integers(1, objects_max + 1)))
        if not objects:
            raise SkipItem("empty_scene", f"scene {i} has no visible object")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        labels = [class_index[o.name] for o in objects]
        boxes = [list(o.box_xyxy) for o in objects]
        if kind == "image":
            largest = max(range(len(objects)), key=lambda j: int(objects[j].mask.sum()))
            record = TrainingRecord(dataset="synthetic", kind="image", width=width, height=height, source_id=i,
                                    image_labels=[labels[largest]])
        else:
            masks = [encode_mask(o.mask) for o in objects] if kind == "mask" else []
            record = TrainingRecord(dataset="synthetic", kind=kind, width=width, height=height, source_id=i,
                                    labels=labels, boxes=boxes, masks=masks)
        return PackedSample(f"{split}_{i:08d}", "jpg", buf.getvalue(), record)

    classes = ClassesFile(dataset="synthetic", kind=kind, classes=list(CLASS_NAMES), split=None, ids=None,
                          source={"packer": "synthetic", "split": split, "seed": seed})
    settings = {"packer": "synthetic", "kind": kind, "num_samples": num_samples, "split": split, "seed": seed,
                "max_objects": objects_max}
    return PackPlan(classes=classes, settings=settings, items=range(num_samples), load=load)


def pack_synthetic(output: str, *, kind: str, num_train: int, num_heldout: int, seed: int = 0,
                   max_objects: int | None = None, **write_options: Any) -> dict[str, PackSummary]:
    """Write ``<output>/train`` and ``<output>/heldout`` shard sets of synthetic scenes (see
    :func:`plan_synthetic`); ``write_options`` go to :func:`~pipeline.training.packers.writer.write_plan`."""
    out = {}
    for split, count in (("train", num_train), ("heldout", num_heldout)):
        plan = plan_synthetic(kind, count, split=split, seed=seed, max_objects=max_objects)
        out[split] = write_plan(plan, posixpath.join(output.rstrip("/"), split), **write_options)
    return out


