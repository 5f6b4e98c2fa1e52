"""Collective micro-benchmarks (nccl-tests conventions) and the cost-model calibration.

Each collective is timed as the layers run it (nccl-tests times the call its users make): by
the operator that runs it (:func:`body`) -- the ``Alltoallw`` gather of column blocks into
place (:class:`~tpmpi.core.mappings.GatherCols`), :class:`~tpmpi.core.mappings.AllReduce`,
:class:`~tpmpi.core.mappings.ReduceScatterRows`, the SUMMA broadcast and reduce-to-owner
(:mod:`tpmpi.core.summa`) -- so that float16 and bfloat16 reductions take the exchange of
slices, as in the layers; the calibration fits those apart
(:func:`tpmpi.studies.costmodel.calibration_key`).

``size`` is the nccl-tests ``S`` in bytes (:mod:`tpmpi.core.colltable`), ``count`` its
elements. ``time`` is the mean over ``iters``
back-to-back calls, max over ranks (one sample of :func:`tpmpi.studies.timing.time_calls`);
``algbw = S / time``, ``busbw = algbw * factor`` (:func:`tpmpi.core.colltable.bus_factor`).
``#wrong`` counts elements that differ from the expected pattern after one checked call,
summed over ranks.
"""
from __future__ import annotations

import dataclasses
import math

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from ..core import colltable
from ..core.arrays import DTypeLike
from ..core.backend import Backend
from ..core.comm import first_ranks, polite_barrier
from ..core.dtypes import HALF
from ..core.mappings import AllReduce, GatherCols, ReduceScatterRows
from ..core.partition import block_partition, block_range
from ..core.summa import BroadcastPiece, ReduceToOwner
from ..core.threads import blas_info
from .costmodel import CLASS_SHAPES, GPU_CLASS_SHAPES, REDUCTIONS, Calibration, \
    calibration_key, fit_alpha_beta, gemm_work
from .localbench import local_curves, measuring_ranks, node_facts, uniform
from .record import CollectiveRecord, mpi_library, utc_timestamp
from .table import line
from .timing import time_calls

COLUMNS = ("size", "count", "type", "time", "algbw", "busbw", "#wrong")


def sizes_sweep(begin: int, end: int, factor: float) -> list[int]:
    """``begin, begin*f, ...`` up to ``end`` (nccl-tests ``-b/-e/-f``); ValueError unless
    1 <= b <= e and f is a finite number > 1 (NaN compares false with everything: tested as
    such, not as "not <= 1")."""
    if not (1 <= begin <= end and math.isfinite(factor) and factor > 1):
        raise ValueError(f"sizes -b {begin} -e {end} -f {factor}: need 1 <= b <= e and a finite "
                         "f > 1")
    out, s = [], float(begin)
    while s <= end:
        out.append(int(s))
        s *= factor
    return out


@dataclasses.dataclass
class Body:
    """One collective at one size, ready to call: ``count`` elements (S), the operator ``call``
    (which keeps its result in ``out[0]``), the result expected of one call on fresh inputs
    (``reset`` restores them: in-place operators overwrite them; None where a rank gets no
    result)."""

    count: int
    call: Callable[[], Any]
    out: list
    expect: Any
    reset: Callable[[], None]

    def wrong(self, comm: MPI.Comm) -> int:
        """Elements differing from the expected result after one fresh call, summed over the
        ranks of ``comm``. Collective."""
        self.reset()
        self.call()
        got = self.out[0]
        bad = int(got is not None) if self.expect is None else int((got != self.expect).sum())
        return comm.allreduce(bad)


def pattern(xp: Any, count: int, rank: int, dtype: Any) -> Any:
    """Rank ``rank``'s benchmark input: small integers, exact in every float dtype,
    ``((rank + 1) * (i % 13 + 1)) % 32``."""
    i = xp.arange(count, dtype=np.int64)
    return (((rank + 1) * (i % 13 + 1)) % 32).astype(dtype)


