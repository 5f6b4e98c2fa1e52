"""How much communication a layer hides behind its GEMMs (the OSU micro-benchmarks convention).

``overlap % = max(0, 100 - 100 * (t_overall - t_compute) / t_comm)``: 100 when the
communication costs nothing on top of the computation, 0 when it is fully exposed.
:func:`measure_overlap` times one call of a module three ways: as is (``t_overall``), with only
its local work (``t_compute``: ``isolate(module, "gemm")`` swaps its communication operators
for inert twins) and with only its collectives (``t_comm``: ``isolate(module, "comm")`` swaps
its local work for an inert twin); :func:`measure_dp_overlap` does the same for the
data-parallel gradient Allreduce. The layers know nothing of this: the twins are put in place
from outside, for the duration of the measurement.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from ..core.agreement import agree_checks
from ..core.args import check_int
from ..core.arrays import Array
from ..core.gemm import LocalWork
from ..core.mappings import DONE, Operator, Pending
from ..layers.data_parallel import DataParallel
from ..layers.module import modules
from .timing import time_calls

PHASES = ("gemm", "comm")
"""What :func:`isolate` keeps: the local work ("gemm") or the collectives ("comm")."""


class InertOperator:
    """An operator's twin that communicates nothing: its results are allocated as the
    operator's (:meth:`~tpmpi.core.mappings.Operator.out`) and left as they are; everything
    else is the operator's."""

    def __init__(self, operator: Operator) -> None:
        self._operator = operator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._operator, name)

    def __call__(self, x: Array, size: Any = None) -> Any:
        self._operator.pending.settle()
        return self._operator.out(x, size)

    def during(self, x: Array, work: Callable[[], Any], size: Any = None) -> Any:
        out = self(x, size)
        work()
        return out

    def start(self, x: Array, size: Any = None, out: Optional[Array] = None) -> Pending:
        self._operator.pending.settle()
        return DONE


class InertWork(LocalWork):
    """A module's local work that computes nothing: products are zeros of their shape (in
    ``out`` when given), column sums zeros, element-wise functions return their input."""

    def product(self, a: Array, b: Array, out: Optional[Array] = None,
                bias: Optional[Array] = None) -> Array:
        if out is None:
            out = self.xp.zeros((a.shape[0], b.shape[1]), dtype=a.dtype)
        else:
            out.fill(0)  # defined values for whatever follows (e.g. an activation)
        self.pending.settle()
        return out

    def column_sums(self, a: Array, dtype: Any = None) -> Array:
        return self.xp.zeros(a.shape[1:], dtype=a.dtype if dtype is None else dtype)

    def pointwise(self, fn: Callable[..., Array], x: Array, *args: Array) -> Array:
        return x


