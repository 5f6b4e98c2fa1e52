"""Accounting of local product time, communication time and collective bytes: the
:class:`Profiler`, a tap (:mod:`tpmpi.core.tap`) that a measurement attaches to a module's
operators and local work from outside (:func:`tpmpi.layers.module.attach_tap`); the layers hold
no profiler of their own.

``nbytes`` is the nccl-tests size ``S`` of each collective (the full gathered/reduced array), so
``busbw = S * factor(op, P) / t``. A timed profiler synchronises the device stream at each region
boundary so that GPU work is charged to the region that launched it; an untimed one
(``timed=False``) only counts collectives and bytes: it reads no clock and never synchronises.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Callable, Optional

from .backend import Backend
from .colltable import bus_factor
from .tap import NOTHING, Tap


class Profiler(Tap):
    """Accumulates ``gemm_s`` (local products), ``comm_s`` (blocked in or waiting for
    collectives), ``bytes`` (sum of S), ``bus_bytes`` (sum of S x bus factor) and ``calls``
    per collective, counting only collectives over more than one rank. ``sync`` (the backend's
    stream sync) runs before each clock read. With ``timed=False`` the regions only count
    (``gemm_s`` and ``comm_s`` stay 0, ``sync`` never runs)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None, *, timed: bool = True):
        self.sync = sync
        self.timed = timed
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

    def product(self) -> contextlib.AbstractContextManager[None]:
        """Charge the block to local computation."""
        return self._timed_product() if self.timed else NOTHING

    def blocked(self, op: str, nbytes: int, p: int) -> contextlib.AbstractContextManager[None]:
        """Charge the block to blocking collective ``op`` of ``nbytes`` over ``p`` ranks."""
        self.count(op, nbytes, p)
        return self._timed_comm() if self.timed else NOTHING

    def wait(self, op: str) -> contextlib.AbstractContextManager[None]:
        """Charge the block to waiting for collective ``op`` (counted when it started)."""
        return self._timed_comm() if self.timed else NOTHING

    @contextlib.contextmanager
    def _timed_product(self) -> Iterator[None]:
        t0 = self._now()
        yield
        self.gemm_s += self._now() - t0

    @contextlib.contextmanager
    def _timed_comm(self) -> Iterator[None]:
        t0 = self._now()
        yield
        self.comm_s += self._now() - t0

    def count(self, op: str, nbytes: int, p: int) -> None:
        """Record a collective's bytes (one started non-blocking, or a blocking one)."""
        if p > 1:
            self.bytes += nbytes
            self.bus_bytes += nbytes * bus_factor(op, p)
            self.calls[op] = self.calls.get(op, 0) + 1

    def totals(self) -> dict:
        """A snapshot of the totals."""
        return {"gemm_s": self.gemm_s, "comm_s": self.comm_s, "bytes": self.bytes,
                "bus_bytes": self.bus_bytes, "calls": dict(self.calls)}
