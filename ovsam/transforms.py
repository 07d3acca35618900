"""Image and coordinate transforms between the original frame and the network-input frame.

The input frame is the image resized so its long side is ``image_size``, normalised, then zero-padded on the
bottom/right to ``image_size`` squared. Coordinates scale by ``(new_w / W, new_h / H)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Resized ``(h', w')`` with the long side equal to ``long_side``; rounds as ``int(x * s + 0.5)``, and never
    below one pixel (an image thinner than ``max(h, w) / (2 * long_side)`` would otherwise vanish)."""
    scale = long_side * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def as_rgb_uint8(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validate an ``HxWx3`` uint8 image (``HxW`` grayscale is expanded) and return it in RGB order.

    Raises ``ValueError`` describing what was expected and what arrived.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (HxWx3 uint8), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 with values in [0, 255], got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape HxWx3 (or HxW grayscale), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be non-empty, got shape {image.shape}")
    if image_format == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def resize_longest_side(image: np.ndarray, long_side: int, method: str) -> np.ndarray:
    """Resize an ``HxWx3`` uint8 image so its long side is ``long_side``.

    ``method='cv2'``: OpenCV bilinear (``INTER_LINEAR``), as in the published OV-SAM pipeline.
    ``method='pil'``: SAM's ``ResizeLongestSide`` (PIL bilinear), as ``SamPredictor`` does.
    """
    h, w = image.shape[:2]
    new_h, new_w = preprocess_shape(h, w, long_side)
    if method == "cv2":
        import cv2

        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if method == "pil":
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide(long_side).apply_image(image)
    raise ValueError(f"unknown resize method {method!r}; expected 'cv2' or 'pil'")


def normalize_and_pad(
    image: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, image_size: int
) -> torch.Tensor:
    """``[B, 3, h, w]`` (0–255) -> normalised and zero-padded ``[B, 3, image_size, image_size]`` float32."""
    x = (image.float() - pixel_mean) / pixel_std
    h, w = x.shape[-2:]
    return F.pad(x, (0, image_size - w, 0, image_size - h))


def apply_coords(coords: np.ndarray | torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]):
    """Scale ``[..., 2]`` (x, y) coordinates from the original frame to the input frame."""
    (h, w), (new_h, new_w) = original_size, input_size
    if isinstance(coords, torch.Tensor):
        out = coords.clone().float()
    else:
        out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / w)
    out[..., 1] = out[..., 1] * (new_h / h)
    return out


def apply_boxes(boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int]):
    """Scale ``[..., 4]`` xyxy boxes from the original frame to the input frame."""
    shape = boxes.shape
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, input_size).reshape(shape)


def postprocess_masks(
    low_res: torch.Tensor, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Low-res logits ``[N, C, s, s]`` -> logits in the original frame ``[N, C, H, W]``: bilinear to the padded
    input size, crop the padding, bilinear to the original size (``align_corners=False`` throughout)."""
    if low_res.shape[0] == 0:
        return low_res.new_zeros(0, low_res.shape[1], *original_size)
    x = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


def binarize(logits: torch.Tensor, method: str) -> torch.Tensor:
    """``sigmoid(x) > 0.5`` (the published OV-SAM rule) or ``x > 0`` (SAM's ``mask_threshold``)."""
    if method == "sigmoid":
        return logits.sigmoid() > 0.5
    return logits > 0.0