@contextlib.contextmanager
def isolate(module: Any, phase: str) -> Iterator[None]:
    """Inside the block, ``module`` (a layer or composite) and its sub-modules run only
    ``phase``: "gemm" swaps every communication operator for an :class:`InertOperator`, "comm"
    every local work for an :class:`InertWork` (results are then meaningless; only the time
    counts). Restored on leaving, an error included. Local."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: expected one of {', '.join(PHASES)}")
    swapped: list[tuple[Any, str, Any]] = []
    for sub in modules(module):
        for name, value in list(vars(sub).items()):
            if phase == "gemm" and isinstance(value, Operator):
                swapped.append((sub, name, value))
                setattr(sub, name, InertOperator(value))
            elif phase == "comm" and isinstance(value, LocalWork):
                swapped.append((sub, name, value))
                twin = InertWork(value.xp, value.pending)
                twin.tap = value.tap
                setattr(sub, name, twin)
    try:
        yield
    finally:
        for sub, name, value in swapped:
            setattr(sub, name, value)


def overlap_percent(overall_s: float, compute_s: float, comm_s: float) -> float:
    """OSU overlap in percent, clamped to [0, 100]; 0 when there is no communication."""
    if comm_s <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 - 100.0 * (overall_s - compute_s) / comm_s))


@dataclass(frozen=True)
class OverlapTimes:
    """Median seconds (max over ranks) of one call as is, GEMMs only, collectives only."""

    overall_s: float
    compute_s: float
    comm_s: float

    @property
    def overlap_pct(self) -> float:
        """:func:`overlap_percent` of the three times."""
        return overlap_percent(self.overall_s, self.compute_s, self.comm_s)

    @property
    def saved_s(self) -> float:
        """Time the overlap saved against running the two parts one after the other, between 0
        and the communication's time (overlap hides communication; a whole call timed faster
        than its local work alone is noise: :func:`tpmpi.studies.stats.overlap_implausible`)."""
        return min(self.comm_s, max(0.0, self.compute_s + self.comm_s - self.overall_s))

    def as_dict(self) -> dict:
        """Record fields: ``overall_s, compute_s, comm_only_s, overlap_pct, saved_s``."""
        return {"overall_s": self.overall_s, "compute_s": self.compute_s,
                "comm_only_s": self.comm_s, "overlap_pct": self.overlap_pct,
                "saved_s": self.saved_s}


def median_time(call: Callable[[], Any], comm: MPI.Comm, sync: Optional[Callable[[], None]],
                warmup: int, iters: int) -> float:
    """Median over ``iters`` samples (after ``warmup`` calls) of the slowest rank's time of
    ``call()`` (:func:`tpmpi.studies.timing.time_calls`: each started by a Barrier, ended by
    ``sync``, a device sync or None). Collective over ``comm``."""
    return float(np.median(time_calls([call], comm, sync=sync, warmup=warmup, iters=iters)))


def measure_overlap(module: Any, call: Callable[[], Any], *, warmup: int = 1,
                    iters: int = 5) -> OverlapTimes:
    """Time ``call()`` (one call of ``module``, a layer or composite: e.g. ``lambda:
    layer(x)`` or ``lambda: layer.backward(dy)``) as is, under ``isolate(module, "gemm")`` and
    under ``isolate(module, "comm")``. Collective over the module's communicator (a Barrier
    before and a max-Allreduce after each timed call). Gradients accumulate."""
    layer = next(sub for sub in modules(module) if hasattr(sub, "comm"))
    comm = layer.comm

    def local_checks() -> None:
        check_int("iters", iters, 1)
        check_int("warmup", warmup)

    agree_checks(comm, local_checks, warmup=warmup, iters=iters)
    sync = layer.backend.synchronize if layer.backend.is_gpu else None
    overall = median_time(call, comm, sync, warmup, iters)
    times = []
    for phase in PHASES:
        # a skipped collective leaves stale buffers behind: their values are meaningless
        with np.errstate(all="ignore"), isolate(module, phase):
            times.append(median_time(call, comm, sync, warmup, iters))
    return OverlapTimes(overall, *times)


def measure_dp_overlap(dp: DataParallel, dy: Array, *, warmup: int = 1, iters: int = 5
                       ) -> OverlapTimes:
    """How much of the DP gradient Allreduce the backward pass hides (OSU convention,
    :func:`overlap_percent`): ``overall`` = ``dp.backward(dy)``, ``compute`` =
    the module's backward alone (its TP collectives included), ``comm`` =
    :meth:`DataParallel.allreduce_gradients` alone; medians of the slowest rank. Needs a
    forward first; gradients accumulate (meaningless afterwards). Collective over the mesh."""
    def local_checks() -> None:
        check_int("iters", iters, 1)
        check_int("warmup", warmup)

    comm = dp.mesh.comm
    agree_checks(comm, local_checks, warmup=warmup, iters=iters)
    sync = dp.backend.synchronize if dp.backend.is_gpu else None
    times = [median_time(call, comm, sync, warmup, iters) for call in (
        lambda: dp.backward(dy), lambda: dp.module.backward(dy), dp.allreduce_gradients)]
    return OverlapTimes(*times)
