"""The timing loop of every benchmark (:func:`time_calls`), and per-layer accounting of local
GEMM time, communication time and collective bytes (:class:`Profiler`).

:func:`time_calls` is the one statistic policy (docs/statistics.md): every sample starts after
a stream sync and a Barrier, ends with a stream sync, and is the slowest rank's time; callers
summarise the samples with :func:`tpmpi.stats.summary` (median, min, max) or take the best.

Layers wrap each local product in ``prof.gemm()`` and each collective in
``prof.comm(op, nbytes, nranks)``; the benchmark reads and resets the totals. ``nbytes`` is the
nccl-tests size ``S`` of the operation (the full gathered/reduced array), so
``busbw = S * factor(op, P) / t``.

Timing is off the hot path unless asked for: a layer's own profiler is untimed (``timed=False``:
it counts collectives and bytes, reads no clock and never synchronises the stream); the
benchmark attaches a timed one (:meth:`tpmpi.layers.ParallelLinear.attach_profiler`), which
synchronises the device stream at each region boundary so that GPU work is charged to the
region that launched it.

For overlap measurements (:mod:`tpmpi.overlap`) a profiler can run instrumented layers with only
one phase: ``with prof.only("gemm"):`` skips their collectives, ``prof.only("comm")`` their
GEMMs (results are then meaningless; only the time counts).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
from mpi4py import MPI

from .colltable import bus_factor

PHASES = ("gemm", "comm")


def time_calls(calls: Sequence[Callable[[], Any]], comm: Optional[MPI.Comm] = None, *,
               sync: Optional[Callable[[], None]] = None, iters: int = 1, warmup: int = 0,
               repeat: int = 1, clock: Callable[[], float] = time.perf_counter,
               readings: Optional[Callable[[], Sequence[float]]] = None,
               after: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Seconds per call of ``calls``, run in order in each of ``iters`` timed rounds after
    ``warmup`` untimed calls of each: a round starts with ``sync()`` (a device stream sync, or
    None) and a Barrier over ``comm``; each call is then clocked over ``repeat`` back-to-back
    calls and a ``sync()``, divided by ``repeat``. ``readings()`` (e.g. profiler totals) adds
    the increase of each of its values over a round as further rows; ``after(i)`` runs after
    round ``i``. Returns an array (calls + readings, iters), every entry the maximum over the
    ranks of ``comm`` (one Allreduce after the last round; none without ``comm``, e.g. the
    serial baseline on one rank). Collective over ``comm``."""
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for call in calls:
            call()
    out = np.zeros((len(calls) + (len(readings()) if readings else 0), iters))
    for i in range(iters):
        wait()
        if comm is not None:
            comm.Barrier()
        before = readings() if readings else ()
        for j, call in enumerate(calls):
            t0 = clock()
            for _ in range(repeat):
                call()
            wait()
            out[j, i] = (clock() - t0) / repeat
        if readings:
            out[len(calls):, i] = np.subtract(readings(), before)
        if after is not None:
            after(i)
    if comm is not None:
        comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out


_UNTIMED = contextlib.nullcontext()


class Profiler:
    """Accumulates ``gemm_s``, ``comm_s``, ``bytes`` (sum of S) and ``bus_bytes`` (sum of
    S x bus factor). ``sync`` (the backend's stream sync) runs before each clock read so that
    device work is charged to the region that launched it. With ``timed=False`` the regions
    only count collectives and bytes (``gemm_s`` and ``comm_s`` stay 0, ``sync`` never runs)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None, *, timed: bool = True):
        self.sync = sync
        self.timed = timed
        self.phases: frozenset = frozenset(PHASES)
        self.reset()

    @classmethod
    def for_backend(cls, backend) -> Profiler:
        """A timed profiler that synchronises ``backend``'s stream (on a GPU) at each region
        boundary."""
        return cls(backend.synchronize if backend.is_gpu else None)

    def reset(self) -> None:
        """Zero all totals."""
        self.gemm_s = self.comm_s = 0.0
        self.bytes = self.bus_bytes = 0.0
        self.calls: dict[str, int] = {}

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def gemm(self) -> ContextManager[None]:
        """Charge the block to local computation."""
        return self._timed_gemm() if self.timed else _UNTIMED

    def comm(self, op: str, nbytes: int, nranks: int) -> ContextManager[None]:
        """Charge the block to collective ``op`` of ``nbytes`` over ``nranks``."""
        if not self.timed:
            self.count(op, nbytes, nranks)
            return _UNTIMED
        return self._timed_comm(op, nbytes, nranks)

    @contextlib.contextmanager
    def _timed_gemm(self) -> Iterator[None]:
        t0 = self._now()
        yield
        self.gemm_s += self._now() - t0

    @contextlib.contextmanager
    def _timed_comm(self, op: str, nbytes: int, nranks: int) -> Iterator[None]:
        t0 = self._now()
        yield
        self.comm_s += self._now() - t0
        self.count(op, nbytes, nranks)

    def count(self, op: str, nbytes: int, nranks: int) -> None:
        """Record a collective's bytes without timing it (e.g. one overlapped with a GEMM)."""
        if nranks > 1:
            self.bytes += nbytes
            self.bus_bytes += nbytes * bus_factor(op, nranks)
            self.calls[op] = self.calls.get(op, 0) + 1

    def runs(self, phase: str) -> bool:
        """Whether layers should run their ``"gemm"`` or ``"comm"`` work now."""
        return phase in self.phases

    @contextlib.contextmanager
    def only(self, phase: str) -> Iterator[None]:
        """Run only ``phase`` (``"gemm"`` or ``"comm"``) of the instrumented layers inside the
        block (timing runs for :func:`tpmpi.overlap.measure_overlap`)."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: expected one of {', '.join(PHASES)}")
        saved, self.phases = self.phases, frozenset([phase])
        try:
            yield
        finally:
            self.phases = saved

    def totals(self) -> dict:
        """A snapshot of the totals."""
        return {"gemm_s": self.gemm_s, "comm_s": self.comm_s, "bytes": self.bytes,
                "bus_bytes": self.bus_bytes, "calls": dict(self.calls)}
