"""Prompt validation and normalisation (original-frame numpy prompts -> batched arrays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptSet:
    """N prompts for one image in the original frame. Any field may be None.

    ``point_coords`` ``[N, K, 2]`` (x, y); ``point_labels`` ``[N, K]`` (1 positive, 0 negative);
    ``boxes`` ``[N, 4]`` xyxy; ``mask_input`` ``[N, 1, s, s]`` low-res logits.

    ``clip_boxes`` ``[N, 4]``, an evaluation-only override: the boxes the frozen-CLIP branch pools, **in the
    model's input frame and used as given** (by default it pools the prompt box, or the mask's box). The published
    point-prompt evaluation passed ground-truth boxes in original-image coordinates there (OVSAM_SPEC §6 item 3).
    """

    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    clip_boxes: np.ndarray | None = None

    def __len__(self) -> int:
        for a in (self.boxes, self.point_coords, self.mask_input):
            if a is not None:
                return int(a.shape[0])
        return 0

    def select(self, idx: slice | np.ndarray) -> "PromptSet":
        return PromptSet(*(None if a is None else a[idx] for a in
                           (self.point_coords, self.point_labels, self.boxes, self.mask_input, self.clip_boxes)))

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for name in ("point_coords", "point_labels", "boxes", "mask_input", "clip_boxes"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _array(value, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {value!r}") from e


def validate_prompts(
    original_size: tuple[int, int],
    point_coords=None,
    point_labels=None,
    box=None,
    mask_input=None,
    low_res_size: int | None = None,
) -> PromptSet:
    """Check and batch prompts given in the original frame.

    One prompt: ``point_coords (K, 2)`` + ``point_labels (K,)``, and/or ``box (4,)``. Several prompts:
    ``point_coords (N, K, 2)``, ``point_labels (N, K)``, ``box (N, 4)``. Raises ``ValueError`` naming the offending
    prompt for wrong shapes, NaN/inf, boxes with zero area or outside the ``H x W`` image, points outside it, and
    labels other than 0/1.
    """
    h, w = original_size
    boxes = coords = labels = masks = None
    if box is not None:
        boxes = _array(box, "box")
        if boxes.ndim == 1:
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"box must have shape (4,) or (N, 4) as x0, y0, x1, y1; got {np.shape(box)}")
        for i, b in enumerate(boxes):
            if not np.all(np.isfinite(b)):
                raise ValueError(f"box {i} {b.tolist()} contains NaN or inf")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise ValueError(f"box {i} {b.tolist()} has zero or negative area (expected x0 < x1 and y0 < y1)")
            if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
                raise ValueError(f"box {i} {b.tolist()} lies outside the {w}x{h} image (x in [0, {w}], y in [0, {h}])")
    if point_coords is not None or point_labels is not None:
        if point_coords is None or point_labels is None:
            raise ValueError("point_coords and point_labels must be given together")
        coords = _array(point_coords, "point_coords")
        labels = _array(point_labels, "point_labels")
        if coords.ndim == 2:
            coords = coords[None]
            labels = labels[None] if labels.ndim == 1 else labels
        if coords.ndim != 3 or coords.shape[2] != 2 or coords.shape[1] == 0:
            raise ValueError(f"point_coords must have shape (K, 2) or (N, K, 2) with K >= 1; got {np.shape(point_coords)}")
        if labels.shape != coords.shape[:2]:
            raise ValueError(f"point_labels must have shape {coords.shape[:2]} to match point_coords, got {labels.shape}")
        for i in range(coords.shape[0]):
            if not np.all(np.isfinite(coords[i])) or not np.all(np.isfinite(labels[i])):
                raise ValueError(f"point prompt {i} {coords[i].tolist()} contains NaN or inf")
            if np.any(coords[i, :, 0] < 0) or np.any(coords[i, :, 0] > w) or np.any(coords[i, :, 1] < 0) or \
                    np.any(coords[i, :, 1] > h):
                raise ValueError(f"point prompt {i} {coords[i].tolist()} lies outside the {w}x{h} image")
            if not np.all(np.isin(labels[i], (0, 1))):
                raise ValueError(f"point prompt {i} labels {labels[i].tolist()} must be 1 (positive) or 0 (negative)")
        labels = labels.astype(np.int64)
    if mask_input is not None:
        masks = np.asarray(mask_input, dtype=np.float32)
        if masks.ndim == 3:
            masks = masks[None]
        if masks.ndim != 4 or masks.shape[1] != 1 or (low_res_size and masks.shape[2:] != (low_res_size, low_res_size)):
            raise ValueError(f"mask_input must have shape (1, s, s) or (N, 1, s, s) with s = {low_res_size}; "
                             f"got {np.shape(mask_input)}")
    counts = {name: a.shape[0] for name, a in (("box", boxes), ("point_coords", coords), ("mask_input", masks))
              if a is not None}
    if not counts:
        raise ValueError("no prompt given: pass point_coords/point_labels, box or mask_input")
    if len(set(counts.values())) > 1:
        raise ValueError(f"prompt counts differ: {counts}; every prompt array needs the same leading size N")
    return PromptSet(coords, labels, boxes, masks)
