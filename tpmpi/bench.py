"""Timed runs of a scheme and their JSON-lines result records (fields: docs/record-schema.md).

Timing: ``warmup`` untimed steps, then ``iters`` steps each bracketed by a Barrier and a stream
sync; an iteration's time is the maximum over ranks. The time spent in local products and
blocked in collectives is snapshotted from the layers' profilers around every iteration (max
over ranks per iteration), so ``gemm_s`` / ``comm_s`` are medians over the iterations like
``time_s``; ``spread`` holds their ``{median, min, max}``. ``algbw = S / comm_s`` and
``busbw = S * factor / comm_s`` with ``S`` the nccl-tests size of each collective and the
nccl-tests factors ((P-1)/P allgather and reduce-scatter, 2(P-1)/P allreduce).
``d2h_bytes`` / ``h2d_bytes`` are the bytes a rank's layers staged device->host and back per
iteration (GPU without GPU-aware MPI; 0 otherwise) and ``staging_s`` the seconds per iteration
spent in those copies, part of the communication time (means over the iterations, max over
ranks). ``mem_peak_bytes`` is the peak of the backend's allocations while the case is built
and stepped once (tracemalloc for NumPy, the memory-pool hook for CuPy), max over ranks.
``flags`` marks suspicious figures (:mod:`tpmpi.stats`).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
from typing import Callable, Optional, Sequence, TextIO

import numpy as np
from mpi4py import MPI

from threadpoolctl import threadpool_limits

from ._version import __version__

from .backend import Backend, blas_info, configured_blas_threads, device_facts, node_comm
from .comm import polite_barrier
from .costmodel import Calibration, load_calibration, predict
from .data_parallel import BUCKET_BYTES, measure_dp_overlap
from .dtypes import tolerance
from .grid import ProcessGrid
from .mesh import Mesh
from .overlap import measure_overlap
from .progress import Progress, announce, case_units
from .schemes import Problem
from .schemes.hybrid import build_case
from .schemes.mlp import hidden_of
from .stats import flags, load_per_cpu, short, summary


def _max_over_ranks(comm: MPI.Comm, values) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.MAX)
    return arr


def mpi_library() -> str:
    """First line of ``MPI_Get_library_version``."""
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def node_threads(comm: MPI.Comm, threads_per_rank: Optional[int], cap: bool = True) -> int:
    """BLAS threads of all ranks of this node together; with ``cap``, at most this rank's CPU
    mask (the threads a single process gets in the serial baseline). Collective."""
    node = node_comm(comm)
    total = (threads_per_rank or 1) * node.Get_size()
    node.Free()
    return min(total, len(os.sched_getaffinity(0))) if cap else total


def serial_baseline(case, grid: "ProcessGrid | Mesh", backend: Backend, *, warmup: int,
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
            step = case.serial(backend)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        result = summary(times)
    polite_barrier(comm)
    return comm.bcast(result, root=0)


@functools.lru_cache(maxsize=1)
def default_calibration() -> Calibration:
    """The calibration named by env ``TPMPI_CALIBRATION``, else the model's defaults."""
    return load_calibration()


def _profiled(case) -> tuple[float, float]:
    """Seconds in local products and in collectives so far, summed over the case's layers."""
    totals = [p.totals() for p in case.profilers]
    return sum(t["gemm_s"] for t in totals), sum(t["comm_s"] for t in totals)


