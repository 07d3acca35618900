"""One shard, end to end, inside one worker: read -> decode + prepare -> model -> rows -> commit, on threads that
keep the model busy.

``ShardWorker`` is a plain class; ``pipeline/annotate/run.py`` hosts it in Ray actors. A shard is the unit of work and of
commit: its rows are kept on the worker (masks as RLE) until the shard is complete, then written and committed
with the manifest last, so a killed worker leaves nothing visible and a rerun redoes the shard from scratch.

Threads of a worker while it processes a shard (the model never waits for the others unless they fall behind):

- **reader** (one): streams the shard (``open_shard``: a tar, or a virtual shard's image files) and hands each
  sample to the decode pool, at most ``read_ahead`` samples ahead of the model, so memory does not grow with the
  shard;
- **decode pool** (``decode_threads``): ``decode_sample`` (Pillow releases the GIL for the pixel work) and, on GPU
  workers, ``Annotator.prepare`` (RGB, resize, normalise, pad: the model-input image);
- **model** (the caller's thread): ``Annotator.run_model`` on batches of ``batch_size`` samples in shard order
  (on CPU workers it also makes the model input); each chunk of predictions goes to the row thread as soon as it is
  computed;
- **rows** (one): ``Annotator.chunk_rows`` and ``finish`` (masks -> RLE, labels, instance rows). Dense masks
  waiting for it are bounded by ``MASK_BUDGET_BYTES``; past that the model thread waits (``wait_rows``).

On CPU workers torch's threads use every CPU, so the helpers run at a lower priority and fill the model's gaps
(:func:`helper_plan`, :func:`thread_plan`).

The Parquet files are written at commit, after the last batch's rows.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pipeline.inputs.decode import DEFAULT_MAX_PIXELS, DecodedSample, decode_sample
from pipeline.annotate.proposals import Proposals
from pipeline.inputs.sources import ShardRef, open_shard
from pipeline.annotate.stages import Annotator, ModelOutput, ModelStageConfig, PromptChunk, SampleInput, SampleResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Per-worker settings. ``storage_options`` are fsspec options (credentials stay in memory only).

    ``cpus`` is the number of CPUs the worker may use (the actor's ``num_cpus``; default: torch's thread count);
    torch's thread count and the decode pool's size follow from it and the device (:func:`thread_plan`) unless
    ``torch_threads`` / ``decode_threads`` are given. ``read_ahead`` (default ``2 * batch_size``, at least 4)
    bounds the decoded samples waiting for the model. ``prepare_ahead`` (default: on GPU workers) makes the model
    input on the decode threads instead of the model thread, and ``helper_nice`` (default: 19 on CPU workers, 0 on
    GPU workers) is added to the niceness of the reader, decode and row threads; see :func:`helper_plan`.
    ``warm_up`` runs :meth:`Annotator.warm_up` and the Parquet encoder once when the worker starts, so that the
    first shard does not pay first-call costs (a failure there is logged and left to the shards to report)."""

    output: str
    stage: ModelStageConfig
    config_hash: str
    batch_size: int = 8
    decode_threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    cpus: float | None = None
    torch_threads: int | None = None
    read_ahead: int | None = None
    prepare_ahead: bool | None = None
    helper_nice: int | None = None
    warm_up: bool = True


def to_stage_input(d: DecodedSample) -> SampleInput:
    """Map a decoded sample to the model stage's input (sidecar prompts become proposals)."""
    props = Proposals(boxes=d.boxes_xyxy, points=d.points, scores=list(d.scores), labels=list(d.labels))
    notes = list(d.notes) + [f"prompt {i}: {r}" for i, r in d.dropped_prompts]
    return SampleInput(key=d.key, image=d.image, status=d.status, error=d.error, width=d.width, height=d.height,
                       source_format=d.source_format, source_name=d.source_name, proposals=props,
                       num_prompts_dropped=d.num_prompts_dropped, notes=notes)


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


