"""Progress lines of the training jobs (``ovsam train``, ``ovsam distill``): :class:`ProgressMeter` makes the
time-based step lines a loop sends (``jobs.trainer.progress`` carries them from rank 0 to the driver), and
:func:`print_line` is how the driver prints them. Imports neither torch nor ray.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


def print_line(line: str) -> None:
    """Print one progress line now (flushed, so it shows at once through pipes and job logs)."""
    print(line, flush=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m07s`` or ``1h05m``."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


#: The most seconds between progress lines unless ``--progress-every`` says otherwise.
DEFAULT_PROGRESS_EVERY = 30.0

#: What a line may take from the meter to the terminal: the driver polls rank 0's lines every 0.5 s.
DELIVERY_S = 1.0


class ProgressMeter:
    """Time-based progress lines of a training loop, sent with ``send`` (in a loop: ``jobs.trainer.progress``).
    Call :meth:`step` after every optimiser step; it makes a line at the first step of the run (or of the resumed
    run), at the last step, and at the last step that ends before ``every_s`` seconds have passed since the previous
    step line, judged by the length of the step just made and ``DELIVERY_S`` for the line to reach the terminal, so
    that lines are never more than ``every_s`` apart while steps are shorter than that (``every_s=0``: every
    step)::

        [train] step 30/2000 (2%)  loss 2.0  22.6 images/s  elapsed 19s  ETA 6m58s + 800 CLIP2SAM steps  (trunk warm-up)
        [train] step 1400/2000 (70%)  loss 1.032  13.9 images/s  elapsed 4m41s  ETA 2m55s  (CLIP2SAM)

    ``loss`` is the mean of the losses passed in since the previous line, the rate counts every worker's samples
    over the training time since then, elapsed runs from ``started`` (a ``clock()`` time; default: now), and the
    ETA is the steps left in the current :meth:`phase` at its pace so far (``?`` before its first step; the steps of
    the phases after it, whose pace is not known yet, are named after it). Time inside :meth:`aside` (held-out evaluations) counts in elapsed
    but not in the rate or the pace; :meth:`note` sends any other line with the meter's tag. In a Ray Train loop
    every rank may use one: ``jobs.trainer.progress`` drops all but rank 0's."""

    def __init__(self, tag: str, total: int, every_s: float, *, start_step: int = 0, unit: str = "images",
                 phase: str = "", phase_end: int | None = None, then: str = "", started: float | None = None,
                 send: Callable[[str], None] = print_line, clock: Callable[[], float] = time.monotonic):
        self.tag, self.total, self.every_s, self.unit, self.send, self.clock = tag, total, every_s, unit, send, clock
        self.first = start_step + 1
        now = clock()
        self._last = self._prev_step = now
        self._aside_since_step = 0.0
        self.started = now if started is None else started
        self._losses: list[float] = []
        self._samples, self._window, self._window_aside = 0, now, 0.0
        self.phase(start_step, phase, phase_end, then)

    def phase(self, step: int, name: str, end: int | None = None, then: str = "") -> None:
        """From ``step`` on, the run is in phase ``name`` (shown on the lines) until step ``end`` (default: the
        last), with the ETA's pace measured afresh; ``then`` names what follows (e.g. ``800 CLIP2SAM steps``)."""
        self._phase, self._phase_step, self._phase_start, self._phase_aside = name, step, self.clock(), 0.0
        self._phase_end, self._then = min(self.total if end is None else end, self.total), then

    @contextlib.contextmanager
    def aside(self) -> Iterator[dict]:
        """Time spent in the block is left out of the rate and the pace; yields ``{"seconds": ...}``, set on exit."""
        timer = {"seconds": 0.0}
        start = self.clock()
        try:
            yield timer
        finally:
            timer["seconds"] = self.clock() - start
            self._window_aside += timer["seconds"]
            self._aside_since_step += timer["seconds"]
            self._phase_aside += timer["seconds"]

    def note(self, text: str) -> None:
        self.send(f"{self.tag} {text}")

    def step(self, step: int, loss: float, samples: int) -> str | None:
        """Count one step (``loss`` of it, ``samples`` over every worker); returns the line when one was made."""
        self._losses.append(float(loss))
        self._samples += samples
        now = self.clock()
        step_s = max(now - self._prev_step - self._aside_since_step, 0.0)  # the step just made, evaluations aside
        self._prev_step, self._aside_since_step = now, 0.0
        due = now - self._last + step_s + DELIVERY_S >= self.every_s  # the next step's line would come too late
        if not (step == self.first or step >= self.total or due):
            return None
        busy = max(now - self._window - self._window_aside, 1e-9)
        done = step - self._phase_step
        pace = (now - self._phase_start - self._phase_aside) / done if done > 0 else 0.0
        eta = duration(max(self._phase_end - step, 0) * pace) if done > 0 else "?"
        if self._phase_end < self.total:
            eta += f" + {self._then or f'{self.total - self._phase_end} steps'}"
        line = (f"{self.tag} step {step}/{self.total} ({step / max(self.total, 1):.0%})  "
                f"loss {sum(self._losses) / len(self._losses):.4g}  {self._samples / busy:.1f} {self.unit}/s  "
                f"elapsed {duration(now - self.started)}  ETA {eta}" + (f"  ({self._phase})" if self._phase else ""))
        self.send(line)
        self._last = self._window = now
        self._losses, self._samples, self._window_aside = [], 0, 0.0
        return line