def body(op: str, count: int, dtype: DTypeLike, comm: MPI.Comm, xp: Any) -> Body:
    """The benchmark body of ``op`` over ``comm`` with S = ``count`` elements of ``dtype``
    (rounded down to a multiple of P where the op splits S) in arrays of ``xp``, run by its
    operator as the layers run it: allgather gathers the column blocks of a (rows, count/rows)
    array into place (8 rows, the latency end's M, once a block holds 8 of them), the others
    work on a flat array (bcast from rank 0, reduce onto rank 0)."""
    row = colltable.TABLE.get(op)
    if row is None:
        raise ValueError(f"collective={op!r}: expected one of {', '.join(colltable.OPS)}")
    p, r, dt = comm.Get_size(), comm.Get_rank(), np.dtype(dtype)
    count -= count % p if row.splits else 0
    total = xp.asarray(sum(pattern(np, count, q, np.float64) for q in range(p)), dtype=dt)
    out: list = [None]
    mine = pattern(xp, count, r, dt)
    if op == "allgather":
        rows = 8 if count >= 64 * p else 1
        cols = count // rows
        count = rows * cols
        parts = [pattern(xp, rows * (b - a), q, dt).reshape(rows, b - a)
                 for q, (a, b) in enumerate(block_partition(cols, p))]
        gather = GatherCols(comm)
        return Body(count, lambda: out.__setitem__(0, gather(parts[r], cols)), out,
                    xp.concatenate(parts, axis=1) if cols else xp.empty((rows, 0), dtype=dt),
                    lambda: None)
    if op == "reduce_scatter":
        scatter = ReduceScatterRows(comm)
        a, b = block_range(count, p, r)
        return Body(count, lambda: out.__setitem__(0, scatter(mine)), out, total[a:b],
                    lambda: None)
    if op in ("allreduce", "bcast"):
        buf = xp.empty(count, dtype=dt)
        fresh = mine if op == "allreduce" or r == 0 else xp.zeros(count, dtype=dt)
        run = AllReduce(comm) if op == "allreduce" else BroadcastPiece(comm)
        out[0] = buf
        return Body(count, lambda: run(buf, 0), out,
                    total if op == "allreduce" else pattern(xp, count, 0, dt),
                    lambda: buf.__setitem__(Ellipsis, fresh))
    reduce = ReduceToOwner(comm)  # the last row: reduce
    return Body(count, lambda: out.__setitem__(0, reduce(mine, 0)), out,
                total if r == 0 else None, lambda: None)


def time_collective(op: str, count: int, dtype: DTypeLike, comm: MPI.Comm, backend: Backend, *,
                    warmup: int = 2, iters: int = 10, check: bool = True) -> CollectiveRecord:
    """One row of the collective benchmark: ``op`` with S = ``count`` elements (rounded down to
    a multiple of P where the op splits S), run by its operator (:func:`body`). The record on
    every rank. Collective."""
    xp = backend.xp if (not backend.is_gpu or backend.gpu_aware) else np
    run = body(op, count, dtype, comm, xp)
    (elapsed,), = time_calls([run.call], comm, sync=backend.synchronize, warmup=warmup,
                             repeat=max(iters, 1))
    p = comm.Get_size()
    nbytes = run.count * np.dtype(dtype).itemsize
    algbw = nbytes / elapsed / 1e9 if elapsed > 0 else None
    return CollectiveRecord(
        collective=op, ranks=p, size=nbytes, count=run.count, dtype=np.dtype(dtype).name,
        backend=backend.name, gpu_aware=backend.gpu_aware,
        buffers="device" if xp is not np and backend.is_gpu else "host", warmup=warmup,
        iters=iters, time_s=float(elapsed), algbw_gbs=algbw,
        busbw_gbs=algbw * colltable.bus_factor(op, p) if algbw else None,
        wrong=run.wrong(comm) if check else None)


