"""Training data for ``ovsam train``: packed shard sets -> augmented samples with prompts -> one-dataset batches.

- :func:`parse_dataset_spec` reads ``name=URL:kind:weight``; :func:`open_shard_set` lists a shard set (a root with
  ``_index.json`` and ``classes.json``, or a glob) through fsspec, so ``s3://`` works without ``pipe:``.
- :class:`TrainStream` streams one shard set with the ``webdataset`` library (``DataPipeline``: shard list ->
  ``split_by_worker`` -> fsspec streams -> tar members -> samples -> shuffle buffer -> decode + augment), looping
  over epochs with a seeded shard order. Shards reach it already split by training worker
  (``jobs.trainer.shard_slice``), and ``split_by_worker`` splits them further over DataLoader workers, so no
  sample is read twice in an epoch.
- :func:`prepare_sample`: LSJ-style augmentation (flip, random resize with ``r ~ U(lo, hi)`` of the model's input
  size, random crop, zero pad; boxes recomputed from masks after the crop; tiny instances dropped) and prompt
  sampling (OVSAM_SPEC §4.3, with the §6.2 fixes behind flags).
- :class:`MixtureSampler`: which dataset trains at a step, a pure function of ``(seed, step)``, so every rank
  picks the same dataset at the same step and a resumed run continues the same sequence.
"""

from __future__ import annotations

import itertools
import json
import logging
import posixpath
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from schemas.training import CLASSES_FILE, INDEX_FILE, ClassesFile, TrainingRecord, index_from_json

from pipeline.training.train_specs import DatasetSpec, parse_dataset_spec, parse_heldout_spec  # noqa: F401

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PUBLISHED_NUM_PROMPTS = 40


# ------------------------------------------------------------------------------------------------ shard sets


@dataclass(frozen=True)
class ShardSet:
    """A listed shard set: full shard URLs (sorted), its ``classes.json`` (None if absent) and sample count."""

    url: str
    shards: tuple[str, ...]
    classes: ClassesFile | None
    num_samples: int | None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _unstrip(fs: Any, url: str, path: str) -> str:
    """The URL of ``path`` on ``fs`` in the scheme of ``url``."""
    if "://" in url:
        return fs.unstrip_protocol(path)
    return path


def open_shard_set(url: str, storage_options: dict | None = None) -> ShardSet:
    """List a shard set: a root holding ``_index.json`` (shards = its entries) and ``classes.json``, or a glob of
    ``.tar`` files (``classes.json`` then read from their common directory when present)."""
    fs, path = _fs(url, storage_options)
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
        shards = [p for p in found if p.endswith(".tar")]
        if not shards:
            raise ValueError(f"{url}: the glob matches no .tar shard; check the path")
        root = posixpath.dirname(shards[0])
        num = None
    else:
        root = path.rstrip("/")
        index_path = posixpath.join(root, INDEX_FILE)
        if not fs.exists(index_path):
            raise ValueError(f"{url}: no {INDEX_FILE}; expected a shard set written by `ovsam pack` (a directory "
                             f"with {INDEX_FILE} and {CLASSES_FILE}) or a glob such as {url.rstrip('/')}/*.tar")
        index = index_from_json(fs.cat_file(index_path))
        if not index:
            raise ValueError(f"{url}: {INDEX_FILE} lists no shards")
        shards = [posixpath.join(root, name) for name in sorted(index)]
        num = sum(e.num_samples for e in index.values())
    classes_path = posixpath.join(root, CLASSES_FILE)
    classes = ClassesFile.from_json(fs.cat_file(classes_path)) if fs.exists(classes_path) else None
    return ShardSet(url, tuple(_unstrip(fs, url, s) for s in shards), classes, num, dict(storage_options or {}))


# ------------------------------------------------------------------------------------------------ streaming


def fsspec_streams(src: Iterable[dict], storage_options: dict | None = None,
                   handler: Any = None) -> Iterator[dict]:
    """WebDataset stage: ``{"url": ...}`` -> ``{"url": ..., "stream": file}`` opened through fsspec."""
    import fsspec

    for sample in src:
        url = sample["url"]
        try:
            stream = fsspec.open(url, "rb", **(storage_options or {})).open()
        except Exception as exc:  # a missing or unreadable shard is logged and skipped like a bad sample
            exc.args = exc.args + (url,)
            if handler is not None and handler(exc):
                continue
            raise
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()