def _timed_steps(case, comm: MPI.Comm, backend: Backend, iters: int,
                 progress: Callable[[str], None]) -> np.ndarray:
    """Run ``iters`` timed steps; rows forward, backward, GEMM and communication seconds of
    each iteration (columns), each the maximum over ranks. Collective."""
    backward = case.problem.backward
    samples = np.zeros((4, iters))
    for i in range(iters):
        gemm0, comm0 = _profiled(case)
        comm.Barrier()
        t0 = time.perf_counter()
        case.forward()
        backend.synchronize()
        t1 = time.perf_counter()
        if backward:
            case.backward()
            backend.synchronize()
        samples[:2, i] = t1 - t0, time.perf_counter() - t1
        gemm1, comm1 = _profiled(case)
        samples[2:, i] = gemm1 - gemm0, comm1 - comm0
        progress(f"timed step {i + 1}/{iters}")
    comm.Allreduce(MPI.IN_PLACE, samples, op=MPI.MAX)
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
    """For a case the cost model expects to run longer than :data:`tpmpi.progress.LONG_S`:
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


def mlp_hidden(problem: Problem) -> Optional[int]:
    """The hidden size in effect: the MLP's d_hidden (4·k unless given); None for the
    single-GEMM schemes, which have none."""
    return hidden_of(problem) if problem.scheme == "mlp" else None


def run_case(problem: Problem, grid: "ProcessGrid | Mesh", backend: Backend, *, warmup: int = 2,
             iters: int = 10, verify: bool = True, baseline: "bool | dict" = False,
             baseline_threads: Optional[int] = None,
             calibration: Optional[Calibration] = None, overlap: bool = False,
             progress: Optional[Callable[[str], None]] = None,
             bucket_bytes: int = BUCKET_BYTES) -> dict:
    """Build, time and (optionally) verify ``problem`` on ``grid``, or on a :class:`Mesh` of
    ``dp`` replicas of a TP grid (:class:`tpmpi.schemes.hybrid.DataParallelCase`: each replica
    takes M/dp rows, gradients averaged in DataParallel buckets of ``bucket_bytes``; fields
    ``mesh``, ``dp_bytes`` and ``dp_comm_s``, the DP traffic and mean time blocked in it per
    iteration, and with ``overlap`` phase ``dp``, the DP Allreduce hidden under backward;
    ``grid`` is then the TP grid and ``comm_s`` its collectives); with ``baseline``, also
    time the serial single-process product in the same job with ``baseline_threads`` threads
    (a dict is the ``{median, min, max}`` of a baseline measured earlier); ``baseline_s``
    (median), ``speedup`` = baseline_s / time, ``efficiency`` = speedup x baseline threads /
    (ranks x threads per rank), i.e. per core. ``predicted_s`` comes from the cost
    model with ``calibration`` (default: :func:`tpmpi.costmodel.load_calibration`). With
    ``overlap``, field ``overlap`` holds, per phase (forward, and backward when timed), the
    OSU measurement of :func:`tpmpi.overlap.measure_overlap`: overall, compute-only and
    communication-only medians, overlap % and seconds saved. ``progress(desc)`` is called
    after each unit of :func:`tpmpi.progress.case_units`. The record on every rank.
    Collective over ``grid.comm`` (the mesh's)."""
    mesh, grid = (grid, grid.tp) if isinstance(grid, Mesh) else (None, grid)
    comm, ranks, dp = (mesh.comm, mesh.size, mesh.dp) if mesh else (grid.comm, grid.size, 1)
    progress = progress or (lambda desc: None)
    load = [load_per_cpu() or 0.0]
    with backend.memory_peak() as mem:
        case = build_case(problem, mesh or grid, backend, bucket_bytes=bucket_bytes)
        case.attach_profilers()
        problem = case.problem  # with the options in effect (e.g. a rounded panel)
        case.forward()
        if problem.backward:
            case.backward()
    progress("first step")
    for i in range(warmup):
        case.forward()
        if problem.backward:
            case.backward()
        progress(f"warmup {i + 1}/{warmup}")
    dp_prof = case.dp.profiler if mesh else None
    for prof in list(case.profilers) + ([dp_prof] if dp_prof else []):
        prof.reset()
    stagings = [layer.staging for layer in getattr(case, "layers", ())] + (
        [case.dp.staging] if mesh else [])
    for staging in stagings:
        staging.reset_stats()
    fwd_t, bwd_t, gemm_t, comm_t = _timed_steps(case, comm, backend, iters, progress)
    load.append(load_per_cpu() or 0.0)
    totals = [p.totals() for p in case.profilers]
    per_iter = [sum(t[key] for t in totals) / max(iters, 1) for key in ("bytes", "bus_bytes")]
    per_iter += [dp_prof.comm_s / max(iters, 1), dp_prof.bytes / max(iters, 1)] if dp_prof \
        else [0.0, 0.0]
    staged = [sum(st.stats[key] for st in stagings) / max(iters, 1)
              for key in ("d2h_bytes", "h2d_bytes", "staging_s")]
    mem_peak, nbytes, bus_bytes, dp_comm_s, dp_bytes, d2h, h2d, staging_s = _max_over_ranks(
        comm, [mem["peak"]] + per_iter + staged)
    mem_peak = int(mem_peak)
    time_s = summary(fwd_t + bwd_t)
    median = time_s["median"] if time_s else float("nan")
    spread = {"fwd_s": summary(fwd_t), "bwd_s": summary(bwd_t) if problem.backward else None,
              "gemm_s": summary(gemm_t), "comm_s": summary(comm_t), "baseline_s": None}
    gemm_s, comm_s = (spread[k]["median"] if iters else 0.0 for k in ("gemm_s", "comm_s"))
    flops = case.flops * (3 if problem.backward else 1)
    phases = {}
    if overlap:
        tp_case = case.inner if mesh else case  # TP overlap without the DP Allreduce
        phases["forward"] = measure_overlap(case.layers, tp_case.forward, warmup=1, iters=iters)
        if problem.backward:
            phases["backward"] = measure_overlap(case.layers, tp_case.backward, warmup=1,
                                                 iters=iters)
            if mesh and dp > 1:
                phases["dp"] = measure_dp_overlap(case.dp, case.inner.dy, iters=iters)
        progress("overlap")
    err = case.verify() if verify else None
    progress("verify")
    threads = configured_blas_threads()
    if baseline is not False and baseline_threads is None:
        baseline_threads = node_threads(comm, threads)
    if baseline is True:
        spread["baseline_s"] = serial_baseline(case, mesh or grid, backend, warmup=warmup,
                                               iters=iters, threads=baseline_threads)
        load.append(load_per_cpu() or 0.0)
        progress("baseline")
    elif baseline:
        spread["baseline_s"] = dict(baseline)
    base = spread["baseline_s"]["median"] if spread["baseline_s"] else None
    oversub = oversubscription(comm, threads, backend)
    pred = predict(problem, ranks, grid.shape, calibration or default_calibration(),
                   backend.name, oversubscription=oversub, dp=dp, bucket_bytes=bucket_bytes,
                   staged=case.backend.is_gpu and not case.backend.gpu_aware)
    load_max, oversub_max = _max_over_ranks(comm, [max(load), oversub])
    calls: dict[str, int] = {}
    for t in totals:
        for op, c in t["calls"].items():
            calls[op] = calls.get(op, 0) + c
    rec = {
        "scheme": problem.scheme, "ranks": ranks, "grid": grid.label,
        "mesh": {"dp": dp, "tp": grid.label, "bucket_bytes": bucket_bytes if mesh else None},
        "m": problem.m, "k": problem.k, "n": problem.n, "hidden": mlp_hidden(problem),
        "dtype": problem.dtype, "backend": backend.name, "gpu_aware": case.backend.gpu_aware,
        "threads_per_rank": threads, "warmup": warmup, "iters": iters,
        "backward": problem.backward, "options": problem.opts,
        "time_s": time_s or {"median": median, "min": None, "max": None},
        "fwd_s": spread["fwd_s"]["median"] if iters else None,
        "bwd_s": spread["bwd_s"]["median"] if spread["bwd_s"] else None,
        "gemm_s": float(gemm_s), "comm_s": float(comm_s), "spread": spread,
        "gflops": flops / median / 1e9 if median > 0 else None,
        "comm_bytes": float(nbytes),
        "d2h_bytes": int(d2h), "h2d_bytes": int(h2d), "staging_s": float(staging_s),
        "collectives": {op: c // max(iters, 1) for op, c in calls.items()},
        "dp_bytes": float(dp_bytes), "dp_comm_s": float(dp_comm_s),
        "algbw_gbs": nbytes / comm_s / 1e9 if comm_s > 0 else None,
        "busbw_gbs": bus_bytes / comm_s / 1e9 if comm_s > 0 else None,
        "mem_peak_bytes": mem_peak,
        "max_rel_err": err, "tolerance": tolerance(problem.dtype, problem.longest_sum),
        "predicted_s": pred.time_s if pred else None,
        "overlap": {phase: t.as_dict() for phase, t in phases.items()} or None,
        "predicted": dataclasses.asdict(pred) if pred else None,
        "baseline_s": base,
        "speedup": base / median if base and median > 0 else None,
        "baseline_threads": baseline_threads if base else None,
        # per-core efficiency: the baseline process may use several cores
        "efficiency": base / median * baseline_threads / (ranks * (threads or 1))
        if base and median > 0 else None,
        "load_per_cpu": float(load_max), "oversubscription": float(oversub_max),
        "mpi_library": mpi_library(), "blas": blas_info(backend),
        "version": __version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rec["flags"] = flags(rec)
    return rec


def _ms(s: Optional[dict]) -> Optional[str]:
    """``median (min-max)`` in milliseconds of a summary in seconds."""
    if not s or s.get("min") is None:
        return None
    return f"{s['median'] * 1e3:.3f} ({short(s['min'] * 1e3)}-{short(s['max'] * 1e3)})"


def _num(fmt: str, value) -> Optional[str]:
    return None if value is None else fmt.format(value)


def table_row(rec: dict) -> dict:
    """The printed columns of a record: name -> text (None prints as "-")."""
    spread = rec.get("spread") or {}
    dp = (rec.get("mesh") or {}).get("dp", 1)
    return {"scheme": rec["scheme"], "ranks": rec["ranks"],
            "grid": rec["grid"] if dp == 1 else f"{dp}x({rec['grid']})", "m": rec["m"],
            "k": rec["k"], "n": rec["n"],
            "options": ",".join(f"{k}={v}" for k, v in sorted(rec["options"].items()))
            + (f",hidden={rec['hidden']}" if rec.get("hidden") is not None else "") or "-",
            "dtype": rec["dtype"], "backend": rec["backend"],
            "threads": rec["threads_per_rank"], "time_ms": _ms(rec["time_s"]),
            "gemm_ms": _ms(spread.get("gemm_s")), "comm_ms": _ms(spread.get("comm_s")),
            "GFLOP/s": _num("{:.1f}", rec["gflops"]),
            "algbw": _num("{:.2f}", rec["algbw_gbs"]), "busbw": _num("{:.2f}", rec["busbw_gbs"]),
            "mem_MiB": f"{rec['mem_peak_bytes'] / 2**20:.1f}",
            "rel_err": _num("{:.2e}", rec["max_rel_err"]),
            "pred_ms": _num("{:.3f}", rec.get("predicted_s") and rec["predicted_s"] * 1e3),
            "speedup": _num("{:.2f}", rec.get("speedup")),
            "eff/core": _num("{:.2f}", rec.get("efficiency")),
            "flags": ",".join(rec.get("flags") or ()) or None}


def table_caption(records: Sequence[dict]) -> str:
    """The line above a table saying which statistic its columns show."""
    iters = ",".join(sorted({str(r["iters"]) for r in records})) or "?"
    return (f"# time/gemm/comm_ms per step: median (min-max) over {iters} timed iterations, each "
            "the slowest rank's; GFLOP/s, algbw, busbw (GB/s) from the medians; speedup = "
            "serial baseline / time, eff/core = speedup x baseline threads / (ranks x threads); "
            "flags: docs/statistics.md")


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of records under :func:`table_caption`."""
    rows = [list(table_row(r).values()) for r in records]
    heads = list(table_row(records[0])) if records else []
    rows = [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    lines = [table_caption(records), "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_record(rec: dict, fh: Optional[TextIO]) -> None:
    """Append ``rec`` as one JSON line (call on rank 0 only)."""
    if fh is not None:
        fh.write(json.dumps(rec, sort_keys=False) + "\n")
        fh.flush()
