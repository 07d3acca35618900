"""COCO RLE encoding of binary masks with torch ops, on the masks' own device (CPU or CUDA).

The result is byte-identical to ``pycocotools.mask.encode`` (compressed counts, as produced by its C
``rleEncode`` + ``rleToString``) and has the same format as :func:`ovsam.masks.encode_rle`, which it can
replace without moving dense masks to the host.

How: the run starts (pixels that differ from their column-major predecessor) are found on the device,
either as sparse row-major changes sorted into column-major order or, when there are many, by scanning a
transposed change map; run lengths are differences of the run starts with one end sentinel per mask
inserted by scatter; the ``rleToString`` characters come from broadcast shifts over a ``[runs, groups]``
grid, compacted with one boolean index. Only the compressed bytes and the per-mask string lengths (plus
a few scalars for sizes) cross to the host.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["encode_rle_torch"]


def _num_groups(max_u: int) -> int:
    """5-bit groups ``rleToString`` writes at most for values ``x`` with ``(x if x >= 0 else ~x) <= max_u``.

    ``k`` groups hold the signed range ``[-2**(5k-1), 2**(5k-1) - 1]``, i.e. ``u < 2**(5k-1)``.
    """
    return max(1, -(-(int(max_u).bit_length() + 1) // 5))


# Run starts found in row-major order are sorted into column-major order when there are at most this many
# per pixel (sorting costs ~100x a pixel's share of a dense transpose on CPU); otherwise the dense change
# map is transposed and scanned in column-major order directly. Both give the same result.
_SPARSE_CHANGES_PER_PIXEL = 0.01


def _padded_bool(numel: int, device: torch.device) -> torch.Tensor:
    """An uninitialized bool buffer of ``numel`` elements, rounded up to whole 8-byte words (tail zeroed)."""
    buf = torch.empty(-(-numel // 8) * 8, dtype=torch.bool, device=device)
    buf[numel:] = False
    return buf


def _run_starts(masks: torch.Tensor) -> torch.Tensor:
    """Sorted global column-major indices ``n * H * W + x * H + y`` of the pixels that start a run.

    A pixel starts a run when it differs from the previous pixel of its mask in column-major order; the
    first pixel of each mask is compared with a virtual 0, since COCO counts start with a run of zeros.
    """
    n, h, w = masks.shape
    num_px = h * w
    total_px = n * num_px
    device = masks.device
    # The change map in row-major layout: the column-major predecessor of (y, x) is (y - 1, x), or
    # (H - 1, x - 1) on the first row. Only contiguous slices, no dense transpose.
    buf = _padded_bool(total_px, device)
    change = buf[:total_px].view(n, h, w)
    torch.ne(masks[:, 1:, :], masks[:, :-1, :], out=change[:, 1:, :])
    torch.ne(masks[:, 0, 1:], masks[:, h - 1, :-1], out=change[:, 0, 1:])
    change[:, 0, 0] = masks[:, 0, 0]
    # Scan 8 pixels per int64 word first: masks change rarely, so few words are nonzero.
    words = torch.nonzero(buf.view(torch.uint8).view(torch.int64)).squeeze(1)
    if words.numel() * 8 <= total_px * _SPARSE_CHANGES_PER_PIXEL:
        sub = torch.nonzero(buf.view(-1, 8)[words])
        flat = words[sub[:, 0]] * 8 + sub[:, 1]  # row-major: n * P + y * W + x
        del buf, change, words, sub
        mask_idx = torch.div(flat, num_px, rounding_mode="floor")
        rem = flat - mask_idx * num_px
        y = torch.div(rem, w, rounding_mode="floor")
        keys = mask_idx * num_px + (rem - y * w) * h + y
        return torch.sort(keys).values
    del words
    colmajor = _padded_bool(total_px, device)
    colmajor[:total_px].view(n, w, h).copy_(change.transpose(1, 2))
    del buf, change
    return torch.nonzero(colmajor[:total_px]).squeeze(1)


def encode_rle_torch(masks: torch.Tensor, *, as_bytes: bool = False) -> list[dict]:
    """Binary masks ``[N, H, W]`` -> compressed COCO RLE dicts, computed on the masks' device.

    Contract:

    * ``masks``: a ``[N, H, W]`` tensor (bool, or uint8 0/1; any nonzero value counts as foreground, as in
      :func:`ovsam.masks.encode_rle`) on any device; a numpy array is accepted too. The frame is the image
      frame: ``masks[n, y, x]`` is the pixel at row ``y``, column ``x``; ``size`` is ``[H, W]``.
    * Returns one dict per mask, in order: ``{"size": [H, W], "counts": str}`` (``counts`` as ``bytes``
      when ``as_bytes=True``). ``N == 0`` -> ``[]``.
    * For every mask ``m`` (numpy bool ``[H, W]``) the result equals
      ``pycocotools.mask.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]`` exactly: ``counts``
      is the same byte string (decoded to ASCII ``str`` unless ``as_bytes``), i.e. the output of
      :func:`ovsam.masks.encode_rle` for the same masks. Run lengths are over the column-major (Fortran)
      pixel order, start with the number of leading zeros (possibly 0), and are written with
      pycocotools' ``rleToString`` (5-bit groups + continuation bit, +48, and ``x -= cnts[i-2]`` for
      ``i > 2``).

    Everything up to and including the compressed characters is vectorized torch on ``masks.device``
    (no per-pixel or per-run Python loops); only the concatenated compressed strings (``uint8``, about one
    or two bytes per run) and ``N`` string lengths are copied to the host (plus scalar syncs for sizes);
    the dense masks never are. Memory: ``O(N*H*W)`` bool plus ``O(total runs)``.
    """
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape [N, H, W], got {tuple(masks.shape)}")
    n, h, w = (int(s) for s in masks.shape)
    if n == 0:
        return []
    size = [h, w]
    num_px = h * w
    if num_px == 0:  # pycocotools: a single run of 0 zeros -> "0"
        counts = b"0" if as_bytes else "0"
        return [{"size": list(size), "counts": counts} for _ in range(n)]

    device = masks.device
    if masks.dtype != torch.bool:
        masks = masks != 0
    idx = _run_starts(masks)  # global column-major indices of run starts, sorted
    k = idx.numel()
    total = k + n  # runs: each mask has one more run than changes
    arange_n = torch.arange(n, device=device)
    mask_starts = arange_n * num_px
    # Changes of mask m are idx[bounds[m]:bounds[m + 1]]. Slots of the run lengths (masks back to back):
    # change k of mask m ends run slot k + m (each earlier mask adds one run), and mask m's last run ends
    # at its end, slot bounds[m + 1] + m.
    bounds = torch.searchsorted(idx, torch.arange(n + 1, device=device) * num_px)
    first = bounds[:-1] + arange_n  # slot of each mask's first run
    last = bounds[1:] + arange_n  # slot of each mask's last run
    shift = torch.repeat_interleave(arange_n, bounds[1:] - bounds[:-1], output_size=k)
    ends = torch.empty(total, dtype=torch.int64, device=device)  # global end position of every run
    ends[torch.arange(k, device=device) + shift] = idx
    ends[last] = mask_starts + num_px
    del idx, shift
    # Run lengths fit pycocotools' uint32 counts; int32 halves the traffic when they fit in it.
    dtype = torch.int32 if num_px < 2 ** 31 - 1 else torch.int64
    cnts = torch.empty(total, dtype=dtype, device=device)
    cnts[1:] = ends[1:] - ends[:-1]
    cnts[first] = (ends[first] - mask_starts).to(dtype)  # the first run starts at its mask's start
    del ends

    # rleToString: x = cnts[i] - cnts[i - 2] for i > 2, i the index within the mask. Slots first,
    # first + 1, first + 2 have i <= 2 (a slot past a short mask is a head of a later mask anyway).
    x = cnts.clone()
    x[2:] -= cnts[:-2]
    head = torch.cat([first, first + 1, first + 2]).clamp_(max=total - 1)
    x[head] = cnts[head]
    del cnts

    # 5-bit groups, least significant first, with continuation bit 0x20, +48. rleToString stops after the
    # first group g whose remaining x >> 5g is the sign extension of the group's bit 4, so x takes the
    # fewest groups kg whose 5*kg bits hold it as a signed number: u < 2 ** (5 * kg - 1) with u = x or ~x.
    u = x ^ (x >> (8 * x.element_size() - 1))
    groups = _num_groups(int(u.max()))  # one host sync: a small int
    kg = torch.ones(total, dtype=torch.uint8, device=device)
    for g in range(1, groups):
        kg += u >= 2 ** (5 * g - 1)
    del u
    g = torch.arange(groups, device=device, dtype=x.dtype)
    chars = (x[:, None] >> (5 * g)) & 0x1F
    chars |= (g < kg[:, None].to(x.dtype) - 1).to(x.dtype) << 5
    chars += 48
    stream = chars.to(torch.uint8)[g < kg[:, None].to(x.dtype)]  # row-major: runs in order, groups in order
    del chars, x
    ends_chars = torch.cumsum(kg, 0, dtype=torch.int64)[last]  # end of each mask's string in the stream

    data = stream.cpu().numpy().tobytes()
    offsets = [0] + ends_chars.cpu().tolist()
    out = []
    for i in range(n):
        s = data[offsets[i]:offsets[i + 1]]
        out.append({"size": list(size), "counts": s if as_bytes else s.decode("ascii")})
    return out
