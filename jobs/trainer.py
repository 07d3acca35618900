"""Shared Ray Train scaffolding for the training jobs (``ovsam distill``, ``ovsam train``).

A job writes one ``train_fn(loop_config)`` that reads top to bottom (build model, ``restore()``, loop, ``report``)
and hands it to :func:`launch`, which runs it on ``num_workers`` Ray Train workers (``TorchTrainer``; gloo on CPU,
NCCL on GPU). The helpers below work inside a Ray Train worker and also in a plain process (rank 0 of 1), so the
same loop runs under ``pytest`` without Ray; :func:`run_local` runs it in this process with checkpoints in a
local directory (rank 0 of 1, resumable the same way).

Checkpoints: rank 0 writes ``state.pt`` (``torch.save`` of plain tensors/dicts/lists/numbers/strings, read back
with ``torch.load(weights_only=True)``) plus any extra files the job names (e.g. the project-format model file) and
reports the directory; Ray Train keeps the newest ``num_to_keep``. After a worker failure (up to ``max_failures``)
or a relaunch with the same ``(storage_path, name)``, :func:`restore` returns the latest state.

Gradients are averaged by hand with :func:`all_reduce_gradients` instead of DDP: frozen parameters and parameters
whose gradient is absent on some steps (e.g. the label MLP) make DDP's reducer fail or hang.

Progress: a loop calls :func:`progress` (or a ``jobs.progress.ProgressMeter`` that sends its time-based step lines
with it) on every rank; rank 0's lines reach the driver, which prints them as they come (``launch(...,
on_progress=print)``): on Ray Train through a :class:`ProgressSink` actor the driver polls, so they show whatever
``log_to_driver`` is, without Ray's ``(RayTrainWorker pid=...)`` prefix and untouched by Ray's log deduplication;
in :func:`run_local` directly.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

if TYPE_CHECKING:
    import ray.train

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"

# Set in the worker process by the wrapper `launch` installs around `train_fn`; False in a plain process.
_IN_RAY_TRAIN = False
# Set by `run_local` while it runs a loop in this process: {"dir": run directory, "keep": num_to_keep, ...}.
_LOCAL: dict[str, Any] | None = None
# Set in the worker process by `_Entry`: the driver's ProgressSink actor, or None when the driver prints no progress.
_PROGRESS_SINK: Any = None


@dataclass(frozen=True)
class TrainerConfig:
    """How a training run is placed and kept.

    ``storage_path`` is a local directory or an fsspec URL (``s3://bucket/runs``); ``storage_options`` are the
    fsspec options for it (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``) and never enter logs."""

    name: str  # run name; a relaunch with the same name and storage_path resumes
    storage_path: str  # where Ray Train keeps checkpoints (local dir or fsspec URL)
    num_workers: int = 2
    use_gpu: bool = False  # gloo on CPU, NCCL on GPU
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # FailureConfig
    num_to_keep: int = 2  # CheckpointConfig
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _storage(cfg: TrainerConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: local paths made absolute, URLs through fsspec."""
    if "://" not in cfg.storage_path or cfg.storage_path.startswith("file://"):
        path = cfg.storage_path.removeprefix("file://")
        return str(Path(path).expanduser().resolve()), None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(cfg.storage_path, **cfg.storage_options)
    return path, PyFileSystem(FSSpecHandler(fs))


class _Entry:
    """``train_fn`` marked as running inside a Ray Train worker, with the driver's progress sink (or None). A
    module-level class, so cloudpickle ships it by reference and the globals it sets are this module's (a closure
    would be shipped by value with its own globals)."""

    def __init__(self, train_fn: Callable[[dict], None], progress_sink: Any = None, log_level: int = logging.INFO):
        self.train_fn = train_fn
        self.progress_sink = progress_sink
        self.log_level = log_level
        self.__name__ = getattr(train_fn, "__name__", "train_fn")

    def __call__(self, loop_config: dict) -> None:
        global _IN_RAY_TRAIN, _PROGRESS_SINK
        _IN_RAY_TRAIN = True
        _PROGRESS_SINK = self.progress_sink
        # Ray Train sets the workers' root logger to INFO, and some of its own messages (a long line per report)
        # log through it; the workers log at the driver's level instead
        logging.getLogger().setLevel(self.log_level)
        self.train_fn(loop_config)


class ProgressSink:
    """Progress lines from rank 0 of a Ray Train run, held until the driver takes them (a Ray actor with no CPU of
    its own, created by :func:`launch`; it outlives worker restarts)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def put(self, line: str) -> None:
        self._lines.append(line)

    def take(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines


def _relay_progress(sink: Any, on_progress: Callable[[str], None], stop: threading.Event) -> None:
    """The driver's thread: hand the sink's lines to ``on_progress`` every 0.5 s, and once more after ``stop``."""
    import ray

    while True:
        stopped = stop.wait(0.5)
        try:
            lines = ray.get(sink.take.remote(), timeout=10)
        except Exception as e:  # progress is best effort; the run goes on
            logger.debug("no progress lines: %s", e)
            lines = []
        for line in lines:
            on_progress(line)
        if stopped:
            return


def launch(train_fn: Callable[[dict], None], loop_config: dict, cfg: TrainerConfig,
           on_progress: Callable[[str], None] | None = None) -> "ray.train.Result":
    """Run ``train_fn(loop_config)`` on ``cfg.num_workers`` Ray Train workers and return the result.

    Starts a local Ray instance if none is connected. The workers log at the level of the driver's ``jobs`` logger
    (``ovsam train``: warnings; ``-v``: info), Ray Train's own messages (a line per report) included. With
    ``on_progress``, rank 0's :func:`progress` lines are handed to it in this process as they come (every 0.5 s),
    the last ones before ``fit`` returns or raises. Raises ``ray.train.TrainingFailedError`` when the run fails
    more than ``cfg.max_failures`` times."""
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {cfg.num_workers}")
    if cfg.cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cfg.cpus_per_worker}")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    storage_path, storage_fs = _storage(cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    sink = ray.remote(num_cpus=0)(ProgressSink).remote() if on_progress is not None else None
    level = logging.getLogger("jobs").getEffectiveLevel()
    trainer = TorchTrainer(
        _Entry(train_fn, sink, level),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            logging_config=LoggingConfig(log_level="INFO" if level <= logging.INFO else "WARNING")),
    )
    logger.info("training run %r: %d worker(s), storage %s", cfg.name, cfg.num_workers, cfg.storage_path)
    if sink is None:
        return trainer.fit()
    stop = threading.Event()
    relay = threading.Thread(target=_relay_progress, args=(sink, on_progress, stop), name="ovsam-progress",
                             daemon=True)
    relay.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        relay.join(timeout=30)
        ray.kill(sink)


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint directory written by :func:`run_local` (the part of ``ray.train.Checkpoint`` jobs use)."""

    path: str

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass(frozen=True)
class LocalResult:
    """What :func:`run_local` returns: the last reported metrics and the newest checkpoint (or None)."""

    metrics: dict
    checkpoint: LocalCheckpoint | None


def _local_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and (p / STATE_FILE).is_file())


