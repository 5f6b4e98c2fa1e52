"""The timing loop of every benchmark (:func:`time_calls`): the one statistic policy
(docs/statistics.md). Every sample starts after a stream sync and a Barrier, ends with a stream
sync, and is the slowest rank's time; callers summarise the samples with
:func:`tpmpi.studies.stats.summary` (median, min, max) or take the best. Per-layer accounting of
GEMM and communication time is :class:`tpmpi.core.profiler.Profiler`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI


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
