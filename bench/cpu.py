"""CPU time of the annotation job's Ray actors, read from ``/proc`` while the job runs (Linux only).

Wall-clock rates on a shared machine move with whatever else it runs; the CPU time a process used moves much less,
so the pipeline benchmark reports both.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class ActorCpuSampler:
    """Samples the CPU time (user + system, all threads) of the ``ray::ShardWorker`` processes under this driver's
    raylet, from ``/proc``, every ``interval`` seconds on a background thread. Linux only; elsewhere it records
    nothing. CPU time is what the actors computed, whatever else the machine was running."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.series: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actor-cpu-sampler", daemon=True)
        self._raylet = _raylet_pid()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> ActorCpuSampler:
        if self._raylet is not None and os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            for pid, cpu in self._sample().items():
                self.series.setdefault(pid, []).append((now, cpu))
            self._stop.wait(self.interval)

    def _sample(self) -> dict[int, float]:
        parents: dict[int, int] = {}
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = fields
        out = {}
        for pid, fields in stats.items():
            p, depth = parents.get(pid), 0
            while p not in (None, 0, 1, self._raylet) and depth < 8:
                p, depth = parents.get(p), depth + 1
            if p != self._raylet:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if title.startswith(b"ray::ShardWorker"):
                out[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return out

    def cpu_seconds(self, busy: dict[int, float]) -> tuple[float, float] | None:
        """``(total, steady)`` CPU seconds over the actors: everything they used, and what they used in their last
        ``busy[pid]`` seconds of activity (their shards, so actor start-up excluded). None without samples."""
        if not self.series:
            return None
        total = steady = 0.0
        for pid, points in self.series.items():
            final = points[-1][1]
            total += final
            t_end = next(t for t, c in points if c >= final)  # when the actor stopped using CPU
            t_start = t_end - busy.get(pid, 0.0)
            earlier = [(t, c) for t, c in points if t <= t_start]
            steady += final - (earlier[-1][1] if earlier else 0.0)
        return total, steady


def _raylet_pid() -> int | None:
    """The pid of the raylet of the Ray instance this process started (None if it joined one or Ray changed)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return int(node.all_processes["raylet"][0].process.pid)
    except Exception:
        return None
