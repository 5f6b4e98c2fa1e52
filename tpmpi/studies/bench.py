"""Timed runs of a scheme and their result records (:class:`tpmpi.studies.record.RunRecord`, fields:
docs/record-schema.md).

Timing (:func:`tpmpi.studies.timing.time_calls`, docs/statistics.md): ``warmup`` untimed steps, then
``iters`` steps each started by a stream sync and a Barrier and ended by a stream sync; an
iteration's time is the maximum over ranks. The time spent in local products and blocked in
collectives is snapshotted from the profiler attached to the case's operators and local work
(:meth:`tpmpi.studies.schemes.base.Case.attach_profiler`) around every iteration (max over ranks
per iteration), so ``gemm_s`` / ``comm_s`` are medians over the iterations like ``time_s``;
``spread`` holds their ``{median, min, max}``. ``algbw = S / comm_s`` and
``busbw = S * factor / comm_s`` with ``S`` the nccl-tests size of each collective and its
bus factor (:mod:`tpmpi.core.colltable`). ``d2h_bytes`` / ``h2d_bytes`` are the bytes a rank's
layers staged device->host and back per iteration (GPU without GPU-aware MPI; 0 otherwise) and
``staging_s`` the seconds per iteration spent in those copies, part of the communication time
(means over the iterations, max over ranks). ``mem_peak_bytes`` is the peak of the backend's
allocations while the case is built and stepped once (tracemalloc for NumPy, the memory-pool
hook for CuPy), max over ranks. ``flags`` marks suspicious figures (:mod:`tpmpi.studies.stats`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from threadpoolctl import threadpool_limits

from ..core.backend import Backend
from ..core.comm import polite_barrier
from ..core.devices import device_facts
from ..core.dtypes import tolerance
from ..core.grid import ProcessGrid
from ..core.mesh import Mesh
from ..core.profiler import Profiler
from ..core.threads import blas_info, configured_blas_threads
from ..core.topology import node_comm
from ..layers.data_parallel import BUCKET_BYTES, DataParallel
from . import transformer
from .costmodel import CLASS_SHAPES, CalibratedMachine, Calibration, load_calibration, predict, \
    schedule_of
from .overlap import measure_dp_overlap, measure_overlap
from .problem import TRANSFORMER, Problem, options_label
from .progress import Progress, announce, case_units
from .record import RunRecord, calibration_facts
from .schemes.base import Case
from .schemes.hybrid import DataParallelCase, build_case
from .stats import PREDICTION_NOTE, flags, load_per_cpu, prediction_mark, short, summary
from .table import wrapped
from .timing import time_calls


def _max_over_ranks(comm: MPI.Comm, values: Sequence[float]) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
    return arr


def node_threads(comm: MPI.Comm, threads_per_rank: Optional[int], cap: bool = True) -> int:
    """BLAS threads of all ranks of this node together; with ``cap``, at most this rank's CPU
    mask (the threads a single process gets in the serial baseline). Collective."""
    with node_comm(comm) as node:
        total = (threads_per_rank or 1) * node.Get_size()
    return min(total, len(os.sched_getaffinity(0))) if cap else total


def serial_baseline(case: Case, grid: ProcessGrid | Mesh, backend: Backend, *, warmup: int,
                    iters: int, threads: Optional[int] = None) -> dict:
    """``{median, min, max}`` seconds of the case's serial product on rank 0 using ``threads``
    BLAS threads (default: those of all ranks of its node), the single-process reference for
    speedup and efficiency, while the other ranks wait without busy-polling. Collective; the
    value on every rank."""
    comm = grid.comm
    if threads is None:
        threads = node_threads(comm, configured_blas_threads())
    polite_barrier(comm)
    result = None
    if comm.Get_rank() == 0:
        with threadpool_limits(limits=threads):
            times = time_calls([case.serial(backend)], sync=backend.synchronize, warmup=warmup,
                               iters=iters)
        result = summary(times[0])
    polite_barrier(comm)
    return comm.bcast(result, root=0)


@functools.lru_cache(maxsize=1)
def default_calibration() -> Calibration:
    """The calibration named by env ``TPMPI_CALIBRATION``, else the model's defaults."""
    return load_calibration()


