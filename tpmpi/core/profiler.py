"""Per-layer accounting of local GEMM time, communication time and collective bytes
(:class:`Profiler`).

Layers wrap each local product in ``prof.gemm()`` and each collective in
``prof.comm(op, nbytes, nranks)``; the benchmark reads and resets the totals. ``nbytes`` is the
nccl-tests size ``S`` of the operation (the full gathered/reduced array), so
``busbw = S * factor(op, P) / t``.

Timing is off the hot path unless asked for: a layer's own profiler is untimed (``timed=False``:
it counts collectives and bytes, reads no clock and never synchronises the stream); the
benchmark attaches a timed one (:meth:`tpmpi.layers.ParallelLinear.attach_profiler`), which
synchronises the device stream at each region boundary so that GPU work is charged to the
region that launched it.

For overlap measurements (:mod:`tpmpi.studies.overlap`) a profiler can run instrumented layers with
only one phase: ``with prof.only("gemm"):`` skips their collectives, ``prof.only("comm")`` their
GEMMs (results are then meaningless; only the time counts).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Callable, Optional

from .backend import Backend
from .colltable import bus_factor

PHASES = ("gemm", "comm")


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
    def for_backend(cls, backend: Backend) -> Profiler:
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

    def gemm(self) -> contextlib.AbstractContextManager[None]:
        """Charge the block to local computation."""
        return self._timed_gemm() if self.timed else _UNTIMED

    def comm(self, op: str, nbytes: int, nranks: int) -> contextlib.AbstractContextManager[None]:
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
        block (timing runs for :func:`tpmpi.studies.overlap.measure_overlap`)."""
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
