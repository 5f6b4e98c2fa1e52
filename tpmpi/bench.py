"""Timed runs of a scheme and their JSON-lines result records (fields fixed by DESIGN.md).

Timing: ``warmup`` untimed steps, then ``iters`` steps each bracketed by a Barrier and a stream
sync; an iteration's time is the maximum over ranks. ``gemm_s`` / ``comm_s`` are per-iteration
means (max over ranks) of the time spent in local products and blocked in collectives;
``algbw = S / comm_s`` and ``busbw = S * factor / comm_s`` with ``S`` the nccl-tests size of
each collective and the nccl-tests factors ((P-1)/P allgather and reduce-scatter, 2(P-1)/P
allreduce). ``d2h_bytes`` / ``h2d_bytes`` are the bytes a rank's layers staged device->host and
back per iteration (GPU without GPU-aware MPI; 0 otherwise) and ``staging_s`` the seconds of it
spent in those copies, part of ``comm_s`` (max over ranks each). ``mem_peak_bytes`` is the
peak of the backend's allocations while the case is built and stepped once (tracemalloc for
NumPy, the memory-pool hook for CuPy), max over ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
from typing import Optional, TextIO

import numpy as np
from mpi4py import MPI

from . import __version__
from threadpoolctl import threadpool_limits

from .backend import Backend, blas_info, node_comm
from .comm import polite_barrier
from .costmodel import Calibration, load_calibration, predict
from .dtypes import tolerance
from .grid import ProcessGrid
from .overlap import measure_overlap
from .schemes import Problem, build


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


def serial_baseline(case, grid: ProcessGrid, backend: Backend, *, warmup: int,
                    iters: int, threads: Optional[int] = None) -> float:
    """Median time of the case's serial product on rank 0 using ``threads`` BLAS threads
    (default: those of all ranks of its node), the single-process reference for speedup and
    efficiency, while the other ranks wait without busy-polling. Collective; the value on
    every rank."""
    comm = grid.comm
    if threads is None:
        threads = node_threads(comm, grid.threads)
    polite_barrier(comm)
    median = 0.0
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
        median = float(np.median(times))
    polite_barrier(comm)
    return comm.bcast(median, root=0)


@functools.lru_cache(maxsize=1)
def default_calibration() -> Calibration:
    """The calibration named by env ``TPMPI_CALIBRATION``, else the model's defaults."""
    return load_calibration()