def run_local(train_fn: Callable[[dict], None], loop_config: dict, cfg: TrainerConfig,
              on_progress: Callable[[str], None] | None = None) -> LocalResult:
    """Run ``train_fn(loop_config)`` in this process as rank 0 of 1, without Ray.

    Checkpoints go to ``<storage_path>/<name>/checkpoint_NNNNNN`` (a local directory; the newest
    ``cfg.num_to_keep`` are kept) and :func:`restore` resumes from the newest, so a rerun with the same name
    continues. :func:`progress` lines go to ``on_progress``. For debugging, tests and single-machine runs;
    ``cfg.num_workers`` and ``max_failures`` are ignored."""
    global _LOCAL
    if "://" in cfg.storage_path and not cfg.storage_path.startswith("file://"):
        raise ValueError(f"run_local keeps checkpoints in a local directory; got storage_path "
                         f"{cfg.storage_path!r}; use launch() for remote storage")
    run_dir = Path(cfg.storage_path.removeprefix("file://")).expanduser().resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if _LOCAL is not None:
        raise RuntimeError("run_local is already running a loop in this process")
    _LOCAL = {"dir": run_dir, "keep": max(1, cfg.num_to_keep), "metrics": {}, "progress": on_progress}
    try:
        train_fn(loop_config)
        metrics = dict(_LOCAL["metrics"])
    finally:
        _LOCAL = None
    found = _local_checkpoints(run_dir)
    return LocalResult(metrics, LocalCheckpoint(str(found[-1])) if found else None)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from Ray Train inside a worker, ``(0, 1)`` elsewhere."""
    if not _IN_RAY_TRAIN:
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def progress(line: str) -> None:
    """Send one progress line to the driver, which prints it (rank 0's; other ranks' are dropped, so every rank may
    call it). Goes nowhere but the debug log when the driver asked for none (``--quiet``) or outside a run. In a
    Ray Train worker it waits (at most 10 s) until the driver's sink holds the line, so lines arrive in order and
    none is lost when the run ends; a line that cannot be delivered is logged, never raised."""
    if world()[0] != 0:
        return
    if _IN_RAY_TRAIN and _PROGRESS_SINK is not None:
        import ray

        try:
            ray.get(_PROGRESS_SINK.put.remote(line), timeout=10)
        except Exception as e:
            logger.warning("progress line not delivered (%s): %s", e, line)
    elif not _IN_RAY_TRAIN and _LOCAL is not None and _LOCAL.get("progress") is not None:
        _LOCAL["progress"](line)
    else:
        logger.debug("%s", line)


def read_state(directory: str | Path) -> dict:
    """The ``state.pt`` of a checkpoint directory, read with ``torch.load(weights_only=True)``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint directory {directory} has no {STATE_FILE}; it was not written by "
                                f"jobs.trainer.report")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore() -> dict | None:
    """The state of the run's latest checkpoint (``ray.train.get_checkpoint()``), or None on a fresh start."""
    if not _IN_RAY_TRAIN:
        if _LOCAL is None:
            return None
        found = _local_checkpoints(_LOCAL["dir"])
        if not found:
            return None
        logger.info("restored checkpoint %s", found[-1])
        return read_state(found[-1])
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = read_state(directory)
    logger.info("restored checkpoint %s", checkpoint.path)
    return state


