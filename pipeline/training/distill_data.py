"""Image streams for SAM2CLIP distillation (``ovsam distill``): shards -> network inputs (+ cached teacher targets).

Any image shards work: the training shard format, the annotation job's input shards, SA-1B packed by ``ovsam pack
sa1b``, or a teacher cache written by ``ovsam distill --dump-teacher`` (``pipeline/training/teacher_cache.py``). Only the
image of each sample is used (its first member among ``pipeline.inputs.decode.IMAGE_EXTENSIONS``), plus the cached teacher
embedding when the shards are a teacher cache.

Preprocessing is the published distillation pipeline (OVSAM_SPEC §4.1/§4.2), the same steps as
``ovsam.batch.prepare_image``: resize so the long side is ``image_size`` keeping the ratio, normalise with the
ImageNet mean/std, zero-pad to a square; no augmentation. :class:`InputSpec` holds those settings so the teacher
dump, which runs without a student, prepares exactly the input the student sees.

:class:`DistillStream` is a deterministic, endless ``IterableDataset``: epoch ``e`` visits the shards in an order
drawn from ``(seed, e)`` through a seeded shuffle buffer, and DataLoader workers split the shards with
webdataset's ``split_by_worker``. ``skip`` drops that many samples from the front without decoding them, so a run
resumed at step ``s`` continues where it stopped (``skip = s * batch_size``): exactly when ``skip`` is a multiple
of the DataLoader workers (the resumed DataLoader asks worker 0 first), else with neighbouring samples swapped.
Samples whose image cannot be decoded are logged and left out, so a resume lands early by the number of such
samples before the stop (they are then seen again). No Ray here.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ovsam import transforms as T

from pipeline.inputs.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from pipeline.inputs.sources import Sample, iter_samples

logger = logging.getLogger(__name__)

EMBEDDING_EXT = "teacher.npy"  # member extension of a cached teacher embedding (float16 .npy bytes)


def embedding_shape(config: Any) -> tuple[int, int, int]:
    """``(C, g, g)`` of the image embedding a model config produces: a SAM encoder's (``sam-*``) or an OV-SAM
    SAM2CLIP neck's (``ovsam-*``)."""
    if getattr(config, "kind", None) == "sam":
        grid = config.image_size // config.patch_size
        return int(config.decoder.embed_dim), grid, grid
    if getattr(config, "kind", None) == "ovsam":
        grid = config.image_size // config.neck.patch_stride
        return int(config.neck.out_dim), grid, grid
    raise TypeError(f"expected an ovsam-* or sam-* model config, got {type(config).__name__}")


