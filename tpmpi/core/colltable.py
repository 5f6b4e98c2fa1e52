"""One row per collective: every fact tpmpi uses to measure or model it, in one place (the idea
of nccl-tests' ``struct testColl``). :mod:`tpmpi.studies.timing` reads the bus factors,
:mod:`tpmpi.studies.costmodel` the cost formulas and staged bytes, :mod:`tpmpi.studies.collbench`
the benchmark bodies.

``S`` (``nbytes``) is the nccl-tests size of an operation: the gathered array (allgather), each
rank's input (reduce_scatter), the reduced array (allreduce, reduce), the broadcast buffer
(bcast). On ``P`` ranks (every factor is 0 when P = 1):

==============  ===========  ==============  ============  ============  =====================
op              bus factor   alpha terms     beta x S      sent/S        staged down, up (/S)
==============  ===========  ==============  ============  ============  =====================
allgather       (P-1)/P      P - 1           (P-1)/P       (P-1)/P       1/P, (P-1)/P
reduce_scatter  (P-1)/P      P - 1           (P-1)/P       (P-1)/P       1, 1/P
allreduce       2(P-1)/P     2 (P - 1)       2(P-1)/P      2(P-1)/P      1, 1
bcast           1            ceil(lg P)      2(P-1)/P      (P-1)/P       1, 1
reduce          1            -               -             -             -
==============  ===========  ==============  ============  ============  =====================

* bus factor: ``busbw = algbw x factor`` (nccl-tests doc/PERFORMANCE.md);
* alpha terms and beta x S: the ring formulas of the cost model, ``T = lat(P) alpha +
  bw(P) S beta`` (bcast: a binomial tree for latency, MPICH's long-message scatter +
  allgather for bandwidth);
* sent/S: bytes one rank sends (ring algorithms; bcast: the tree's average);
* staged: bytes one rank copies device->host and back when the collective is staged through
  host memory (a GPU without GPU-aware MPI): only its own part goes down and only what it needs
  comes back; bcast's root copy and the receivers' copy follow each other, so both count.

``reduce`` (the tile2d layer's bias gradient) is only counted by the profiler: the model does
not price it and the collective benchmark does not time it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np


@dataclasses.dataclass
class Body:
    """One collective at one size, ready to call: ``count`` elements (S; a multiple of P where
    the op splits S into blocks), this rank's receive buffer, the result expected in it and the
    MPI call. ``keeps_input``: the receive buffer holds this rank's input (the bcast root)."""

    count: int
    recv: Any
    expect: Any
    call: Callable[[], Any]
    keeps_input: bool = False

    def wrong(self, comm: Any) -> int:
        """Elements differing from the expected result after one fresh call, summed over the
        ranks of ``comm``. Collective."""
        if not self.keeps_input:
            self.recv[...] = 0
        self.call()
        return comm.allreduce(int((self.recv != self.expect).sum()))


def pattern(xp: Any, count: int, rank: int, dtype: Any) -> Any:
    """Rank ``rank``'s benchmark input: small integers, exact in every float dtype,
    ``((rank + 1) * (i % 13 + 1)) % 32``."""
    i = xp.arange(count, dtype=np.int64)
    return (((rank + 1) * (i % 13 + 1)) % 32).astype(dtype)


def _total(count: int, p: int) -> np.ndarray:
    """The elementwise sum over P ranks of their patterns, in float64."""
    return sum(pattern(np, count, q, np.float64) for q in range(p))