def report(metrics: dict, state: dict | None = None,
           files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Report ``metrics``; with ``state``, rank 0 also saves a checkpoint (``state.pt`` and ``files[name](path)``).

    Every rank must call it the same number of times (it is a barrier across workers). Outside Ray Train the
    metrics are logged and nothing is saved."""
    if not _IN_RAY_TRAIN:
        logger.debug("metrics: %s", metrics)
        if _LOCAL is not None:
            _LOCAL["metrics"] = dict(metrics)
            if state is not None:
                _write_local_checkpoint(metrics, state, files)
        return
    import ray.train

    rank, _ = world()
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ovsam-ckpt-") as tmp:
        _write_checkpoint_dir(Path(tmp), state, files)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _write_checkpoint_dir(directory: Path, state: dict, files: dict[str, Callable[[Path], None]] | None) -> None:
    torch.save(state, directory / STATE_FILE)
    for name, write in (files or {}).items():
        if "/" in name or name in ("", ".", "..", STATE_FILE):
            raise ValueError(f"checkpoint file name {name!r} must be a plain file name other than {STATE_FILE}")
        write(directory / name)


def _write_local_checkpoint(metrics: dict, state: dict, files: dict[str, Callable[[Path], None]] | None) -> None:
    assert _LOCAL is not None
    run_dir: Path = _LOCAL["dir"]
    found = _local_checkpoints(run_dir)
    number = int(found[-1].name.rsplit("_", 1)[1]) + 1 if found else 0
    final = run_dir / f"checkpoint_{number:06d}"
    tmp = run_dir / f".tmp_checkpoint_{number:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_checkpoint_dir(tmp, state, files)
    tmp.rename(final)  # a checkpoint directory with state.pt is complete
    for old in _local_checkpoints(run_dir)[:-_LOCAL["keep"]]:
        shutil.rmtree(old, ignore_errors=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the workers (no-op in one process).

    A rank without a gradient for a parameter counts as zeros, so every rank reduces the same flat buffer; a
    parameter no rank has a gradient for keeps ``grad = None`` (the optimiser then skips it, as in one process)."""
    params = [p for p in params if p.requires_grad]
    if not _distributed() or not params:
        return
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
             for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype,
                           device=params[0].device)
    flat = torch.cat(grads + [present])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    for p, flag in zip(params, flat[offset:].tolist()):
        if flag == 0.0:
            p.grad = None


def barrier() -> None:
    """Wait for every worker (no-op in one process)."""
    if _distributed():
        torch.distributed.barrier()


def average_norm_statistics(module: torch.nn.Module) -> int:
    """Replace every BatchNorm running mean and variance in ``module`` by its mean over the workers; returns how
    many buffers that was (0 in one process).

    Gradients are averaged, so the workers' weights stay equal, but each worker's BatchNorm statistics follow its
    own batches; without this the workers would evaluate with different models and rank 0's checkpoint would hold
    only its own statistics. Every rank must call it."""
    buffers = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    if not _distributed() or not buffers:
        return 0
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= torch.distributed.get_world_size()
    offset = 0
    with torch.no_grad():
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
            offset += n
    return len(buffers)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the workers (every rank must pass the same keys); the input in one process."""
    if not _distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    t /= torch.distributed.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def shard_slice(urls: list[str]) -> list[str]:
    """This worker's shards: every ``world_size``-th URL from ``rank`` (disjoint, together all of them).

    Raises ValueError when there are fewer shards than workers, since a worker without shards would stall the
    others at the next collective."""
    rank, size = world()
    if len(urls) < size:
        raise ValueError(f"{len(urls)} shard(s) for {size} training workers: every worker needs at least one "
                         f"shard; write more, smaller shards or use fewer workers (--num-workers)")
    return list(urls[rank::size])