@dataclass(frozen=True)
class InputSpec:
    """How images become network inputs: long side resized to ``image_size`` with ``resize`` (``cv2`` as in the
    published distillation, or ``pil``), normalised with ``pixel_mean``/``pixel_std`` (0-255 RGB), zero-padded."""

    image_size: int
    resize: str
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]

    @classmethod
    def of(cls, config: Any, resize: str | None = None) -> InputSpec:
        """A model config's input settings; ``resize`` overrides its resize method."""
        return cls(int(config.image_size), resize or config.resize, tuple(float(v) for v in config.pixel_mean),
                   tuple(float(v) for v in config.pixel_std))

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["image_size"]), str(d["resize"]), tuple(map(float, d["pixel_mean"])),
                   tuple(map(float, d["pixel_std"])))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``HxWx3`` uint8 RGB -> ``[3, S, S]`` float32 (``ovsam.batch.prepare_image``'s steps, on CPU)."""
        rgb = T.as_rgb_uint8(image)
        resized = T.resize_longest_side(rgb, self.image_size, self.resize)
        x = torch.as_tensor(resized).permute(2, 0, 1)[None]
        mean = torch.tensor(self.pixel_mean).view(-1, 1, 1)
        std = torch.tensor(self.pixel_std).view(-1, 1, 1)
        return T.normalize_and_pad(x, mean, std, self.image_size)[0]

    def differences(self, other: InputSpec) -> list[str]:
        """``name: self vs other`` for every setting that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]


def check_embeddings_match(student: str, student_shape: tuple[int, ...], teacher: str,
                           teacher_shape: tuple[int, ...], where: str = "") -> None:
    """Raise ``ValueError`` naming both models when the student's embedding shape is not the teacher's
    (``where`` says where the teacher's shape comes from, e.g. a cache)."""
    if tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(
            f"student '{student}' produces a {'x'.join(map(str, student_shape))} image embedding but teacher "
            f"'{teacher}'{where} gives {'x'.join(map(str, teacher_shape))}; distil into a student whose neck output "
            "(out_dim x image_size/16 squared) matches the teacher (sam-vit-h -> ovsam-rn50x16, sam-tiny -> "
            "ovsam-tiny)")


def image_member(sample: Sample) -> str | None:
    """The extension of the sample's image member (the first of ``IMAGE_EXTENSIONS`` present), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample.files), None)


def decode_embedding(data: bytes) -> torch.Tensor:
    """``.npy`` bytes of a cached embedding -> float32 tensor ``[C, g, g]``."""
    import io

    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return torch.from_numpy(arr.astype(np.float32))


def encode_embedding(embedding: torch.Tensor) -> bytes:
    """An embedding ``[C, g, g]`` -> float16 ``.npy`` bytes."""
    import io

    buf = io.BytesIO()
    np.save(buf, embedding.detach().to("cpu", torch.float16).numpy(), allow_pickle=False)
    return buf.getvalue()


def read_samples(urls: list[str], storage_options: dict | None = None) -> Iterator[Sample]:
    """The samples of ``urls`` in order; read problems are logged and the sample left out."""
    for url in urls:
        reader = iter_samples(url, storage_options)
        for sample in reader:
            if sample.errors:
                logger.warning("%s: sample %s skipped: %s", url, sample.key, "; ".join(sample.errors))
                continue
            yield sample
        report = reader.report
        if report is not None and (report.error or report.truncated):
            logger.warning("%s: %s", url, report.error or "truncated")


def decode_for_distill(sample: Sample, spec: InputSpec, *, with_target: bool) -> dict | None:
    """``{"key", "image": [3, S, S], "target": [C, g, g] or None}``, or None (logged) if the sample is unusable."""
    ext = image_member(sample)
    if ext is None:
        logger.warning("%s/%s: no image member (expected one of %s); skipped", sample.shard, sample.key,
                       ", ".join(IMAGE_EXTENSIONS))
        return None
    target = None
    if with_target:
        if EMBEDDING_EXT not in sample.files:
            logger.warning("%s/%s: no .%s member in a teacher cache shard; skipped", sample.shard, sample.key,
                           EMBEDDING_EXT)
            return None
        target = decode_embedding(sample.files[EMBEDDING_EXT])
    try:
        image, _, _ = decode_image(sample.files[ext], extension=ext)
    except ImageDecodeError as e:
        logger.warning("%s/%s: %s; skipped", sample.shard, sample.key, e)
        return None
    return {"key": sample.key, "image": spec.prepare(image), "target": target}


class DistillStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of prepared samples from ``urls`` (see the module docstring).

    Arguments:
      urls: this training worker's shards.
      spec: the input preprocessing.
      with_target: read the cached teacher embedding of each sample (teacher cache shards).
      seed: fixes the shard order per epoch and the shuffle buffer.
      skip: samples to drop from the front of the stream (all DataLoader workers together).
      shuffle_buffer: samples held for shuffling (0 or 1: shard order only).
    """

    def __init__(self, urls: list[str], spec: InputSpec, *, with_target: bool, seed: int = 0, skip: int = 0,
                 shuffle_buffer: int = 64, storage_options: dict | None = None) -> None:
        super().__init__()
        if not urls:
            raise ValueError("DistillStream needs at least one shard URL")
        self.urls = list(urls)
        self.spec = spec
        self.with_target = with_target
        self.seed = seed
        self.skip = skip
        self.shuffle_buffer = shuffle_buffer
        self.storage_options = dict(storage_options or {})

    def _worker(self) -> tuple[list[str], int]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, count = (0, 1) if info is None else (info.id, info.num_workers)
        urls = list(wds.split_by_worker(self.urls))
        if not urls:
            raise ValueError(f"DataLoader worker {wid} of {count} got no shard out of {len(self.urls)}; use at most "
                             f"{len(self.urls)} loader workers")
        # the DataLoader takes one sample from each worker in turn, so worker `wid` yields the global samples
        # wid, wid + count, ...; it skips those among the first `skip`
        skip = max(0, (self.skip - wid + count - 1) // count)
        return urls, skip

    def _raw(self, urls: list[str], tag: int) -> Iterator[Sample]:
        for epoch in itertools.count():
            order = list(urls)
            random.Random(f"{self.seed}/{tag}/{epoch}").shuffle(order)
            rng = random.Random(f"{self.seed}/{tag}/{epoch}/buffer")
            buffer: list[Sample] = []
            seen = 0
            for sample in read_samples(order, self.storage_options):
                seen += 1
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            while buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
            if seen == 0:
                raise ValueError(f"no readable samples in {len(urls)} shard(s) ({', '.join(urls[:3])}...)")

    def __iter__(self) -> Iterator[dict]:
        urls, skip = self._worker()
        info = torch.utils.data.get_worker_info()
        for sample in self._raw(urls, 0 if info is None else info.id):
            if skip:
                skip -= 1
                continue
            item = decode_for_distill(sample, self.spec, with_target=self.with_target)
            if item is not None:
                yield item


def iter_once(urls: list[str], spec: InputSpec, *, with_target: bool,
              storage_options: dict | None = None) -> Iterator[dict]:
    """Each usable sample of ``urls`` once, in order (held-out evaluation)."""
    for sample in read_samples(urls, storage_options):
        item = decode_for_distill(sample, spec, with_target=with_target)
        if item is not None:
            yield item


def collate(items: list[dict]) -> dict:
    """``{"keys": [...], "images": [B, 3, S, S], "targets": [B, C, g, g] or None}``."""
    targets = [it["target"] for it in items]
    return {"keys": [it["key"] for it in items], "images": torch.stack([it["image"] for it in items]),
            "targets": torch.stack(targets) if all(t is not None for t in targets) else None}


def batched(items: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Collated batches of ``batch_size`` items (the last one may be smaller)."""
    while True:
        chunk = list(itertools.islice(items, batch_size))
        if not chunk:
            return
        yield collate(chunk)