def run_case(problem: Problem, grid: ProcessGrid, backend: Backend, *, warmup: int = 2,
             iters: int = 10, verify: bool = True, baseline: "bool | float" = False,
             baseline_threads: Optional[int] = None,
             calibration: Optional[Calibration] = None, overlap: bool = False) -> dict:
    """Build, time and (optionally) verify ``problem`` on ``grid``; with ``baseline``, also
    time the serial single-process product in the same job with ``baseline_threads`` threads
    (a float is a baseline time measured earlier); ``baseline_s``, ``speedup`` =
    baseline_s / time, ``efficiency`` = speedup x baseline threads / (ranks x threads per
    rank), i.e. per core. ``predicted_s`` comes from the cost
    model with ``calibration`` (default: :func:`tpmpi.costmodel.load_calibration`). With
    ``overlap``, field ``overlap`` holds, per phase (forward, and backward when timed), the
    OSU measurement of :func:`tpmpi.overlap.measure_overlap`: overall, compute-only and
    communication-only medians, overlap % and seconds saved. The record on every rank.
    Collective over ``grid.comm``."""
    comm = grid.comm
    with backend.memory_peak() as mem:
        case = build(problem, grid, backend)
        problem = case.problem  # with the options in effect (e.g. a rounded panel)
        case.forward()
        if problem.backward:
            case.backward()
    for _ in range(warmup):
        case.forward()
        if problem.backward:
            case.backward()
    for prof in case.profilers:
        prof.reset()
    stagings = [layer.staging for layer in getattr(case, "layers", ())]
    for staging in stagings:
        staging.reset_stats()
    fwd, bwd = [], []
    for _ in range(iters):
        comm.Barrier()
        t0 = time.perf_counter()
        case.forward()
        backend.synchronize()
        t1 = time.perf_counter()
        if problem.backward:
            case.backward()
            backend.synchronize()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
    totals = [p.totals() for p in case.profilers]
    per_iter = [sum(t[key] for t in totals) / max(iters, 1)
                for key in ("gemm_s", "comm_s", "bytes", "bus_bytes")]
    staged = [sum(st.stats[key] for st in stagings) / max(iters, 1)
              for key in ("d2h_bytes", "h2d_bytes", "staging_s")]
    stats = _max_over_ranks(comm, fwd + bwd + [mem["peak"]] + per_iter + staged)
    fwd_t, bwd_t = stats[:iters], stats[iters:2 * iters]
    mem_peak = int(stats[2 * iters])
    gemm_s, comm_s, nbytes, bus_bytes, d2h, h2d, staging_s = stats[2 * iters + 1:]
    total = fwd_t + bwd_t
    median = float(np.median(total)) if iters else float("nan")
    flops = case.flops * (3 if problem.backward else 1)
    phases = {}
    if overlap:
        phases["forward"] = measure_overlap(case.layers, case.forward, warmup=1, iters=iters)
        if problem.backward:
            phases["backward"] = measure_overlap(case.layers, case.backward, warmup=1,
                                                 iters=iters)
    err = case.verify() if verify else None
    if baseline is not False and baseline_threads is None:
        baseline_threads = node_threads(comm, grid.threads)
    if baseline is True:
        base = serial_baseline(case, grid, backend, warmup=warmup, iters=iters,
                               threads=baseline_threads)
    else:
        base = float(baseline) if baseline else None
    pred = predict(problem, grid.size, grid.shape, calibration or default_calibration(),
                   backend.name, oversubscription=1.0 if backend.is_gpu else
                   node_threads(comm, grid.threads, cap=False) / len(os.sched_getaffinity(0)))
    calls: dict[str, int] = {}
    for t in totals:
        for op, c in t["calls"].items():
            calls[op] = calls.get(op, 0) + c
    return {
        "scheme": problem.scheme, "ranks": grid.size, "grid": grid.label,
        "m": problem.m, "k": problem.k, "n": problem.n, "hidden": problem.hidden,
        "dtype": problem.dtype, "backend": backend.name, "gpu_aware": backend.gpu_aware,
        "threads_per_rank": grid.threads, "warmup": warmup, "iters": iters,
        "backward": problem.backward, "options": problem.opts,
        "time_s": {"median": median, "min": float(np.min(total)) if iters else None,
                   "max": float(np.max(total)) if iters else None},
        "fwd_s": float(np.median(fwd_t)) if iters else None,
        "bwd_s": float(np.median(bwd_t)) if iters and problem.backward else None,
        "gemm_s": float(gemm_s), "comm_s": float(comm_s),
        "gflops": flops / median / 1e9 if median > 0 else None,
        "comm_bytes": float(nbytes),
        "d2h_bytes": int(d2h), "h2d_bytes": int(h2d), "staging_s": float(staging_s),
        "collectives": {op: c // max(iters, 1) for op, c in calls.items()},
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
        "efficiency": base / median * baseline_threads / (grid.size * (grid.threads or 1))
        if base and median > 0 else None,
        "mpi_library": mpi_library(), "blas": blas_info(backend),
        "version": __version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


COLUMNS = [("scheme", "{}"), ("ranks", "{}"), ("grid", "{}"), ("m", "{}"), ("k", "{}"),
           ("n", "{}"), ("options", "{}"), ("dtype", "{}"), ("backend", "{}"),
           ("threads", "{}"),
           ("time_ms", "{:.3f}"), ("gemm_ms", "{:.3f}"), ("comm_ms", "{:.3f}"),
           ("GFLOP/s", "{:.1f}"), ("algbw", "{:.2f}"), ("busbw", "{:.2f}"),
           ("mem_MiB", "{:.1f}"), ("rel_err", "{:.2e}"), ("pred_ms", "{:.3f}"),
           ("eff", "{:.2f}")]


def table_row(rec: dict) -> dict:
    """The printed columns of a record."""
    return {"scheme": rec["scheme"], "ranks": rec["ranks"], "grid": rec["grid"], "m": rec["m"],
            "k": rec["k"], "n": rec["n"],
            "options": ",".join(f"{k}={v}" for k, v in sorted(rec["options"].items()))
            + (f",hidden={rec['hidden']}" if rec.get("hidden") is not None else "") or "-",
            "dtype": rec["dtype"], "backend": rec["backend"],
            "threads": rec["threads_per_rank"], "time_ms": rec["time_s"]["median"] * 1e3,
            "gemm_ms": rec["gemm_s"] * 1e3, "comm_ms": rec["comm_s"] * 1e3,
            "GFLOP/s": rec["gflops"], "algbw": rec["algbw_gbs"], "busbw": rec["busbw_gbs"],
            "mem_MiB": rec["mem_peak_bytes"] / 2**20, "rel_err": rec["max_rel_err"],
            "pred_ms": rec["predicted_s"] * 1e3 if rec.get("predicted_s") is not None else None,
            "eff": rec.get("efficiency")}


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of records (algbw/busbw in GB/s)."""
    rows = [[("-" if row[name] is None else fmt.format(row[name])) for name, fmt in COLUMNS]
            for row in map(table_row, records)]
    heads = [name for name, _ in COLUMNS]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_record(rec: dict, fh: Optional[TextIO]) -> None:
    """Append ``rec`` as one JSON line (call on rank 0 only)."""
    if fh is not None:
        fh.write(json.dumps(rec, sort_keys=False) + "\n")
        fh.flush()
