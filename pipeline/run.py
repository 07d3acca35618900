"""The only module that builds the Ray graph of the annotation job.

Execution model: Ray tasks per shard on an actor pool, not Ray Data streaming. The output contract is per shard
(``instances/<shard>.parquet``, ``images/<shard>.parquet``, ``_manifest/<shard>.json`` committed last), and Ray
Data's writers work per block with fresh names per run, so per-shard atomic commits would need an all-to-all
regrouping. Instead each actor loads the model once and processes whole shards: it streams the tar, decodes on a
thread pool (the actor's CPUs), runs the model in batches, RLE-encodes masks, and commits the shard. The driver
hands out shards, restarts work lost with a dead actor or node, and skips shards already committed. A shard is
therefore done exactly once however often a job is killed and rerun; memory per worker is bounded by one shard.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .sources import ShardRef
from .worker import ShardWorker, WorkerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterPlan:
    """How many workers and what each requests."""

    workers: int
    num_gpus: float
    num_cpus: float


@dataclass
class RunSummary:
    """What a run did. ``per_shard`` holds each processed shard's summary from the worker."""

    shards_total: int
    shards_skipped: int
    per_shard: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(s["images"] for s in self.per_shard)

    @property
    def instances(self) -> int:
        return sum(s["instances"] for s in self.per_shard)

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.per_shard:
            for k, v in s["statuses"].items():
                out[k] = out.get(k, 0) + v
        return out

    def stage_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.per_shard:
            for k, v in s["timings"].items():
                out[k] = out.get(k, 0.0) + v
        return out


def plan_cluster(workers: int | None, num_gpus_per_worker: float | None, cpus_per_worker: float | None) -> ClusterPlan:
    """GPU actors when the cluster has GPUs (one per GPU unless ``workers`` says otherwise), CPU actors otherwise."""
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0.0))
    cpus = float(res.get("CPU", 1.0))
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if num_gpus_per_worker > 0 and gpus < num_gpus_per_worker:
        raise ValueError(f"--num-gpus-per-worker {num_gpus_per_worker} but the cluster has {gpus:g} GPUs")
    if num_gpus_per_worker > 0:
        n = workers or max(1, int(gpus // num_gpus_per_worker))
        per_cpu = cpus_per_worker if cpus_per_worker else max(1.0, min(4.0, (cpus - 1) // n))
    else:
        per_cpu = cpus_per_worker or 1.0
        n = workers or max(1, int(cpus // per_cpu))
    return ClusterPlan(workers=n, num_gpus=num_gpus_per_worker, num_cpus=float(per_cpu))


def run_shards(
    shards: list[ShardRef],
    worker_config: WorkerConfig,
    plan: ClusterPlan,
    *,
    max_attempts: int = 4,
    on_progress: Callable[[RunSummary, int, float], None] | None = None,
    shards_skipped: int = 0,
) -> RunSummary:
    """Process ``shards`` on ``plan.workers`` actors; a shard whose actor died is retried up to ``max_attempts``."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    summary = RunSummary(shards_total=len(shards) + shards_skipped, shards_skipped=shards_skipped)
    start = time.perf_counter()
    if not shards:
        return summary
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=-1, max_task_retries=-1,
    )
    n = min(plan.workers, len(shards))
    actors = [actor_cls.remote(worker_config) for _ in range(n)]
    queue: deque[ShardRef] = deque(shards)
    attempts: dict[str, int] = {}
    idle = list(actors)
    in_flight: dict[Any, tuple[ShardRef, Any]] = {}
    last_report = 0.0
    while queue or in_flight:
        while queue and idle:
            shard, actor = queue.popleft(), idle.pop()
            attempts[shard.name] = attempts.get(shard.name, 0) + 1
            in_flight[actor.process.remote(shard)] = (shard, actor)
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
        for ref in done:
            shard, actor = in_flight.pop(ref)
            try:
                summary.per_shard.append(ray.get(ref))
                idle.append(actor)
            except (RayActorError, WorkerCrashedError) as e:
                logger.warning("shard %s lost with its worker (%s); attempt %d", shard.name, type(e).__name__,
                               attempts[shard.name])
                _retry_or_fail(summary, queue, shard, attempts, max_attempts, e)
                idle.append(actor)
            except RayTaskError as e:
                logger.error("shard %s failed: %s", shard.name, e)
                _retry_or_fail(summary, queue, shard, attempts, max_attempts, e)
                idle.append(actor)
        now = time.perf_counter()
        if on_progress is not None and (now - last_report > 5.0 or not (queue or in_flight)):
            on_progress(summary, len(shards), now - start)
            last_report = now
    summary.seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    return summary


def _retry_or_fail(summary, queue, shard, attempts, max_attempts, error) -> None:
    if attempts[shard.name] < max_attempts:
        queue.append(shard)
    else:
        summary.failed[shard.name] = f"{type(error).__name__}: {error}"
