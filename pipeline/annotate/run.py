"""The only module that builds the Ray graph of the annotation job.

Execution model: Ray tasks per shard on an actor pool, not Ray Data streaming. The output contract is per shard
(``instances/<shard>.parquet``, ``images/<shard>.parquet``, ``_manifest/<shard>.json`` committed last), and Ray
Data's writers work per block with fresh names per run, so per-shard atomic commits would need an all-to-all
regrouping. Instead each actor loads the model once and processes whole shards: it streams the tar, decodes on a
thread pool ahead of the model, runs the model in batches, builds RLE rows on another thread while the model goes
on (``pipeline/annotate/worker.py``), and commits the shard. The driver
hands out shards, restarts work lost with a dead actor or node, and skips shards already committed. A shard is
therefore done exactly once however often a job is killed and rerun; memory per worker is bounded by one shard.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.inputs.sources import ShardRef
from pipeline.annotate.worker import ShardWorker, WorkerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterPlan:
    """How many workers and what each requests."""

    workers: int
    num_gpus: float
    num_cpus: float


@dataclass
class RunSummary:
    """What a run did. ``per_shard`` holds each processed shard's summary from the worker
    (``ShardWorker.process``: counts, ``timings``, ``background``, ``seconds``, ``model_seconds``,
    ``model_busy_pct``, ``precision``, ...)."""

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
        """The workers' model-thread times summed over shards (``wait_input``, ``model``, ``wait_rows``,
        ``write``; see ``ShardWorker.process``)."""
        out: dict[str, float] = {}
        for s in self.per_shard:
            for k, v in s["timings"].items():
                out[k] = out.get(k, 0.0) + v
        return out

    def background_seconds(self) -> dict[str, float]:
        """Busy time of the workers' helper threads (``read``, ``decode``, ``prepare``, ``rows``) summed over
        shards; it overlaps the model's time."""
        out: dict[str, float] = {}
        for s in self.per_shard:
            for k, v in s.get("background", {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    @property
    def model_seconds(self) -> float:
        """Time inside model calls, summed over shards."""
        return sum(s.get("model_seconds", s["timings"].get("model", 0.0)) for s in self.per_shard)

    @property
    def actor_seconds(self) -> float:
        """Actor processing wall time, summed over shards (each from the start of the shard's processing to its
        commit; actor start-up and idle time between shards excluded)."""
        return sum(s["seconds"] for s in self.per_shard)

    @property
    def model_busy_pct(self) -> float:
        """Model-busy %: ``100 * model_seconds / actor_seconds``, i.e. time inside model calls over the actors'
        processing wall time, both summed over shards (0 when nothing was processed)."""
        wall = self.actor_seconds
        return 100.0 * self.model_seconds / wall if wall > 0 else 0.0

    def peak_rss_mb(self) -> float:
        """The largest peak resident memory (MiB) any worker reported."""
        return max((float(s.get("peak_rss_mb") or 0.0) for s in self.per_shard), default=0.0)

    def precisions(self) -> list[str]:
        """The precisions the workers' models ran in (resolved names), sorted."""
        return sorted({s["precision"] for s in self.per_shard if s.get("precision")})


def plan_cluster(workers: int | None, num_gpus_per_worker: float | None, cpus_per_worker: float | None) -> ClusterPlan:
    """GPU actors when the cluster has GPUs (one per GPU unless ``workers`` says otherwise), CPU actors otherwise.

    Sized from the live nodes' resources (see :func:`plan_workers`)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return plan_workers(nodes, workers, num_gpus_per_worker, cpus_per_worker)


def plan_workers(
    nodes: list[dict[str, float]],
    workers: int | None,
    num_gpus_per_worker: float | None,
    cpus_per_worker: float | None,
) -> ClusterPlan:
    """Size the actor pool from per-node resources (``{"CPU": ..., "GPU": ...}`` per live node).

    An actor lives on one node, so capacity is counted node by node: with GPUs, each worker takes
    ``num_gpus_per_worker`` (default 1) and, unless ``cpus_per_worker`` is given, an equal share of its GPU
    node's CPUs (at most 4; the smallest share over the GPU nodes, so every GPU slot can be placed). Without
    GPUs, each worker takes ``cpus_per_worker`` (default 1) CPUs. ``workers`` defaults to the number of actors
    that fit at once. Raises ``ValueError`` when no node can host even one worker.
    """
    max_gpus = max((float(r.get("GPU", 0.0)) for r in nodes), default=0.0)
    max_cpus = max((float(r.get("CPU", 0.0)) for r in nodes), default=0.0)
    total_gpus = sum(float(r.get("GPU", 0.0)) for r in nodes)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if max_gpus >= 1 else 0.0
    if num_gpus_per_worker < 0 or (cpus_per_worker is not None and cpus_per_worker < 0):
        raise ValueError(f"--num-gpus-per-worker and --cpus-per-worker must be >= 0, got {num_gpus_per_worker} "
                         f"and {cpus_per_worker}")
    if num_gpus_per_worker > 0 and max_gpus < num_gpus_per_worker:
        raise ValueError(f"--num-gpus-per-worker {num_gpus_per_worker:g} but no node has that many GPUs (largest "
                         f"node: {max_gpus:g}; cluster total: {total_gpus:g} on {len(nodes)} nodes); a worker "
                         f"runs on one node, so use a value <= {max_gpus:g}, or 0 for CPU workers")
    eps = 1e-9

    def slots(r: dict[str, float], gpus: float, cpus: float) -> int:
        fit = [int(float(r.get(k, 0.0)) / need + eps) for k, need in (("GPU", gpus), ("CPU", cpus)) if need > 0]
        return min(fit) if fit else 0

    if num_gpus_per_worker > 0:
        gpu_slots = [(r, slots(r, num_gpus_per_worker, 0.0)) for r in nodes]
        gpu_slots = [(r, k) for r, k in gpu_slots if k > 0]
        if cpus_per_worker is None:
            share = min(float(r.get("CPU", 0.0)) / k for r, k in gpu_slots)
            cpus_per_worker = min(4.0, float(int(share + eps))) if share >= 1 else share
    else:
        cpus_per_worker = 1.0 if cpus_per_worker is None else cpus_per_worker
        if cpus_per_worker <= 0:
            raise ValueError("--cpus-per-worker must be > 0 for CPU workers (no GPUs requested)")
    capacity = sum(slots(r, num_gpus_per_worker, cpus_per_worker) for r in nodes)
    if capacity == 0:
        raise ValueError(f"no node can host a worker needing {cpus_per_worker:g} CPUs and {num_gpus_per_worker:g} "
                         f"GPUs (largest node: {max_cpus:g} CPUs, {max_gpus:g} GPUs); lower --cpus-per-worker")
    n = workers or capacity
    if n > capacity:
        logger.warning("%d workers requested but only %d fit on the cluster at once; the rest start when resources "
                       "free up (e.g. when the autoscaler adds nodes)", n, capacity)
    return ClusterPlan(workers=n, num_gpus=float(num_gpus_per_worker), num_cpus=float(cpus_per_worker))


class ProgressBoard:
    """Images and prompts done so far in each shard being processed, reported by the workers (a Ray actor with no
    CPU of its own), so the driver's progress moves during long shards and not only when one commits."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}

    def report(self, shard: str, images: int, prompts: int) -> None:
        self._counts[shard] = (int(images), int(prompts))

    def drop(self, shard: str) -> None:
        self._counts.pop(shard, None)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self._counts)


def run_shards(
    shards: list[ShardRef],
    worker_config: WorkerConfig,
    plan: ClusterPlan,
    *,
    max_attempts: int = 4,
    on_progress: Callable[..., None] | None = None,
    shards_skipped: int = 0,
    start_timeout_s: float = 600.0,
    progress_every_s: float = 5.0,
) -> RunSummary:
    """Process ``shards`` on ``plan.workers`` actors; a shard whose actor died is retried up to ``max_attempts``.

    The driver owns retries: a shard lost with its actor (or node) goes back to the queue at once and is given to
    the next ready actor, while the lost actor restarts wherever Ray can place it and rejoins the pool once it
    answers. An actor that cannot be placed (e.g. its node was removed and no other node has a free GPU) is never
    given work. If no actor is ready and nothing runs for ``start_timeout_s`` while shards wait, the waiting
    shards are reported as failed instead of waiting forever.

    ``on_progress(summary, total_shards, seconds, images=..., prompts=...)`` is called every ``progress_every_s``
    seconds and at the end; ``images`` and ``prompts`` add the shards in flight (as their workers last reported
    them, through a :class:`ProgressBoard`) to the committed ones.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError, WorkerCrashedError

    summary = RunSummary(shards_total=len(shards) + shards_skipped, shards_skipped=shards_skipped)
    start = time.perf_counter()
    if not shards:
        return summary
    # max_task_retries=0: a task on a dead actor fails at once instead of waiting for a restart that may never be
    # placed; the loop below requeues its shard.
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=-1, max_task_retries=0,
    )
    n = min(plan.workers, len(shards))
    actors = [actor_cls.remote(worker_config) for _ in range(n)]
    board = ray.remote(num_cpus=0)(ProgressBoard).remote() if on_progress is not None else None
    worker_every = max(0.05, progress_every_s / 2)
    queue: deque[ShardRef] = deque(shards)
    attempts: dict[str, int] = {}
    idle: list[Any] = []
    starting: dict[Any, Any] = {actor.__ray_ready__.remote(): actor for actor in actors}
    recovering: list[tuple[float, Any]] = []  # (when to ask again, actor) for actors that are restarting
    in_flight: dict[Any, tuple[ShardRef, Any]] = {}
    last_report = 0.0
    last_usable = time.perf_counter()
    last_actor_error: BaseException | None = None
    while queue or in_flight:
        for due, actor in [r for r in recovering if r[0] <= time.perf_counter()]:
            recovering.remove((due, actor))
            starting[actor.__ray_ready__.remote()] = actor
        while queue and idle:
            shard, actor = queue.popleft(), idle.pop()
            attempts[shard.name] = attempts.get(shard.name, 0) + 1
            in_flight[actor.process.remote(shard, board, worker_every)] = (shard, actor)
        pending = [*in_flight, *starting]
        wait_s = min(2.0, max(0.05, progress_every_s / 2))
        done = ray.wait(pending, num_returns=1, timeout=wait_s)[0] if pending else []
        if not pending:
            time.sleep(0.5)
        for ref in done:
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ActorDiedError as e:
                    logger.error("a worker died for good and leaves the pool: %s", e)
                    last_actor_error = e
                except (RayActorError, WorkerCrashedError):
                    recovering.append((time.perf_counter() + 1.0, actor))
                continue
            shard, actor = in_flight.pop(ref)
            if board is not None:
                board.drop.remote(shard.name)
            try:
                summary.per_shard.append(ray.get(ref))
                idle.append(actor)
            except (RayActorError, WorkerCrashedError) as e:
                logger.warning("shard %s lost with its worker (%s); attempt %d", shard.name, type(e).__name__,
                               attempts[shard.name])
                _retry_or_fail(summary, queue, shard, attempts, max_attempts, e)
                starting[actor.__ray_ready__.remote()] = actor
            except RayTaskError as e:
                logger.error("shard %s failed: %s", shard.name, e)
                _retry_or_fail(summary, queue, shard, attempts, max_attempts, e)
                idle.append(actor)
        now = time.perf_counter()
        if idle or in_flight or not queue:
            last_usable = now
        elif not (starting or recovering) or now - last_usable > start_timeout_s:
            if starting or recovering:
                reason = (f"no worker became ready in {start_timeout_s:g}s; each requests {plan.num_cpus:g} CPUs "
                          f"and {plan.num_gpus:g} GPUs on one node (available: {ray.available_resources()}); check "
                          "--workers/--num-gpus-per-worker/--cpus-per-worker against the nodes")
            else:
                reason = f"no worker left: every worker died ({last_actor_error})"
            logger.error("%s; %d shards not processed", reason, len(queue))
            while queue:
                summary.failed[queue.popleft().name] = reason
        if on_progress is not None and (now - last_report >= progress_every_s or not (queue or in_flight)):
            images, prompts = summary.images, summary.instances
            if board is not None and in_flight:
                flying = {s.name for s, _ in in_flight.values()}
                try:
                    partial = ray.get(board.snapshot.remote(), timeout=10)
                except Exception as e:  # progress is best effort; the run goes on
                    logger.debug("no progress snapshot: %s", e)
                    partial = {}
                images += sum(v[0] for k, v in partial.items() if k in flying)
                prompts += sum(v[1] for k, v in partial.items() if k in flying)
            on_progress(summary, len(shards), now - start, images=images, prompts=prompts)
            last_report = now
    summary.seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    if board is not None:
        ray.kill(board)
    return summary


def _retry_or_fail(summary, queue, shard, attempts, max_attempts, error) -> None:
    if attempts[shard.name] < max_attempts:
        queue.append(shard)
    else:
        summary.failed[shard.name] = f"{type(error).__name__}: {error}"