def _allgather(comm: Any, xp: Any, count: int, dtype: Any) -> Body:
    p, r = comm.Get_size(), comm.Get_rank()
    send, recv = pattern(xp, count // p, r, dtype), xp.empty(count, dtype)
    expect = xp.concatenate([pattern(xp, count // p, q, dtype) for q in range(p)])
    return Body(count, recv, expect, lambda: comm.Allgather(send, recv))


def _reduce_scatter(comm: Any, xp: Any, count: int, dtype: Any) -> Body:
    p, r = comm.Get_size(), comm.Get_rank()
    blk = count // p
    send, recv = pattern(xp, count, r, dtype), xp.empty(blk, dtype)
    expect = xp.asarray(_total(count, p)[r * blk:(r + 1) * blk], dtype=dtype)
    return Body(count, recv, expect, lambda: comm.Reduce_scatter_block(send, recv))


def _allreduce(comm: Any, xp: Any, count: int, dtype: Any) -> Body:
    send, recv = pattern(xp, count, comm.Get_rank(), dtype), xp.empty(count, dtype)
    expect = xp.asarray(_total(count, comm.Get_size()), dtype=dtype)
    return Body(count, recv, expect, lambda: comm.Allreduce(send, recv))


def _bcast(comm: Any, xp: Any, count: int, dtype: Any) -> Body:
    root = comm.Get_rank() == 0
    buf = pattern(xp, count, 0, dtype) if root else xp.zeros(count, dtype)
    return Body(count, buf, pattern(xp, count, 0, dtype), lambda: comm.Bcast(buf, root=0),
                keeps_input=root)


BodyBuilder = Callable[[Any, Any, int, Any], Body]


@dataclasses.dataclass(frozen=True)
class Collective:
    """One row of :data:`TABLE` (see the module docstring): functions of P > 1; None where a
    fact is not used (the op is not modelled, or not benchmarked)."""

    name: str
    bus: Callable[[int], float]
    latency: Optional[Callable[[int], float]] = None
    bandwidth: Optional[Callable[[int], float]] = None
    sent: Optional[Callable[[int], float]] = None
    staged: Optional[Callable[[int], tuple[float, float]]] = None
    body: Optional[BodyBuilder] = None
    splits: bool = False  # S is split into P blocks: counts are rounded down to a multiple of P


def _ring(p: int) -> float:
    return (p - 1) / p


def _ring2(p: int) -> float:
    return 2 * (p - 1) / p


def _one(p: int) -> float:
    return 1.0


TABLE: dict[str, Collective] = {c.name: c for c in (
    Collective("allgather", bus=_ring, latency=lambda p: p - 1, bandwidth=_ring, sent=_ring,
               staged=lambda p: (1 / p, (p - 1) / p), body=_allgather, splits=True),
    Collective("reduce_scatter", bus=_ring, latency=lambda p: p - 1, bandwidth=_ring,
               sent=_ring, staged=lambda p: (1.0, 1 / p), body=_reduce_scatter, splits=True),
    Collective("allreduce", bus=_ring2, latency=lambda p: 2 * (p - 1), bandwidth=_ring2,
               sent=_ring2, staged=lambda p: (1.0, 1.0), body=_allreduce),
    Collective("bcast", bus=_one, latency=lambda p: math.ceil(math.log2(p)), bandwidth=_ring2,
               sent=_ring, staged=lambda p: (1.0, 1.0), body=_bcast),
    Collective("reduce", bus=_one),
)}
OPS = tuple(name for name, c in TABLE.items() if c.body is not None and c.latency is not None)
"""The collectives the benchmark times and the cost model prices (calibrated together)."""


def _fact(op: str, what: str) -> Callable:
    """``TABLE[op].<what>``; ValueError naming the op when it has no such fact."""
    row = TABLE.get(op)
    fact = getattr(row, what) if row is not None else None
    if fact is None:
        known = [name for name, c in TABLE.items() if getattr(c, what) is not None]
        raise ValueError(f"collective={op!r}: expected one of {', '.join(known)}")
    return fact


def bus_factor(op: str, p: int) -> float:
    """nccl-tests bus-bandwidth factor of ``op`` on ``p`` ranks."""
    return float(_fact(op, "bus")(p)) if p > 1 else 0.0


def lat_factor(op: str, p: int) -> float:
    """Number of alpha terms of ``op`` on ``p`` ranks."""
    return float(_fact(op, "latency")(p)) if p > 1 else 0.0


def bw_factor(op: str, p: int) -> float:
    """Multiplier of ``S * beta`` for ``op`` on ``p`` ranks."""
    return float(_fact(op, "bandwidth")(p)) if p > 1 else 0.0


def sent_bytes(op: str, p: int, nbytes: float) -> float:
    """Bytes one rank sends in ``op`` of size ``S = nbytes`` on ``p`` ranks."""
    return nbytes * _fact(op, "sent")(p) if p > 1 else 0.0


def staged_bytes(op: str, p: int, nbytes: float) -> tuple[float, float]:
    """Bytes one rank copies device->host and host->device to stage ``op`` of size ``nbytes``
    on ``p`` ranks."""
    if p <= 1:
        return 0.0, 0.0
    down, up = _fact(op, "staged")(p)
    return nbytes * down, nbytes * up


def body(op: str, count: int, dtype: Any, comm: Any, xp: Any) -> Body:
    """The benchmark body of ``op`` over ``comm`` with S = ``count`` elements of ``dtype``
    (rounded down to a multiple of P where the op splits S) in arrays of ``xp``."""
    build = _fact(op, "body")
    if TABLE[op].splits:
        count -= count % comm.Get_size()
    return build(comm, xp, count, np.dtype(dtype))
