"""How much communication a layer hides behind its GEMMs (the OSU micro-benchmarks convention).

``overlap % = max(0, 100 - 100 * (t_overall - t_compute) / t_comm)``: 100 when the
communication costs nothing on top of the computation, 0 when it is fully exposed.
:func:`measure_overlap` times one layer call three ways: as is (``t_overall``), with only its
GEMMs (``t_compute``: ``Profiler.only("gemm")`` skips the collectives) and with only its
collectives (``t_comm``: ``Profiler.only("comm")`` skips the GEMMs);
:func:`measure_dp_overlap` does the same for the data-parallel gradient Allreduce.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from ..core.agreement import agree_checks
from ..core.args import check_int
from ..core.arrays import Array
from ..layers.data_parallel import DataParallel
from .timing import time_calls


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
        """Time the overlap saved against running the two parts one after the other."""
        return max(0.0, self.compute_s + self.comm_s - self.overall_s)

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


def measure_overlap(layers: Any | Sequence[Any], call: Callable[[], Any], *, warmup: int = 1,
                    iters: int = 5) -> OverlapTimes:
    """Time ``call()`` (one call of the layer(s), e.g. ``lambda: layer(x)`` or ``lambda:
    layer.backward(dy)``; pass ``[mlp.fc1, mlp.fc2]`` for a composite) as is, with every
    layer's ``profiler.only("gemm")`` and with ``profiler.only("comm")``. Collective over the
    layers' communicator (a Barrier before and a max-Allreduce after each timed call).
    Gradients accumulate; the profiler totals are reset at the end."""
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    profs, comm, layer = [lay.profiler for lay in layers], layers[0].comm, layers[0]

    def local_checks() -> None:
        check_int("iters", iters, 1)
        check_int("warmup", warmup)

    agree_checks(comm, local_checks, warmup=warmup, iters=iters)
    sync = layer.backend.synchronize if layer.backend.is_gpu else None
    overall = median_time(call, comm, sync, warmup, iters)
    times = []
    for phase in ("gemm", "comm"):
        with contextlib.ExitStack() as stack:
            # a skipped collective leaves stale buffers behind: their values are meaningless
            stack.enter_context(np.errstate(all="ignore"))
            for prof in profs:
                stack.enter_context(prof.only(phase))
            times.append(median_time(call, comm, sync, warmup, iters))
    for prof in profs:
        prof.reset()
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
    dp.profiler.reset()
    return OverlapTimes(*times)