def thread_plan(cpus: float, device: str) -> tuple[int, int]:
    """``(torch threads, decode threads)`` for a worker with ``cpus`` CPUs running the model on ``device``.

    On the CPU the model is the work: torch gets every CPU up to 4 (decoding, resizing and row building are ~15% of
    the model's time there and run in its gaps, on one decode thread), and above that one CPU in five is left to
    the helpers, which then get as many decode threads. On a GPU the CPUs decode, resize and build rows while
    torch's CPU pool only runs host-side glue: torch gets 1 thread (2 from 8 CPUs on) and decoding every CPU."""
    n = max(1, int(cpus))
    if str(device).startswith("cuda"):
        return (1 if n < 8 else 2), n
    helpers = n // 5
    return n - helpers, max(1, helpers)


def helper_plan(device: str) -> tuple[bool, int]:
    """``(prepare ahead, helper niceness increment)`` for a worker running the model on ``device``.

    On a GPU the helper threads are where the CPU work is: they run at normal priority and also make the model
    input (its torch ops are device kernels there). On the CPU, torch's threads take every CPU and slow down a lot
    whenever one of them waits for a core (each parallel op waits for its slowest thread): the helpers run at
    niceness +19, so they take the CPU in the model's gaps instead of from it, and the model input is made on the
    model thread, because torch ops on a decode thread start a second OpenMP team whose spinning threads compete
    with the model's. (Measured with ovsam-tiny on 2 CPUs: model part alone 31 ms/image; next to normal-priority
    helpers 48 ms; with both measures 31 ms.)"""
    if str(device).startswith("cuda"):
        return True, 0
    return False, 19


class _Stopwatch:
    """Seconds per name, added from any thread."""

    def __init__(self, *names: str) -> None:
        self.seconds = dict.fromkeys(names, 0.0)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.add(name, time.perf_counter() - t)

        return run