def _warn_and_continue(exc: Exception) -> bool:
    logger.warning("skipping unreadable training data: %s", exc)
    return True


def raw_samples(shards: list[str], storage_options: dict | None = None, *, split_workers: bool = True,
                shuffle_buffer: int = 0, rng: random.Random | None = None) -> Iterable[dict]:
    """Raw WebDataset samples (``__key__``, ``__url__``, one entry per member extension, bytes) of ``shards`` in
    order; corrupt members and unreadable shards are logged and skipped."""
    import webdataset as wds
    from webdataset import tariterators

    stages: list[Any] = [wds.SimpleShardList(list(shards))]
    if split_workers:
        stages.append(wds.split_by_worker)
    stages += [
        lambda src: fsspec_streams(src, storage_options, handler=_warn_and_continue),
        lambda src: tariterators.tar_file_expander(src, handler=_warn_and_continue),
        lambda src: tariterators.group_by_keys(src, handler=_warn_and_continue),
    ]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng or random.Random(0)))
    return wds.DataPipeline(*stages)


def decode_raw(sample: dict) -> tuple[str, np.ndarray, TrainingRecord]:
    """``(key, HxWx3 uint8 RGB, record)`` of a raw sample; ``ValueError`` says what is wrong."""
    from pipeline.inputs.decode import decode_image

    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {key!r} has no image member (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if "json" not in sample:
        raise ValueError(f"sample {key!r} has no .json sidecar")
    record = TrainingRecord.from_json(sample["json"])
    image, _, _ = decode_image(sample[ext], extension=ext)
    if image.shape[:2] != (record.height, record.width):
        raise ValueError(f"sample {key!r}: image is {image.shape[1]}x{image.shape[0]} but its sidecar says "
                         f"{record.width}x{record.height}")
    return key, image, record


# ------------------------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """LSJ augmentation and prompt sampling. ``image_size`` is the model's square input size.

    ``scale_range``: the resized image fits in ``(image_size * r)^2`` with ``r ~ U(lo, hi)`` (published: 0.9-2.0
    COCO, 0.1-2.0 LVIS). ``min_area``: instances with fewer visible pixels (mask data) or a smaller clipped box
    (box data) after the crop are dropped (published: 32 in the 1024 frame). ``published_truncation``: keep the
    first ``num_prompts`` repeated annotations instead of a random subset. ``published_image_box``: image-level
    samples get the published ``[0, 0, h, w]`` box (x/y swapped) instead of ``[0, 0, w, h]``."""

    image_size: int
    scale_range: tuple[float, float] = (0.9, 2.0)
    flip_prob: float = 0.5
    min_area: float = 2.0
    num_prompts: int = PUBLISHED_NUM_PROMPTS
    crop_attempts: int = 10
    published_truncation: bool = False
    published_image_box: bool = False
    augment: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")


@dataclass
class TrainSample:
    """One augmented sample in the network-input frame (``S = image_size``).

    ``image`` ``[3, S, S]`` uint8, zero beyond ``input_hw``; ``boxes`` ``[n, 4]`` xyxy prompt/RoI boxes;
    ``points`` ``[n, 2]`` xy (meaningful where ``is_point``); ``labels`` ``[n]`` class indices (-1 agnostic);
    ``masks`` ``[n, S, S]`` bool for mask data, else None."""

    dataset: str
    key: str
    kind: str
    image: torch.Tensor
    input_hw: tuple[int, int]
    boxes: torch.Tensor
    points: torch.Tensor
    is_point: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None


def prompt_selection(num_instances: int, num_prompts: int, rng: np.random.Generator,
                     published: bool = False) -> np.ndarray:
    """Indices of the instances behind ``num_prompts`` prompts: the instances repeated until there are at least
    ``num_prompts``, then a random subset in random order (``published``: the first ``num_prompts``, permuted)."""
    assert num_instances > 0
    reps = -(-num_prompts // num_instances)
    tiled = np.tile(np.arange(num_instances), reps)
    if published:
        chosen = tiled[:num_prompts]
        return chosen[rng.permutation(len(chosen))]
    return tiled[rng.permutation(len(tiled))][:num_prompts]


def point_flags(n: int) -> np.ndarray:
    """The published box/point split: ``arange(2).repeat_interleave(n // 2 + 1)[:n]`` (21 boxes, 19 points for 40);
    True marks a point prompt."""
    return np.repeat(np.arange(2), n // 2 + 1)[:n].astype(bool)


def _resize(image: np.ndarray, masks: np.ndarray | None, new_hw: tuple[int, int]):
    """Bilinear image, nearest-neighbour masks (``[K, H, W]`` bool, resized as channels of one array)."""
    import cv2

    h, w = new_hw
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if masks is None:
        return image, None
    out = np.zeros((len(masks), h, w), dtype=bool)
    for start in range(0, len(masks), 256):  # cv2 handles at most 512 channels
        chunk = np.ascontiguousarray(masks[start:start + 256].transpose(1, 2, 0).astype(np.uint8))
        resized = cv2.resize(chunk, (w, h), interpolation=cv2.INTER_NEAREST)
        out[start:start + 256] = resized.reshape(h, w, -1).transpose(2, 0, 1) > 0
    return image, out


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (exclusive max) of ``[K, h, w]`` bool masks; empty masks give zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(xs):
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def prepare_sample(image: np.ndarray, record: TrainingRecord, cfg: AugmentConfig, rng: np.random.Generator,
                   *, dataset: str = "", key: str = "") -> TrainSample | None:
    """Augment one sample and sample its prompts; None when no instance survives ``cfg.crop_attempts`` crops."""
    from ovsam.masks import decode_rle

    kind = record.kind
    masks = decode_rle(record.masks) if kind == "mask" else None
    boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(record.labels if kind != "image" else record.image_labels, dtype=np.int64)
    if kind != "image" and len(boxes) == 0:
        return None
    h, w = image.shape[:2]
    if cfg.augment and rng.random() < cfg.flip_prob:
        image = image[:, ::-1]
        if masks is not None:
            masks = masks[:, :, ::-1]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1) if len(boxes) \
            else boxes
    s_size = cfg.image_size
    for _ in range(max(cfg.crop_attempts, 1)):
        r = rng.uniform(*cfg.scale_range) if cfg.augment else 1.0
        scale = min(s_size * r / h, s_size * r / w)
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        y0 = int(rng.integers(0, new_h - s_size + 1)) if new_h > s_size else 0
        x0 = int(rng.integers(0, new_w - s_size + 1)) if new_w > s_size else 0
        ch, cw = min(new_h, s_size), min(new_w, s_size)
        if kind == "image":
            keep = np.ones(0, dtype=bool)
            break
        cur_boxes = boxes * scale - np.array([x0, y0, x0, y0], dtype=np.float32)
        cur_boxes[:, 0::2] = cur_boxes[:, 0::2].clip(0, cw)
        cur_boxes[:, 1::2] = cur_boxes[:, 1::2].clip(0, ch)
        if kind == "box":
            area = (cur_boxes[:, 2] - cur_boxes[:, 0]) * (cur_boxes[:, 3] - cur_boxes[:, 1])
            keep = area >= max(cfg.min_area, 1e-6)
            if keep.any():
                break
        else:
            # cheap pre-check on boxes before resizing the masks
            area = (cur_boxes[:, 2] - cur_boxes[:, 0]) * (cur_boxes[:, 3] - cur_boxes[:, 1])
            if (area >= max(cfg.min_area, 1e-6)).any():
                keep = np.ones(len(boxes), dtype=bool)
                break
    else:
        return None
    out_image, out_masks = _resize(np.ascontiguousarray(image), None if masks is None else
                                   np.ascontiguousarray(masks), (new_h, new_w))
    out_image = out_image[y0:y0 + ch, x0:x0 + cw]
    canvas = np.zeros((s_size, s_size, 3), dtype=np.uint8)
    canvas[:ch, :cw] = out_image
    image_t = torch.from_numpy(canvas).permute(2, 0, 1).contiguous()
    if kind == "image":
        box = [0.0, 0.0, float(ch), float(cw)] if cfg.published_image_box else [0.0, 0.0, float(cw), float(ch)]
        n = len(labels)
        return TrainSample(dataset, key, kind, image_t, (ch, cw), torch.tensor([box] * n, dtype=torch.float32),
                           torch.zeros(n, 2), torch.zeros(n, dtype=torch.bool), torch.from_numpy(labels), None)
    if kind == "mask":
        crop_masks = out_masks[:, y0:y0 + ch, x0:x0 + cw]
        areas = crop_masks.reshape(len(crop_masks), -1).sum(1)
        keep = areas >= cfg.min_area
        if not keep.any():
            return None
        crop_masks = crop_masks[keep]
        cur_boxes = _mask_boxes(crop_masks)
    else:
        cur_boxes = cur_boxes[keep]
    labels = labels[keep]
    sel = prompt_selection(len(labels), cfg.num_prompts, rng, published=cfg.published_truncation)
    n = len(sel)
    is_point = point_flags(n) if kind == "mask" else np.zeros(n, dtype=bool)
    points = np.zeros((n, 2), dtype=np.float32)
    masks_t = None
    if kind == "mask":
        pixels: dict[int, np.ndarray] = {}
        for j in np.nonzero(is_point)[0]:
            inst = int(sel[j])
            if inst not in pixels:
                pixels[inst] = np.flatnonzero(crop_masks[inst])
            flat = pixels[inst][int(rng.integers(len(pixels[inst])))]
            points[j] = (flat % cw, flat // cw)
        padded = np.zeros((len(crop_masks), s_size, s_size), dtype=bool)
        padded[:, :ch, :cw] = crop_masks
        masks_t = torch.from_numpy(padded[sel])
    return TrainSample(dataset, key, kind, image_t, (ch, cw), torch.from_numpy(cur_boxes[sel].astype(np.float32)),
                       torch.from_numpy(points), torch.from_numpy(is_point), torch.from_numpy(labels[sel]), masks_t)


def collate(samples: list[TrainSample]) -> list[TrainSample]:
    """DataLoader ``collate_fn``: batches stay lists (samples hold different numbers of prompts)."""
    return list(samples)


# ------------------------------------------------------------------------------------------------ datasets


class TrainStream(torch.utils.data.IterableDataset):
    """Endless augmented samples of one shard set (this training worker's ``shards``).

    Epoch ``e`` reads the shards in an order seeded by ``(seed, e)``; DataLoader workers take every
    ``num_workers``-th shard of that order (``webdataset.split_by_worker``). Unreadable shards, corrupt members
    and invalid samples are logged and skipped; a worker whose shards yield no usable sample in a whole epoch
    raises ``ValueError`` instead of looping forever."""

    def __init__(self, name: str, shards: list[str], cfg: AugmentConfig, *, seed: int = 0, start_epoch: int = 0,
                 shuffle_buffer: int = 32, storage_options: dict | None = None):
        super().__init__()
        if not shards:
            raise ValueError(f"dataset {name!r}: no shards to read")
        self.name = name
        self.shards = list(shards)
        self.cfg = cfg
        self.seed = seed
        self.start_epoch = start_epoch
        self.shuffle_buffer = shuffle_buffer
        self.storage_options = dict(storage_options or {})

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[TrainSample]:
        wid, nw = self._worker()
        if wid >= len(self.shards):
            return  # more loader workers than shards: this one has nothing to read
        for epoch in itertools.count(self.start_epoch):
            order = [self.shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]
            rng = np.random.default_rng([self.seed, epoch, wid])
            produced = 0
            for raw in raw_samples(order, self.storage_options, shuffle_buffer=self.shuffle_buffer,
                                   rng=random.Random(int(rng.integers(2 ** 31)))):
                try:
                    key, image, record = decode_raw(raw)
                    sample = prepare_sample(image, record, self.cfg, rng, dataset=self.name, key=key)
                except Exception as exc:  # one bad sample must not end a training run
                    logger.warning("dataset %s: skipping sample %s from %s: %s", self.name, raw.get("__key__"),
                                   raw.get("__url__"), exc)
                    continue
                if sample is None:
                    continue
                produced += 1
                yield sample
            if produced == 0:
                raise ValueError(f"dataset {self.name!r}: no usable sample in a whole epoch over "
                                 f"{len(self.shards)} shard(s) (worker {wid}/{nw}); check the shards and --min-area")


def iter_samples(shards: list[str], storage_options: dict | None = None, *, rank: int = 0, world: int = 1,
                 limit: int | None = None) -> Iterator[tuple[str, np.ndarray, TrainingRecord]]:
    """``(key, image, record)`` of the valid samples of ``shards`` in order (evaluation): of the first ``limit``
    samples, every ``world``-th from ``rank`` (others are not decoded). Bad samples are logged and skipped."""
    for i, raw in enumerate(raw_samples(shards, storage_options, split_workers=False)):
        if limit is not None and i >= limit:
            return
        if i % world != rank:
            continue
        try:
            yield decode_raw(raw)
        except Exception as exc:
            logger.warning("skipping sample %s from %s: %s", raw.get("__key__"), raw.get("__url__"), exc)


def eval_targets(record: TrainingRecord) -> dict[str, Any]:
    """The evaluation target of a decoded record (``ovsam.evaluation.evaluate_samples``): ``labels``, ``boxes``
    (xyxy; an image-level record's labels all get the whole-image box) and, for mask data, ``masks``."""
    from ovsam.masks import decode_rle

    if record.kind == "image":
        box = [0.0, 0.0, float(record.width), float(record.height)]
        return {"labels": np.asarray(record.image_labels), "boxes": np.asarray([box] * len(record.image_labels))}
    target = {"labels": np.asarray(record.labels), "boxes": np.asarray(record.boxes, dtype=np.float32)}
    if record.kind == "mask":
        target["masks"] = decode_rle(record.masks) if record.masks else np.zeros((0, record.height, record.width),
                                                                                  dtype=bool)
    return target


class MixtureSampler:
    """Picks the dataset of each step with probability ``weight / sum(weights)``, from a generator seeded by
    ``(seed, step)``: identical on every rank, and the same after a resume."""

    def __init__(self, names: list[str], weights: list[float], seed: int = 0):
        if len(names) != len(weights) or not names:
            raise ValueError(f"need one weight per dataset, got {len(names)} names and {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(w > 0):
            raise ValueError(f"sampling weights must be positive, got {weights}")
        self.names = list(names)
        self.probs = w / w.sum()
        self.seed = seed

    def choice(self, step: int) -> str:
        rng = np.random.default_rng([self.seed, 7919, step])
        return self.names[int(rng.choice(len(self.names), p=self.probs))]


class MixtureLoader:
    """One DataLoader per dataset, created lazily; :meth:`batch` returns a batch of the dataset chosen for the
    step (never mixing datasets)."""

    def __init__(self, streams: dict[str, TrainStream], sampler: MixtureSampler, batch_size: int,
                 num_workers: int = 0):
        missing = set(sampler.names) - set(streams)
        if missing:
            raise ValueError(f"no stream for dataset(s) {sorted(missing)}")
        self.streams = streams
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._iters: dict[str, Iterator[list[TrainSample]]] = {}

    def _iter(self, name: str) -> Iterator[list[TrainSample]]:
        if name not in self._iters:
            stream = self.streams[name]
            workers = min(self.num_workers, len(stream.shards))
            loader = torch.utils.data.DataLoader(stream, batch_size=self.batch_size, collate_fn=collate,
                                                 num_workers=workers, persistent_workers=workers > 0,
                                                 prefetch_factor=2 if workers > 0 else None)
            self._iters[name] = iter(loader)
        return self._iters[name]

    def batch(self, step: int) -> tuple[str, list[TrainSample]]:
        name = self.sampler.choice(step)
        return name, next(self._iter(name))


def read_json(url: str, storage_options: dict | None = None) -> Any:
    fs, path = _fs(url, storage_options)
    return json.loads(fs.cat_file(path))


__all__ = ["AugmentConfig", "DatasetSpec", "MixtureLoader", "MixtureSampler", "ShardSet", "TrainSample",
           "TrainStream", "collate", "decode_raw", "iter_samples", "open_shard_set", "parse_dataset_spec",
           "parse_heldout_spec", "point_flags", "prepare_sample", "prompt_selection", "raw_samples"]