def _profiled(case: Case) -> tuple[float, float]:
    """Seconds in local products and in collectives so far (the case's profiler)."""
    assert case.profiler is not None  # attached by _first_steps
    return case.profiler.gemm_s, case.profiler.comm_s


def _timed_steps(case: Case, comm: MPI.Comm, backend: Backend, iters: int,
                 progress: Callable[[str], None]) -> np.ndarray:
    """Run ``iters`` timed steps; rows forward, backward (0 without), GEMM and communication
    seconds of each iteration (columns), each the maximum over ranks. Collective."""
    steps = [case.forward] + ([case.backward] if case.problem.backward else [])
    samples = time_calls(steps, comm, sync=backend.synchronize, iters=iters,
                         readings=lambda: _profiled(case),
                         after=lambda i: progress(f"timed step {i + 1}/{iters}"))
    if not case.problem.backward:
        samples = np.insert(samples, 1, 0.0, axis=0)
    return samples


def oversubscription(comm: MPI.Comm, threads_per_rank: Optional[int], backend: Backend
                     ) -> float:
    """BLAS threads of this node's ranks of ``comm`` per CPU of this rank's mask (on a GPU:
    the ranks of ``comm`` sharing one device, which time-slice it): the slow-down of local
    products the cost model applies. Collective."""
    if backend.is_gpu:
        return float(device_facts(comm, backend).ranks_per_device)
    return node_threads(comm, threads_per_rank, cap=False) / len(os.sched_getaffinity(0))


def case_progress(problem: Problem, grid: ProcessGrid, backend: Backend,
                  calibration: Calibration, *, warmup: int, iters: int, baseline: bool,
                  overlap: bool = False) -> Optional[Callable[[str], None]]:
    """For a case the cost model expects to run longer than :data:`tpmpi.studies.progress.LONG_S`:
    the estimate printed on rank 0 and the ``progress`` callback of :func:`run_case` (a bar
    on rank 0); None for a short one. Collective."""
    units = case_units(problem, grid.size, grid.shape, calibration, backend.name,
                       warmup=warmup, iters=iters, baseline=baseline, overlap=overlap,
                       oversubscription=oversubscription(grid.comm, configured_blas_threads(),
                                                         backend))
    rank0 = grid.comm.Get_rank() == 0
    what = f"run {problem.scheme} on {grid.size} rank{'s' if grid.size > 1 else ''}"
    if not announce(what, sum(t for _, t in units), rank0):
        return None
    return Progress([t for _, t in units], rank0, unit="step").step


_WARMED: set = set()
"""The kinds of case (scheme, options, dtype, backend, pass) this process has run."""


