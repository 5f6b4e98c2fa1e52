"""Progress of long work on rank 0's stderr: the cost model's estimate first, then a bar.

A run or sweep whose estimate exceeds :data:`LONG_S` prints ``tpmpi: ... estimated ...`` before
it starts; the bar is tqdm's (extra ``progress``) weighted by the estimated seconds of each
unit of work, so its rate and ETA are in seconds; without tqdm, one line per unit.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, Optional, TextIO

from .costmodel import Calibration, predict
from .problem import Problem

LONG_S = 5.0  # work estimated above this many seconds announces itself and shows progress


def step_s(problem: Problem, ranks: int, grid: Sequence[int], calibration: Calibration,
           backend: str, oversubscription: float = 1.0) -> float:
    """Predicted seconds of one timed step (0 for a scheme the model does not know)."""
    pred = predict(problem, ranks, grid, calibration, backend, oversubscription)
    return pred.time_s if pred else 0.0


def case_units(problem: Problem, ranks: int, grid: Sequence[int], calibration: Calibration,
               backend: str, *, warmup: int, iters: int, baseline: bool, overlap: bool = False,
               oversubscription: float = 1.0) -> list[tuple[str, float]]:
    """The units of work of :func:`tpmpi.studies.bench.run_case` in the order it reports them, with
    their predicted seconds: the first step, each warmup and timed step, the overlap
    measurement (three timings of each phase), the verification (a parallel forward +
    backward and the serial float64 reference) and the serial baseline."""
    step = step_s(problem, ranks, grid, calibration, backend, oversubscription)
    both = dataclasses.replace(problem, backward=True)
    units = [("first step", step)] + [("warmup", step)] * warmup + [("timed", step)] * iters
    if overlap:
        units.append(("overlap", 3 * (1 + iters) * step))
    units.append(("verify", step_s(both, ranks, grid, calibration, backend, oversubscription)
                  + step_s(dataclasses.replace(both, dtype="float64"), 1, (1, 1), calibration,
                           "numpy")))
    if baseline:
        units.append(("baseline", (warmup + iters) * step_s(problem, 1, (1, 1), calibration,
                                                            backend)))
    return units


def case_s(*args: Any, **kwargs: Any) -> float:
    """Predicted seconds of :func:`tpmpi.studies.bench.run_case` (the sum of :func:`case_units`)."""
    return sum(t for _, t in case_units(*args, **kwargs))


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``1 h 05 min``."""
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0):.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """A bar over units of work weighted by their estimated seconds (tqdm when installed,
    else one line per unit); inert when ``enabled`` is false (ranks other than 0)."""

    def __init__(self, weights: Sequence[float], enabled: bool, *, unit: str = "run",
                 stream: Optional[TextIO] = None):
        self.enabled, self.total, self.unit = enabled, len(weights), unit
        self.weights = [max(1, round(1e3 * w)) for w in weights]  # estimated milliseconds
        self.stream = stream or sys.stderr
        self.done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=sum(self.weights), file=self.stream, dynamic_ncols=True,
                            mininterval=0.5,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def step(self, desc: str) -> None:
        """One unit of work done (described by ``desc``)."""
        if not self.enabled or self.done >= self.total:
            return
        self.done += 1
        if self.bar is None:
            self.stream.write(f"[{self.done}/{self.total}] {desc}\n")
            self.stream.flush()
            return
        self.bar.set_description_str(f"[{self.done}/{self.total} {self.unit}s] {desc}",
                                     refresh=False)
        self.bar.update(self.weights[self.done - 1])
        if self.done == self.total:
            self.bar.close()


def announce(what: str, seconds: float, enabled: bool, stream: Optional[TextIO] = None) -> bool:
    """Print ``tpmpi: <what>: estimated <duration> (cost model)`` when ``seconds`` exceeds
    :data:`LONG_S` and ``enabled``; returns whether the work counts as long."""
    long = seconds > LONG_S
    if long and enabled:
        out = stream or sys.stderr
        out.write(f"tpmpi: {what}: estimated {duration(seconds)} (cost model; progress "
                  f"below)\n")
        out.flush()
    return long

