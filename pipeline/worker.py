"""One shard, end to end, inside one worker: read -> decode (thread pool) -> model stage -> commit.

``ShardWorker`` is a plain class; ``pipeline/run.py`` hosts it in Ray actors. A shard is the unit of work and of
commit: its rows are kept on the worker (masks as RLE) until the shard is complete, then written and committed
with the manifest last, so a killed worker leaves nothing visible and a rerun redoes the shard from scratch.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from .decode import DEFAULT_MAX_PIXELS, DecodedSample, decode_sample
from .proposals import Proposals
from .sources import ShardRef, iter_samples
from .stages import Annotator, ModelStageConfig, SampleInput, SampleResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Per-worker settings. ``storage_options`` are fsspec options (credentials stay in memory only)."""

    output: str
    stage: ModelStageConfig
    config_hash: str
    batch_size: int = 8
    decode_threads: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


def to_stage_input(d: DecodedSample) -> SampleInput:
    """Map a decoded sample to the model stage's input (sidecar prompts become proposals)."""
    props = Proposals(boxes=d.boxes_xyxy, points=d.points, scores=list(d.scores), labels=list(d.labels))
    notes = list(d.notes) + [f"prompt {i}: {r}" for i, r in d.dropped_prompts]
    return SampleInput(key=d.key, image=d.image, status=d.status, error=d.error, width=d.width, height=d.height,
                       source_format=d.source_format, proposals=props, num_prompts_dropped=d.num_prompts_dropped,
                       notes=notes)


class ShardReadFailed(OSError):
    """The shard could not be read whole (open or read failures outlasted the retries); nothing was committed, so
    the driver can give the shard to another attempt and a rerun redoes it."""


def resolve_device(device: str) -> str:
    """``device`` unless it names CUDA on a worker without CUDA (e.g. a logical GPU of a test cluster): then CPU."""
    if not device.startswith("cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return device
    logger.warning("this worker was given a GPU but torch sees no CUDA device; running the model on the CPU")
    return "cpu"


class ShardWorker:
    """Loads the model once; :meth:`process` annotates and commits one shard and returns its summary."""

    def __init__(self, config: WorkerConfig) -> None:
        import dataclasses

        import fsspec

        self.config = config
        self.annotator = Annotator(dataclasses.replace(config.stage, device=resolve_device(config.stage.device)))
        self.fs, self.root = fsspec.core.url_to_fs(config.output, **config.storage_options)
        self.require_prompts = config.stage.prompts == "sidecar"

    def _decoded(self, reader: Iterator, pool: ThreadPoolExecutor) -> Iterator[DecodedSample]:
        """Decode in the pool with bounded read-ahead, yielding in shard order."""
        pending: deque[Future] = deque()
        limit = max(2 * self.config.batch_size, 4)
        for sample in reader:
            pending.append(pool.submit(decode_sample, sample, max_pixels=self.config.max_pixels,
                                       require_prompts=self.require_prompts,
                                       use_sidecar_prompts=self.require_prompts))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def process(self, shard: ShardRef) -> dict[str, Any]:
        """Annotate ``shard`` and commit it. Returns counts and per-stage times (seconds)."""
        from .sinks import commit_shard

        t0 = time.perf_counter()
        timings = {"read_decode": 0.0, "model": 0.0, "write": 0.0}
        reader = iter_samples(shard.url, self.config.storage_options, shard=shard.name)
        image_rows: list[dict[str, Any]] = []
        instance_rows: list[dict[str, Any]] = []
        batch: list[SampleInput] = []

        def flush() -> None:
            t = time.perf_counter()
            results: list[SampleResult] = self.annotator(batch)
            timings["model"] += time.perf_counter() - t
            for r in results:
                image_rows.append({**r.image_row, "shard": shard.name})
                instance_rows.extend({**row, "shard": shard.name} for row in r.instance_rows)
            batch.clear()

        with ThreadPoolExecutor(max_workers=max(1, self.config.decode_threads)) as pool:
            t = time.perf_counter()
            for decoded in self._decoded(reader, pool):
                batch.append(to_stage_input(decoded))
                if len(batch) >= self.config.batch_size:
                    timings["read_decode"] += time.perf_counter() - t
                    flush()
                    t = time.perf_counter()
            timings["read_decode"] += time.perf_counter() - t
            if batch:
                flush()
        report = reader.report
        if report is not None and report.read_failed:
            raise ShardReadFailed(f"shard {shard.name} ({shard.url}) was not read whole: {report.error}; "
                                  "nothing committed")
        t = time.perf_counter()
        manifest = commit_shard(
            self.fs, self.root, shard.name, instance_rows, image_rows,
            input_url=shard.url, config_hash=self.config.config_hash, read_report=report,
            attempt_id=uuid.uuid4().hex[:12],
        )
        timings["write"] = time.perf_counter() - t
        statuses: dict[str, int] = {}
        for row in image_rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        return {"shard": shard.name, "node_id": _node_id(), "pid": os.getpid(),
                "images": len(image_rows), "instances": len(instance_rows),
                "statuses": statuses, "truncated": bool(report and report.truncated),
                "read_error": None if report is None else report.error, "timings": timings,
                "seconds": time.perf_counter() - t0, "manifest": manifest}


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None
