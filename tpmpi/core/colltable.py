"""One row per collective: every fact tpmpi uses to measure or model it, in one place (the idea
of nccl-tests' ``struct testColl``). The profiler reads the bus factors,
:mod:`tpmpi.studies.costmodel` the cost formulas and staged bytes; :mod:`tpmpi.studies.collbench`
times each collective as the layers run it (their operator of :mod:`tpmpi.core.mappings` /
:mod:`tpmpi.core.summa`).

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
reduce          1            ceil(lg P)      2(P-1)/P      (P-1)/P       1, 1
==============  ===========  ==============  ============  ============  =====================

* bus factor: ``busbw = algbw x factor`` (nccl-tests doc/PERFORMANCE.md);
* alpha terms and beta x S: the ring formulas of the cost model, ``T = lat(P) alpha +
  bw(P) S beta`` (bcast and reduce: a binomial tree for latency, MPICH's long-message scatter
  + allgather, or reduce-scatter + gather, for bandwidth);
* sent/S: bytes one rank sends (ring algorithms; bcast: the tree's average);
* staged: bytes one rank copies device->host and back when the collective is staged through
  host memory (a GPU without GPU-aware MPI): only its own part goes down and only what it needs
  comes back; bcast's root copy and the receivers' copy follow each other, so both count (as
  the root's copy down and the result's copy up of a reduce).

``splits``: S is cut into P blocks (allgather, reduce_scatter): a benchmark rounds its element
count down to a multiple of P.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Collective:
    """One row of :data:`TABLE` (see the module docstring): functions of P > 1."""

    name: str
    bus: Callable[[int], float]
    latency: Callable[[int], float]
    bandwidth: Callable[[int], float]
    sent: Callable[[int], float]
    staged: Callable[[int], tuple[float, float]]
    splits: bool = False  # S is split into P blocks: counts are rounded down to a multiple of P


def _ring(p: int) -> float:
    return (p - 1) / p


def _ring2(p: int) -> float:
    return 2 * (p - 1) / p


def _one(p: int) -> float:
    return 1.0


def _tree(p: int) -> float:
    return math.ceil(math.log2(p))


TABLE: dict[str, Collective] = {c.name: c for c in (
    Collective("allgather", bus=_ring, latency=lambda p: p - 1, bandwidth=_ring, sent=_ring,
               staged=lambda p: (1 / p, (p - 1) / p), splits=True),
    Collective("reduce_scatter", bus=_ring, latency=lambda p: p - 1, bandwidth=_ring,
               sent=_ring, staged=lambda p: (1.0, 1 / p), splits=True),
    Collective("allreduce", bus=_ring2, latency=lambda p: 2 * (p - 1), bandwidth=_ring2,
               sent=_ring2, staged=lambda p: (1.0, 1.0)),
    Collective("bcast", bus=_one, latency=_tree, bandwidth=_ring2, sent=_ring,
               staged=lambda p: (1.0, 1.0)),
    Collective("reduce", bus=_one, latency=_tree, bandwidth=_ring2, sent=_ring,
               staged=lambda p: (1.0, 1.0)),
)}
OPS = tuple(TABLE)
"""The collectives the benchmark times and the cost model prices (calibrated together)."""


def _fact(op: str, what: str) -> Callable:
    """``TABLE[op].<what>``; ValueError naming the op when there is no such row."""
    row = TABLE.get(op)
    if row is None:
        raise ValueError(f"collective={op!r}: expected one of {', '.join(TABLE)}")
    fact: Callable = getattr(row, what)
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