def format_row(rec: Mapping[str, Any], header: bool = False) -> str:
    """nccl-tests-like line: size (B), count, type, time (us), algbw, busbw (GB/s), #wrong."""
    widths = (12, 12, 8, 10, 8, 8, 7)
    if header:
        return "\n".join(line(row, widths) for row in
                         (COLUMNS, ("(B)", "(elements)", "", "(us)", "(GB/s)", "(GB/s)", "")))
    fmt = lambda v, f: None if v is None else f.format(v)  # noqa: E731
    return line((rec["size"], rec["count"], rec["dtype"], f"{rec['time_s'] * 1e6:.2f}",
                 fmt(rec["algbw_gbs"], "{:.3f}"), fmt(rec["busbw_gbs"], "{:.3f}"), rec["wrong"]),
                widths)


def gemm_rate(shape: Sequence[int], dtype: str, backend: Backend, comm: MPI.Comm,
              reps: int = 3) -> float:
    """Rate of one local GEMM of ``shape`` (m, k, n) on random operands, run on every rank of
    ``comm`` at once (the median of ``reps`` products, each the slowest rank's), i.e. under
    the contention of a real run:
    flop/s, or operand bytes/s for a "thin" shape (:func:`tpmpi.studies.costmodel.gemm_work`).
    Collective."""
    m, k, n = shape
    xp = backend.xp
    a, b = uniform(xp, (m, k), dtype), uniform(xp, (k, n), dtype)
    c = xp.empty((m, n), dtype=dtype)
    times = time_calls([lambda: xp.matmul(a, b, out=c)], comm, sync=backend.synchronize,
                       warmup=1, iters=reps)
    return gemm_work(m, k, n, np.dtype(dtype).itemsize) / float(np.median(times))


def staging_bandwidth(backend: Backend, comm: MPI.Comm, nbytes: int = 256 * 2**20,
                      reps: int = 3) -> dict:
    """Pinned host<->device copy bandwidth (bytes/s) of the ranks of ``comm`` copying at once:
    ``{"d2h": ..., "h2d": ...}``, each from the best of ``reps`` copies of ``nbytes`` (each
    the slowest rank's). Collective."""
    count = nbytes // 4
    device = uniform(backend.xp, (count,), "float32")
    host = backend.pinned_empty((count,), "float32")
    copies = {"d2h": lambda: backend.copy_to_host(device, host),
              "h2d": lambda: backend.copy_from_host(host, device)}
    return {way: count * 4 / float(time_calls([copy], comm, sync=backend.synchronize,
                                                warmup=1, iters=reps).min())
            for way, copy in copies.items()}


