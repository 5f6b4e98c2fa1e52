"""Host staging of device buffers for MPI libraries that cannot read device memory.

A collective that must go through the host is cut into :class:`Piece` s, one MPI call each
(the chunks of :mod:`tpmpi.core.comm`; the same pieces run without copies when MPI may read the
buffers). :meth:`Staging.pipeline` runs them in order with two pinned host slots per
buffer role (double buffering): the device->host copy of piece i+1 is started before the MPI
call of piece i, and the host->device copy of piece i runs while piece i+1 is exchanged, using
the backend's asynchronous copies (:meth:`tpmpi.core.backend.Backend.copy_to_host_async`; on the
CPU-only fake device of the tests they complete at once). Pinned slots are kept and reused
across calls. ``stats`` counts the bytes copied each way and the seconds spent in copies.

NumPy arrays, and device arrays under GPU-aware MPI, are never staged: :meth:`Staging.direct`
synchronises the stream and says so.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

from .arrays import Array, DTypeLike
from .backend import Backend

STAGING_CHUNK_BYTES = 8 * 2**20
"""Default size of one staged piece (bytes of its largest host buffer): large enough for full
copy bandwidth, small enough that a copy hides behind the MPI call of the previous piece."""


@dataclasses.dataclass
class Buffer:
    """An array one MPI call of a :class:`Piece` uses: ``home`` (a backend array), of which
    the call reads the part ``home[down]`` (None: nothing) and writes the parts ``home[i]`` for
    ``i`` in ``up``."""

    home: Array
    down: Any = None
    up: Sequence[Any] = ()


@dataclasses.dataclass
class Piece:
    """One MPI call of a collective cut into pieces: ``call(arrays, blocking)`` runs it on
    arrays shaped like the ``buffers`` (their homes when MPI may use them; else pinned host
    slots, the ``down`` parts copied there before and the ``up`` parts copied back after) and
    returns its request when not ``blocking``. ``then`` (device work on what came back, e.g. a
    sum) runs once the call and its copies back have completed. Pieces of one ``kind`` share
    host slots; ``depends``: its ``down`` parts are what the previous piece wrote (no
    prefetch)."""

    buffers: Sequence[Buffer]
    call: Callable[[list, bool], Any]
    kind: str = ""
    depends: bool = False
    then: Optional[Callable[[], None]] = None


class Staging:
    """Hands backend arrays to MPI (see the module docstring).

    ``staged`` is True for a GPU backend without GPU-aware MPI. ``chunk_bytes`` bounds one
    piece. ``stats``: ``d2h_bytes``, ``h2d_bytes`` (bytes copied device->host and back) and
    ``staging_s`` (seconds the host spent issuing and waiting for those copies), accumulated
    until :meth:`reset_stats`.
    """

    def __init__(self, backend: Backend, *, chunk_bytes: int = STAGING_CHUNK_BYTES) -> None:
        self.backend = backend
        self.staged = backend.is_gpu and not backend.gpu_aware
        self.chunk_bytes = int(chunk_bytes)
        self._slots: dict[tuple, np.ndarray] = {}
        self._pending: dict[tuple, list] = {}  # slot -> copies still reading or writing it
        self.stats: dict[str, float] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero ``stats``."""
        self.stats = {"d2h_bytes": 0, "h2d_bytes": 0, "staging_s": 0.0}

    def direct(self) -> bool:
        """Synchronise the stream; True when MPI may use the arrays themselves (no staging)."""
        self.backend.synchronize()
        return not self.staged

    # ---------------------------------------------------------------- host slots
    def _slot(self, key: tuple, shape: tuple, dtype: DTypeLike) -> np.ndarray:
        """The pinned slot ``key`` viewed as ``shape``/``dtype`` (grown when too small), after
        the copies still using it have completed."""
        self._drain(key)
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        buf = self._slots.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._slots[key] = self.backend.pinned_empty((max(nbytes, 1),), np.uint8)
        return buf[:nbytes].view(dt).reshape(shape)

    def _drain(self, key: tuple) -> None:
        fences = self._pending.pop(key, [])
        if fences:
            t0 = time.perf_counter()
            for fence in fences:
                self.backend.wait_copy(fence)
            self.stats["staging_s"] += time.perf_counter() - t0

    def _copy(self, key: tuple, to_host: bool, src: Array, dst: Array) -> None:
        if src.size == 0:
            return
        t0 = time.perf_counter()
        if to_host:
            fence = self.backend.copy_to_host_async(src, dst)
            self.stats["d2h_bytes"] += src.nbytes
        else:
            fence = self.backend.copy_from_host_async(src, dst)
            self.stats["h2d_bytes"] += src.nbytes
        self.stats["staging_s"] += time.perf_counter() - t0
        self._pending.setdefault(key, []).append(fence)

    # ---------------------------------------------------------------- the pipeline
    def pipeline(self, pieces: Sequence[Piece]) -> None:
        """Run ``pieces`` in order, overlapping copies with the MPI calls of neighbouring pieces
        (see the module docstring). Returns when everything is back on the device."""
        pieces = list(pieces)
        turns: dict[str, int] = {}
        keys = []
        for p in pieces:  # two slots per kind and buffer role, used alternately
            turn = turns.get(p.kind, 0)
            turns[p.kind] = turn + 1
            keys.append([(p.kind, j, turn % 2) for j in range(len(p.buffers))])
        hosts: list[Optional[list[np.ndarray]]] = [None] * len(pieces)

        def stage_in(i: int) -> list[np.ndarray]:
            bufs = hosts[i] = [self._slot(key, tuple(b.home.shape), b.home.dtype)
                               for key, b in zip(keys[i], pieces[i].buffers)]
            for key, b, host in zip(keys[i], pieces[i].buffers, bufs):
                if b.down is not None:
                    self._copy(key, True, b.home[b.down], host[b.down])
            return bufs

        self.backend.synchronize()  # device producers done before the first copy starts
        for i, p in enumerate(pieces):
            bufs = hosts[i]
            if bufs is None:
                bufs = stage_in(i)
            for key in keys[i]:
                self._drain(key)  # this piece's device->host copies are complete
            if i + 1 < len(pieces) and not pieces[i + 1].depends:
                stage_in(i + 1)  # prefetch: overlaps the MPI call below
            p.call(bufs, True)
            for key, b, host in zip(keys[i], p.buffers, bufs):
                for index in b.up:
                    self._copy(key, False, host[index], b.home[index])
            if p.then is not None or (i + 1 < len(pieces) and pieces[i + 1].depends):
                for key in keys[i]:
                    self._drain(key)
                if p.then is not None:
                    p.then()
        for key in list(self._pending):
            self._drain(key)