def _warm_process(problem: Problem, where: ProcessGrid | Mesh, backend: Backend,
                  bucket_bytes: int) -> None:
    """Build and step a tiny case of ``problem``'s kind (8 x 8 x 8), once per process and kind
    unless some rank of ``where`` has not yet: what a process allocates once (modules imported
    on first use, e.g. ml_dtypes' bfloat16 loops, 6 MB; caches) is not charged to the first
    configuration's ``mem_peak_bytes``. Collective (an Allreduce deciding, then the steps)."""
    kind = (problem.scheme, problem.options, problem.dtype, backend.name, problem.backward)
    if not where.comm.allreduce(kind not in _WARMED, op=MPI.LOR):
        return
    small = dataclasses.replace(problem, m=8, k=8, n=8, hidden=None)
    if problem.scheme in TRANSFORMER:  # whole sequences on each replica, heads of width 2
        heads = problem.heads or max(1, problem.k // 64)
        dp = where.dp if isinstance(where, Mesh) else 1
        small = dataclasses.replace(problem, m=dp * (problem.seq or 1), k=2 * heads,
                                    n=2 * heads, hidden=None, layers=1)
    tiny = build_case(small, where, backend, bucket_bytes=bucket_bytes)
    tiny.forward()
    if problem.backward:
        tiny.backward()
    _WARMED.add(kind)


def _first_steps(problem: Problem, where: ProcessGrid | Mesh, backend: Backend, *,
                 warmup: int, bucket_bytes: int, progress: Callable[[str], None]
                 ) -> tuple[Case, int]:
    """The case built with timed profilers, its first step (this rank's allocation peak
    measured meanwhile, after :func:`_warm_process`) and ``warmup`` untimed steps: ``(case,
    peak bytes)``."""
    _warm_process(problem, where, backend, bucket_bytes)
    with backend.memory_peak() as mem:
        case = build_case(problem, where, backend, bucket_bytes=bucket_bytes)
        case.attach_profiler()
        case.forward()
        if case.problem.backward:
            case.backward()
    progress("first step")
    for i in range(warmup):
        case.forward()
        if case.problem.backward:
            case.backward()
        progress(f"warmup {i + 1}/{warmup}")
    return case, mem["peak"]


def _data_parallel(case: Case) -> Optional[DataParallel]:
    """The DataParallel of a case on a mesh, else None."""
    return case.dp if isinstance(case, DataParallelCase) else None


def _stagings(case: Case) -> list:
    """The staging buffers of the case's layers (and of its DataParallel, on a mesh)."""
    dp = _data_parallel(case)
    return [layer.staging for layer in getattr(case, "layers", ())] + (
        [dp.staging] if dp else [])


def _profilers(case: Case) -> tuple[Profiler, Optional[Profiler]]:
    """The case's TP profiler and, on a mesh, its DP one (attached by :func:`_first_steps`)."""
    assert case.profiler is not None
    return case.profiler, case.dp_profiler if isinstance(case, DataParallelCase) else None


def _reset_counters(case: Case) -> None:
    """Zero the profilers' and staging buffers' totals (the timed steps count from here)."""
    for prof in _profilers(case):
        if prof is not None:
            prof.reset()
    for staging in _stagings(case):
        staging.reset_stats()


def _traffic(case: Case, iters: int, mem_peak: int, comm: MPI.Comm) -> dict:
    """Per-iteration traffic of the timed steps (counted since the counters were reset) and
    the allocation peak, each the maximum over ranks: TP ``comm_bytes`` and ``bus_bytes``,
    ``dp_comm_s`` and ``dp_bytes``, staged ``d2h_bytes``, ``h2d_bytes`` and ``staging_s``,
    ``mem_peak_bytes``; and ``collectives``, the TP calls per step. Collective."""
    n = max(iters, 1)
    tp_prof, dp_prof = _profilers(case)
    stagings = _stagings(case)
    values = {"comm_bytes": tp_prof.bytes / n, "bus_bytes": tp_prof.bus_bytes / n,
              "dp_comm_s": dp_prof.comm_s / n if dp_prof else 0.0,
              "dp_bytes": dp_prof.bytes / n if dp_prof else 0.0,
              **{key: sum(st.stats[key] for st in stagings) / n
                 for key in ("d2h_bytes", "h2d_bytes", "staging_s")},
              "mem_peak_bytes": mem_peak}
    out = dict(zip(values, _max_over_ranks(comm, list(values.values())).tolist()))
    out["collectives"] = {op: c // n for op, c in tp_prof.calls.items()}
    return out


def _overlap_phases(case: Case, iters: int) -> dict:
    """The OSU overlap measurement of each phase: forward, backward (with backward) and the
    DP gradient Allreduce under backward (with more than one replica). Collective."""
    on_mesh = case if isinstance(case, DataParallelCase) else None
    tp_case = on_mesh.inner if on_mesh else case  # TP overlap without the DP Allreduce
    phases = {"forward": measure_overlap(case.module, tp_case.forward, warmup=1, iters=iters)}
    if case.problem.backward:
        phases["backward"] = measure_overlap(case.module, tp_case.backward, warmup=1,
                                             iters=iters)
        if on_mesh and on_mesh.mesh.dp > 1:
            phases["dp"] = measure_dp_overlap(on_mesh.dp, on_mesh.inner.dy, iters=iters)
    return {phase: t.as_dict() for phase, t in phases.items()}


def _from_median(value: Optional[float], median: float) -> Optional[float]:
    """``value / median`` (None without a value or a positive median)."""
    return value / median if value is not None and median > 0 else None


def _time_fields(samples: np.ndarray, backward: bool, base: Optional[dict]) -> dict:
    """The record's timed fields from :func:`_timed_steps`' samples (forward, backward, GEMM
    and communication rows) and the baseline summary: ``time_s`` (summary of forward +
    backward), the medians ``fwd_s``, ``bwd_s``, ``gemm_s``, ``comm_s``, and ``spread``."""
    fwd, bwd, gemm, comm = samples
    spread: dict[str, Any] = {
        "fwd_s": summary(fwd), "bwd_s": summary(bwd) if backward else None,
        "gemm_s": summary(gemm), "comm_s": summary(comm), "baseline_s": base}
    timed = samples.shape[1] > 0
    return {"time_s": summary(fwd + bwd) or {"median": float("nan"), "min": None, "max": None},
            "fwd_s": spread["fwd_s"]["median"] if timed else None,
            "bwd_s": spread["bwd_s"]["median"] if spread["bwd_s"] else None,
            "gemm_s": float(spread["gemm_s"]["median"]) if timed else 0.0,
            "comm_s": float(spread["comm_s"]["median"]) if timed else 0.0, "spread": spread}


def _rate_fields(times: dict, flops: float, traffic: dict, base: Optional[dict],
                 baseline_threads: Optional[int], ranks: int, threads: Optional[int]) -> dict:
    """The record's figures derived from the medians: ``gflops``, ``algbw_gbs``,
    ``busbw_gbs``, ``baseline_s``, ``baseline_threads``, ``speedup`` and the per-core
    ``efficiency`` (the baseline process may use several cores)."""
    median, comm_s = times["time_s"]["median"], times["comm_s"]
    speedup = _from_median(base["median"] if base else None, median)
    return {"gflops": _from_median(flops / 1e9, median),
            "algbw_gbs": _from_median(traffic["comm_bytes"] / 1e9, comm_s),
            "busbw_gbs": _from_median(traffic["bus_bytes"] / 1e9, comm_s),
            "baseline_s": base["median"] if base else None,
            "baseline_threads": baseline_threads if base else None, "speedup": speedup,
            "efficiency": speedup * baseline_threads / (ranks * (threads or 1))
            if speedup is not None and baseline_threads is not None else None}


def _model_fields(problem: Problem, times: dict, gflops: Optional[float], ranks: int,
                  grid: tuple[int, int], dp: int, calibration: Calibration, backend: str,
                  oversubscription: float) -> dict:
    """The transformer schemes' record fields: ``model``, ``split`` (the cost model's seconds
    per part of the schedule and the measured products, collectives and the rest),
    ``gemm_peak_gflops`` (the calibration's large-GEMM rate per rank x ranks) and ``mfu``;
    empty for the other schemes."""
    if not transformer.is_transformer(problem):
        return {}
    machine = CalibratedMachine(calibration, backend, oversubscription=oversubscription)
    sched = schedule_of(problem, grid, dp=dp)
    assert sched is not None  # every transformer scheme lists its schedule
    median, gemm, comm = times["time_s"]["median"], times["gemm_s"], times["comm_s"]
    size = CLASS_SHAPES["large"]
    peak = 2.0 * math.prod(size) / calibration.gemm(*size, problem.dtype, backend) \
        * ranks / 1e9
    return {"model": transformer.model_fields(problem),
            "split": {"predicted": transformer.split(sched, machine,
                                                     backward=problem.backward),
                      "measured": {"products": gemm, "collectives": comm,
                                   "other": max(0.0, median - gemm - comm)}},
            "gemm_peak_gflops": peak, "mfu": transformer.mfu(gflops, peak)}


def run_case(problem: Problem, grid: ProcessGrid | Mesh, backend: Backend, *, warmup: int = 2,
             iters: int = 10, verify: bool = True, baseline: bool | dict = False,
             baseline_threads: Optional[int] = None,
             calibration: Optional[Calibration] = None, overlap: bool = False,
             progress: Optional[Callable[[str], None]] = None,
             bucket_bytes: int = BUCKET_BYTES) -> RunRecord:
    """Build, time and (optionally) verify ``problem`` on ``grid``, or on a :class:`Mesh` of
    ``dp`` replicas of a TP grid (:class:`tpmpi.studies.schemes.hybrid.DataParallelCase`: each
    replica takes M/dp rows, gradients averaged in DataParallel buckets of ``bucket_bytes``; fields
    ``mesh``, ``dp_bytes`` and ``dp_comm_s``, the DP traffic and mean time blocked in it per
    iteration, and with ``overlap`` phase ``dp``, the DP Allreduce hidden under backward;
    ``grid`` is then the TP grid and ``comm_s`` its collectives); with ``baseline``, also
    time the serial single-process product in the same job with ``baseline_threads`` threads
    (a dict is the ``{median, min, max}`` of a baseline measured earlier); ``baseline_s``
    (median), ``speedup`` = baseline_s / time, ``efficiency`` = speedup x baseline threads /
    (ranks x threads per rank), i.e. per core. ``predicted_s`` comes from the cost
    model with ``calibration`` (default: :func:`tpmpi.studies.costmodel.load_calibration`). With
    ``overlap``, field ``overlap`` holds, per phase (forward, and backward when timed), the
    OSU measurement of :func:`tpmpi.studies.overlap.measure_overlap`: overall, compute-only and
    communication-only medians, overlap % and seconds saved. ``progress(desc)`` is called
    after each unit of :func:`tpmpi.studies.progress.case_units`. The record on every rank.
    Collective over ``grid.comm`` (the mesh's)."""
    mesh, grid = (grid, grid.tp) if isinstance(grid, Mesh) else (None, grid)
    comm, ranks, dp = (mesh.comm, mesh.size, mesh.dp) if mesh else (grid.comm, grid.size, 1)
    progress = progress or (lambda desc: None)
    load = [load_per_cpu() or 0.0]
    case, mem_peak = _first_steps(problem, mesh or grid, backend, warmup=warmup,
                                  bucket_bytes=bucket_bytes, progress=progress)
    problem = case.problem  # with the options in effect (e.g. a rounded panel)
    _reset_counters(case)
    samples = _timed_steps(case, comm, backend, iters, progress)
    load.append(load_per_cpu() or 0.0)
    traffic = _traffic(case, iters, mem_peak, comm)
    phases = None
    if overlap:
        phases = _overlap_phases(case, iters)
        progress("overlap")
    err = case.verify() if verify else None
    progress("verify")
    threads = configured_blas_threads()
    if baseline is not False and baseline_threads is None:
        baseline_threads = node_threads(comm, threads)
    base = dict(baseline) if baseline and baseline is not True else None
    if baseline is True:
        base = serial_baseline(case, mesh or grid, backend, warmup=warmup, iters=iters,
                               threads=baseline_threads)
        load.append(load_per_cpu() or 0.0)
        progress("baseline")
    oversub = oversubscription(comm, threads, backend)
    calibration = calibration or default_calibration()
    pred = predict(problem, ranks, grid.shape, calibration,
                   backend.name, oversubscription=oversub, dp=dp, bucket_bytes=bucket_bytes,
                   staged=case.backend.is_gpu and not case.backend.gpu_aware)
    load_max, oversub_max = _max_over_ranks(comm, [max(load), oversub])
    times = _time_fields(samples, problem.backward, base)
    rates = _rate_fields(times, case.flops * (3 if problem.backward else 1), traffic, base,
                         baseline_threads, ranks, threads)
    model = _model_fields(problem, times, rates["gflops"], ranks, grid.shape, dp, calibration,
                          backend.name, oversub)
    rec = RunRecord(
        scheme=problem.scheme, ranks=ranks, grid=grid.label,
        mesh={"dp": dp, "tp": grid.label, "bucket_bytes": bucket_bytes if mesh else None},
        m=problem.m, k=problem.k, n=problem.n,
        hidden=problem.d_hidden if problem.scheme == "mlp" else None, dtype=problem.dtype,
        backend=backend.name, gpu_aware=case.backend.gpu_aware, threads_per_rank=threads,
        warmup=warmup, iters=iters, backward=problem.backward, options=problem.opts,
        **times, comm_bytes=traffic["comm_bytes"], d2h_bytes=int(traffic["d2h_bytes"]),
        h2d_bytes=int(traffic["h2d_bytes"]), staging_s=traffic["staging_s"],
        collectives=traffic["collectives"], dp_bytes=traffic["dp_bytes"],
        dp_comm_s=traffic["dp_comm_s"], mem_peak_bytes=int(traffic["mem_peak_bytes"]),
        max_rel_err=err, tolerance=tolerance(problem.dtype, problem.longest_sum),
        predicted_s=pred.time_s if pred else None,
        predicted=dataclasses.asdict(pred) if pred else None, overlap=phases,
        **rates, load_per_cpu=float(load_max), oversubscription=float(oversub_max),
        blas=blas_info(backend), calibration=calibration_facts(calibration), **model)
    rec.flags = flags(rec)
    return rec


def _ms(s: Optional[dict]) -> Optional[str]:
    """``median (min-max)`` in milliseconds of a summary in seconds."""
    if not s or s.get("min") is None:
        return None
    return f"{s['median'] * 1e3:.3f} ({short(s['min'] * 1e3)}-{short(s['max'] * 1e3)})"


def _num(fmt: str, value: Any) -> Optional[str]:
    return None if value is None else fmt.format(value)


def table_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The printed columns of a record: name -> text (None prints as "-")."""
    spread = rec.get("spread") or {}
    dp = (rec.get("mesh") or {}).get("dp", 1)
    return {"scheme": rec["scheme"], "ranks": rec["ranks"],
            "grid": rec["grid"] if dp == 1 else f"{dp}x({rec['grid']})", "m": rec["m"],
            "k": rec["k"], "n": rec["n"],
            "options": ",".join(filter(None, (  # the MLP's default mode has no label
                options_label(rec["options"]),
                f"hidden={rec['hidden']}" if rec.get("hidden") is not None else ""))) or "-",
            "dtype": rec["dtype"], "backend": rec["backend"],
            "threads": rec["threads_per_rank"], "time_ms": _ms(rec["time_s"]),
            "gemm_ms": _ms(spread.get("gemm_s")), "comm_ms": _ms(spread.get("comm_s")),
            "GFLOP/s": _num("{:.1f}", rec["gflops"]),
            "algbw": _num("{:.2f}", rec["algbw_gbs"]), "busbw": _num("{:.2f}", rec["busbw_gbs"]),
            "mem_MiB": f"{rec['mem_peak_bytes'] / 2**20:.1f}",
            "rel_err": _num("{:.2e}", rec["max_rel_err"]),
            "pred_ms": f"{rec['predicted_s'] * 1e3:.3f}{prediction_mark(rec)}"
            if rec.get("predicted_s") else None,
            "speedup": _num("{:.2f}", rec.get("speedup")),
            "eff/core": _num("{:.2f}", rec.get("efficiency")),
            "flags": ",".join(rec.get("flags") or ()) or None}


TABLE_WIDTH = 120
"""Widest line of the run and sweep tables by default (a terminal's or a README's width)."""


def table_caption(records: Sequence[Mapping[str, Any]], width: int = TABLE_WIDTH) -> str:
    """The lines above a table saying which statistic its columns show (``# `` lines of at
    most ``width`` characters; 0: one line)."""
    iters = ",".join(sorted({str(r["iters"]) for r in records})) or "?"
    text = (f"time/gemm/comm_ms per step: median (min-max) over {iters} timed iterations, each "
            "the slowest rank's; GFLOP/s, algbw, busbw (GB/s) from the medians; speedup = "
            "serial baseline / time, eff/core = speedup x baseline threads / (ranks x threads); "
            f"{PREDICTION_NOTE}; flags: docs/statistics.md")
    if not width:
        return "# " + text
    return "\n".join(textwrap.wrap(text, width, initial_indent="# ", subsequent_indent="# "))


def format_table(records: Sequence[Mapping[str, Any]], width: int = TABLE_WIDTH) -> str:
    """A fixed-width text table of records under :func:`table_caption`, its columns in blocks
    of at most ``width`` characters (each block repeating scheme, ranks and grid;
    :func:`tpmpi.studies.table.wrapped`); ``width`` 0: one line per record."""
    heads = [list(table_row(records[0]))] if records else [[]]
    rows = heads + [list(table_row(r).values()) for r in records]
    return "\n".join([table_caption(records, width)] + wrapped(rows, width, keep=3))