def _fit_collectives(comm: MPI.Comm, backend: Backend, ops: Sequence[str],
                     sizes: Sequence[int], ranks: Sequence[int], iters: int,
                     progress: Callable[[str], None]) -> tuple[dict, dict]:
    """``(alpha, beta)`` tables ``{key: {str(P): value}}`` fitted on the first P ranks of
    ``comm`` for each P of ``ranks`` over messages of ``sizes`` bytes: every op in float32,
    and the reductions again in float16 (the exchange of slices of 2-byte floats, under
    :func:`tpmpi.studies.costmodel.calibration_key`). Collective; the tables on every rank."""
    alpha: dict = {}
    beta: dict = {}
    runs = [(op, "float32") for op in ops] + [(op, "float16") for op in ops if op in REDUCTIONS]
    for p in ranks:
        with first_ranks(comm, p) as sub:
            if sub != MPI.COMM_NULL:
                for op, dtype in runs:
                    key = calibration_key(op, dtype)
                    progress(f"{key} P={p}")
                    item = np.dtype(dtype).itemsize
                    recs = [time_collective(op, max(s // item, p), dtype, sub, backend,
                                            iters=iters, check=False) for s in sizes]
                    a, b = fit_alpha_beta(op, p, [r.size for r in recs],
                                          [r.time_s for r in recs])
                    alpha.setdefault(key, {})[str(p)] = a
                    beta.setdefault(key, {})[str(p)] = b
        polite_barrier(comm)
    return comm.bcast((alpha, beta), root=0)


def _device_rates(comm: MPI.Comm, backend: Backend, dtypes: Sequence[str], cores: int,
                  progress: Callable[[str], None]) -> tuple[dict, dict, Optional[dict]]:
    """``(rates, local, staging)``: GEMM rates ``{"backend:dtype": {class: rate}}`` at the
    shape classes of the backend, the curves of local work ``{"backend:dtype":
    LocalCurves}`` (:mod:`tpmpi.studies.localbench`; none for NumPy's 2-byte floats, which
    multiply as float32), and on a GPU the pinned copy bandwidth (None on a CPU), measured by
    the first rank on each device, or on a CPU the first ``cores`` ranks of each node, all at
    once. Collective; on every rank."""
    rates, local, staging = {}, {}, None
    with measuring_ranks(comm, backend, cores) as leaders:
        if leaders != MPI.COMM_NULL:  # rank 0 always is one
            shapes = GPU_CLASS_SHAPES if backend.is_gpu else CLASS_SHAPES
            for dtype in dtypes:
                try:
                    backend.check_dtype(dtype)
                except ValueError as exc:  # e.g. bfloat16 on an old CuPy: the model falls back
                    progress(f"gemm {dtype}: skipped ({exc})")
                    continue
                progress(f"gemm {dtype}")
                rates[f"{backend.name}:{dtype}"] = {cls: gemm_rate(shape, dtype, backend, leaders)
                                                    for cls, shape in shapes.items()}
                if backend.is_gpu or dtype not in HALF:
                    progress(f"local work {dtype}: products, element-wise kernels, overhead")
                    local[f"{backend.name}:{dtype}"] = local_curves(backend, dtype, leaders)
            if backend.is_gpu:
                progress("pinned host<->device copies")
                staging = staging_bandwidth(backend, leaders)
    return comm.bcast((rates, local, staging), root=0)


def calibrate(comm: MPI.Comm, backend: Backend, *, dtypes: Sequence[str] = ("float32",),
              ops: Sequence[str] = colltable.OPS, sizes: Sequence[int] = (),
              ranks: Sequence[int] = (), threads: Optional[int] = None, iters: int = 10,
              progress: Optional[Callable[[str], None]] = None) -> Calibration:
    """Fit alpha/beta per collective and communicator size (sub-communicators of the first P
    ranks of ``comm`` for each P in ``ranks``, default 2, 4, ... and the full size) over
    ``sizes`` (bytes), and GEMM rates per dtype and shape class. On a GPU backend the rates
    (at :data:`tpmpi.studies.costmodel.GPU_CLASS_SHAPES`, for each dtype the device supports) and
    the pinned copy bandwidth are measured by one rank per device, all devices at once (the model
    scales them by the ranks sharing a device); on a CPU the first rank per core of each node
    measures them, the rest waiting without polling, and the file records the node's cores and
    ranks (``machine.cores_per_node``, ``machine.ranks_per_node``). The curves of local work
    (:mod:`tpmpi.studies.localbench`) are measured the same way. Collective; the result on
    every rank."""
    world = comm.Get_size()
    say = progress or (lambda what: None)
    sizes = list(sizes) or sizes_sweep(8, 1 << 22, 4)
    ranks = sorted(set(ranks) or ({2 ** i for i in range(1, world.bit_length())
                                   if 2 ** i <= world} | ({world} if world > 1 else set())))
    nodes = node_facts(comm)
    cal = Calibration(machine={
        "source": "calibrate", "ranks": world, "threads_per_rank": threads, **nodes,
        "blas": blas_info(backend), "backend": backend.name,
        "mpi_library": mpi_library(), "timestamp": utc_timestamp(),
    })
    cal.alpha, cal.beta = _fit_collectives(comm, backend, ops, sizes, ranks, iters, say)
    rates, cal.local, staging = _device_rates(comm, backend, dtypes, nodes["cores_per_node"],
                                              say)
    cal.rates.update(rates)
    if staging:
        cal.staging = staging
    return cal