class _ByteBudget:
    """Bytes of dense masks handed to the row thread and not yet encoded. ``acquire`` waits while more than
    ``limit`` would be outstanding (one item always fits, however large)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            while self.used > 0 and self.used + n > self.limit:
                self._cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ReadAhead:
    """Reads a shard on a thread and decodes it on ``pool``, at most ``limit`` samples ahead of the consumer;
    iterating yields ``work(sample)`` results in shard order."""

    def __init__(self, reader: Any, pool: ThreadPoolExecutor, work: Callable[[Any], Any], limit: int,
                 clock: _Stopwatch, nice: int = 0) -> None:
        self._reader, self._pool, self._work, self._clock, self._nice = reader, pool, work, clock, nice
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, limit))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ovsam-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        lower_priority(self._nice)
        try:
            samples = iter(self._reader)
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    sample = next(samples)
                except StopIteration:
                    break
                finally:
                    self._clock.add("read", time.perf_counter() - t)
                if not self._put(self._pool.submit(self._work, sample)):
                    break
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer's thread
            self._put(_Failed(e))
        finally:
            if self._stop.is_set() and hasattr(self._reader, "close"):
                self._reader.close()
            self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item.result()

    def close(self) -> None:
        """Stop reading (if it has not ended) and wait for the reader thread."""
        self._stop.set()
        self._thread.join()


class ShardWorker:
    """Loads the model once; :meth:`process` annotates and commits one shard and returns its summary."""

    def __init__(self, config: WorkerConfig) -> None:
        import dataclasses

        import fsspec
        import torch

        self.config = config
        device = resolve_device(config.stage.device)
        cpus = config.cpus if config.cpus is not None else torch.get_num_threads()
        torch_threads, decode_threads = thread_plan(cpus, device)
        self.torch_threads = config.torch_threads or torch_threads
        self.decode_threads = max(1, config.decode_threads or decode_threads)
        prepare_ahead, helper_nice = helper_plan(device)
        self.prepare_ahead = prepare_ahead if config.prepare_ahead is None else config.prepare_ahead
        self.helper_nice = helper_nice if config.helper_nice is None else config.helper_nice
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        _single_threaded_opencv()
        self.annotator = Annotator(dataclasses.replace(config.stage, device=device))
        self.fs, self.root = fsspec.core.url_to_fs(config.output, **config.storage_options)
        self.require_prompts = config.stage.prompts == "sidecar"
        self.warm_up_s = self._warm_up() if config.warm_up else None

    def _warm_up(self) -> float | None:
        """:meth:`Annotator.warm_up` and the sink's; seconds, or None when it failed (logged: the shards then
        meet the same failure and report it per sample)."""
        from pipeline.annotate.sinks import warm_up

        t = time.perf_counter()
        try:
            results = self.annotator.warm_up()
            warm_up([{**row, "shard": "_warm_up"} for r in results for row in r.instance_rows],
                    [{**r.image_row, "shard": "_warm_up"} for r in results])
        except Exception:
            logger.exception("the worker's warm-up pass failed")
            return None
        seconds = time.perf_counter() - t
        logger.info("worker warm-up: %.2fs", seconds)
        return seconds

    def _decode(self, sample: Any) -> SampleInput:
        """Decode-pool work for one sample: decode, then the model-input image."""
        d = decode_sample(sample, max_pixels=self.config.max_pixels, require_prompts=self.require_prompts,
                          use_sidecar_prompts=self.require_prompts)
        return to_stage_input(d)

    def process(self, shard: ShardRef, progress: Any = None, progress_every_s: float = 2.0) -> dict[str, Any]:
        """Annotate ``shard`` and commit it. Returns counts, per-stage times (seconds) and model-busy %.

        ``timings`` is the model thread's time from start to commit, by what it was doing: ``wait_input`` (waiting
        for decoded samples), ``model`` (inside the model part, ``Annotator.run_model``), ``wait_rows`` (waiting
        for the row thread: mask budget full, or the last rows before commit) and ``write`` (Parquet files and
        manifest). ``background`` is the busy time of the other threads, which overlaps those: ``read``,
        ``decode``, ``prepare`` (summed over the decode threads) and ``rows``. ``model_busy_pct`` is
        ``100 * model / seconds``: the share of the shard's wall time, from the start of processing to its
        commit, that the model was computing.

        ``progress`` (a :class:`pipeline.annotate.run.ProgressBoard` actor handle, or None) is told the images and prompts
        done so far at most every ``progress_every_s`` seconds, so the driver can report a long shard as it goes."""
        from pipeline.annotate.sinks import commit_shard
        from pipeline.annotate.stages import MASK_BUDGET_BYTES

        t0 = time.perf_counter()
        timings = {"wait_input": 0.0, "model": 0.0, "wait_rows": 0.0, "write": 0.0}
        clock = _Stopwatch("read", "decode", "prepare", "rows")
        budget = _ByteBudget(MASK_BUDGET_BYTES)
        reader = open_shard(shard, self.config.storage_options)
        limit = self.config.read_ahead or max(2 * self.config.batch_size, 4)
        annotator = self.annotator
        finished: list[Future] = []
        emit_wait = [0.0]
        decode = clock.timed("decode", self._decode)
        prepare = clock.timed("prepare", annotator.prepare)
        chunk_rows = clock.timed("rows", annotator.chunk_rows)
        finish = clock.timed("rows", annotator.finish)

        def decode_and_prepare(sample: Any) -> SampleInput:
            s = decode(sample)
            return prepare(s) if self.prepare_ahead else s

        pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="ovsam-decode",
                                  initializer=lower_priority, initargs=(self.helper_nice,))
        rows = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovsam-rows",
                                  initializer=lower_priority, initargs=(self.helper_nice,))

        def emit(chunk: PromptChunk) -> None:
            nbytes = chunk.nbytes
            t = time.perf_counter()
            budget.acquire(nbytes)
            emit_wait[0] += time.perf_counter() - t

            def build() -> None:
                try:
                    chunk_rows(chunk)
                finally:
                    budget.release(nbytes)

            rows.submit(build)

        done = {"images": 0, "prompts": 0, "reported": time.perf_counter()}

        def run_batch(batch: list[SampleInput]) -> None:
            t, waited = time.perf_counter(), emit_wait[0]
            outputs: list[ModelOutput] = annotator.run_model(batch, emit=emit)
            waited = emit_wait[0] - waited
            timings["model"] += time.perf_counter() - t - waited
            timings["wait_rows"] += waited
            done["images"] += len(outputs)
            done["prompts"] += sum(out.num_prompts for out in outputs)
            if progress is not None and time.perf_counter() - done["reported"] >= progress_every_s:
                progress.report.remote(shard.name, done["images"], done["prompts"])  # fire and forget
                done["reported"] = time.perf_counter()
            for out in outputs:
                out.sample.image = None  # the model is done with the pixels
                finished.append(rows.submit(finish, out))

        inputs = _ReadAhead(reader, pool, decode_and_prepare, limit, clock, self.helper_nice)
        try:
            batch: list[SampleInput] = []
            t = time.perf_counter()
            for sample in inputs:
                batch.append(sample)
                if len(batch) >= self.config.batch_size:
                    timings["wait_input"] += time.perf_counter() - t
                    run_batch(batch)
                    batch = []
                    t = time.perf_counter()
            timings["wait_input"] += time.perf_counter() - t
            if batch:
                run_batch(batch)
            t = time.perf_counter()
            results: list[SampleResult] = [f.result() for f in finished]
            timings["wait_rows"] += time.perf_counter() - t
        finally:
            inputs.close()
            pool.shutdown(wait=True, cancel_futures=True)
            rows.shutdown(wait=True, cancel_futures=True)
        report = reader.report
        if report is not None and report.read_failed:
            raise ShardReadFailed(f"shard {shard.name} ({shard.url}) was not read whole: {report.error}; "
                                  "nothing committed")
        image_rows = [{**r.image_row, "shard": shard.name} for r in results]
        instance_rows = [{**row, "shard": shard.name} for r in results for row in r.instance_rows]
        t = time.perf_counter()
        manifest = commit_shard(
            self.fs, self.root, shard.name, instance_rows, image_rows,
            input_url=shard.url, config_hash=self.config.config_hash, read_report=report,
            attempt_id=uuid.uuid4().hex[:12],
        )
        timings["write"] = time.perf_counter() - t
        seconds = time.perf_counter() - t0
        statuses: dict[str, int] = {}
        for row in image_rows:
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        return {"shard": shard.name, "node_id": _node_id(), "pid": os.getpid(),
                "images": len(image_rows), "instances": len(instance_rows),
                "statuses": statuses, "truncated": bool(report and report.truncated),
                "read_error": None if report is None else report.error, "timings": timings,
                "background": dict(clock.seconds), "seconds": seconds,
                "model_seconds": timings["model"], "model_busy_pct": model_busy_pct(timings["model"], seconds),
                "precision": annotator.precision, "warm_up_s": self.warm_up_s, "peak_rss_mb": peak_rss_mb(),
                "threads": {"torch": self.torch_threads, "decode": self.decode_threads,
                            "helper_nice": self.helper_nice, "prepare_ahead": self.prepare_ahead},
                "manifest": manifest}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``; 0 where the platform lacks it)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return 0.0


def model_busy_pct(model_seconds: float, wall_seconds: float) -> float:
    """``100 * model_seconds / wall_seconds`` (0 for no wall time): the share of a worker's processing wall time
    spent inside model calls."""
    return 100.0 * model_seconds / wall_seconds if wall_seconds > 0 else 0.0


def lower_priority(increment: int) -> None:
    """Raise the calling thread's niceness by ``increment`` (at most to 19). Linux schedules each thread on its
    own, so this lowers only the calling thread; elsewhere, or where it is refused, nothing changes."""
    if increment <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        pass


def _single_threaded_opencv() -> None:
    """OpenCV's own thread pool (used by ``cv2.resize`` in ``prepare``) would compete with torch's and with the
    decode pool, which already gives resizing its parallelism; results do not depend on it."""
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None
