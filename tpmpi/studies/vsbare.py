"""tpmpi's layers against the bare products they parallelise, and the cost model's prediction.

``mpiexec -n P python -m tpmpi.studies.vsbare [--schemes column,row,mlp,tile2d,block]
[--dtypes ...] [--m M --k K --n N] [--heads H --seq T] [--calibration FILE] [--json FILE]``
times every scheme x dtype on the P
ranks, forward and forward+backward, as users run the layers (no profiler attached; median over
``--iters`` of the slowest rank), and the bare products of the same global sizes on one process
and the same backend (the scheme's serial step: ``x @ w + b``, with backward ``dy @ w.T``,
``x.T @ dy``, ``dy.sum(0)``; the FFN's two products and activation; the block: nanoGPT's block
forward and backward written in plain NumPy/CuPy, :mod:`tpmpi.studies.baregpt`, with ``--m``
tokens in sequences of ``--seq``), timed on rank 0 while the
others wait; where torch is installed, also ``torch.matmul`` on the same arrays (linear schemes).
Layers and bare products alternate in every round, so that load which comes and goes hits
both alike. ``ratio`` = bare time / tpmpi time (of the medians; ``ratio_*_best`` of the best
rounds, the steadier figure on a loaded machine: ``--best``): 1.0 is as fast as the bare
products; at P > 1 on a shared device it shows what communication and staging add to the
same arithmetic. ``pred_*`` is the cost model's prediction for the run
(:func:`tpmpi.studies.costmodel.predict` with ``--calibration``), ``err_*`` its relative error
against the measured median.

Each case prints one line on rank 0 and appends one JSON record to ``--json``;
``python -m tpmpi.studies.vsbare --table FILE.jsonl ...`` prints the side-by-side markdown table of
such records (one row per scheme and dtype, one column group per P; no MPI job needed).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Callable, NoReturn, Optional

from mpi4py import MPI

from ..core.args import int_flag
from ..core.arrays import Array
from ..core.backend import BACKENDS, Backend, get_backend
from ..core.comm import polite_barrier
from ..core.dtypes import SUPPORTED
from ..core.grid import ProcessGrid
from ..core.launch import Parser, UsageError, parse_args, usage
from ..core.launch import run as launch_run
from ..core.threads import configure_blas_threads, configured_blas_threads
from .bench import oversubscription
from .costmodel import Calibration, load_calibration, predict, square_grid
from .problem import Problem
from .record import mpi_library, read_lines, write_record
from .schemes import Case, bare_products, build
from .timing import time_calls

PHASES = ("fwd", "fwdbwd")
LINEAR = ("column", "row", "tile2d", "mlp")  # the layers against their bare products
SCHEMES = LINEAR + ("block",)  # and the transformer block against nanoGPT's in plain code
PROG = "python -m tpmpi.studies.vsbare"


def _torch_step(arrays: tuple[Array, Array, Array, Array], backend: Backend
                ) -> Optional[Callable[[bool], None]]:
    """The bare products in torch on the same arrays (DLPack, no copy; through float32 for a
    dtype DLPack cannot carry), tried once; None without torch or when the try fails (the
    reason printed)."""
    try:
        import torch
    except ImportError:
        return None

    def tensor(a: Array) -> Any:
        try:
            return torch.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError):
            return torch.from_dlpack(a.astype("float32")).to(getattr(torch, a.dtype.name))

    try:
        sync = torch.cuda.synchronize if backend.is_gpu else (lambda: None)
        x, w, b, dy = (tensor(a) for a in arrays)
        step = bare_products(torch.matmul, x, w, b, dy, sync)
        step(True)
    except Exception as exc:  # noqa: BLE001 - torch is an optional comparison
        print(f"torch comparison skipped: {type(exc).__name__}: {exc}", flush=True)
        return None
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time, which a loaded machine cannot
inflate (meaningful for one rank with one BLAS thread on a CPU: MPI's busy polling and
other threads count too)."""


def _bare_steps(case: Case, backend: Backend, with_torch: bool) -> dict:
    """``{"bare": step(backward)}`` of the case's bare products on one process (the block:
    nanoGPT's block in plain array code, :mod:`tpmpi.studies.baregpt`), and ``"torch"``'s on
    the same arrays for a linear scheme with torch installed."""
    if case.problem.scheme not in LINEAR:
        return {"bare": case.serial(backend)}
    arrays = case.full_arrays(backend)  # one set for the backend's and torch's products
    steps = {"bare": bare_products(backend.xp.matmul, *arrays, backend.synchronize)}
    torch_step = _torch_step(arrays, backend) if with_torch else None
    if torch_step is not None:
        steps["torch"] = torch_step
    return steps


def time_case(case: Case, comm: MPI.Comm, *, warmup: int, iters: int, with_torch: bool,
              clock: str = "wall") -> dict:
    """Seconds of each of ``iters`` rounds (after ``warmup``) per measurement: ``fwd`` and
    ``fwdbwd`` of the layers (slowest rank), ``bare_fwd``, ``bare_fwdbwd`` and (with torch)
    ``torch_fwd``, ``torch_fwdbwd`` of the bare products on rank 0 while the other ranks wait
    without polling. Layers and bare products alternate in every round, so that load which
    comes and goes hits both alike; ``clock`` one of :data:`CLOCKS`. Collective; the dict on
    every rank."""
    backend, now = case.backend, CLOCKS[clock]
    steps = _bare_steps(case, backend, with_torch) if comm.Get_rank() == 0 else {}

    def fwdbwd() -> None:
        case.forward()
        case.backward()

    def seconds(call: Callable[[], Any], group: Optional[MPI.Comm] = None) -> float:
        """One sample of ``call()`` (the slowest rank's of ``group``)."""
        return float(time_calls([call], group, sync=backend.synchronize, clock=now)[0, 0])

    samples: dict[str, list[float]] = {}
    for i in range(warmup + iters):
        times = {phase: seconds(call, comm) for phase, call in zip(PHASES, (case.forward, fwdbwd))}
        polite_barrier(comm)
        for name, step in steps.items():
            for phase, backward in zip(PHASES, (False, True)):
                times[f"{name}_{phase}"] = seconds(partial(step, backward))
        polite_barrier(comm)
        if i >= warmup:
            for name, t in times.items():
                samples.setdefault(name, []).append(t)
    return comm.bcast(samples, root=0)


def compare(scheme: str, dtype: str, comm: MPI.Comm, backend: Backend, *, m: int, k: int,
            n: int, hidden: Optional[int] = None, heads: Optional[int] = None,
            seq: int = 512, warmup: int = 1, iters: int = 5,
            calibration: Optional[Calibration] = None, with_torch: bool = True,
            clock: str = "wall") -> dict:
    """One record: ``scheme`` in ``dtype`` on the ranks of ``comm`` (1 x P; tile2d on the most
    square grid) against its bare products, with the model's predictions: per measurement of
    :func:`time_case` the median (``NAME_s``) and best (``NAME_best_s``) seconds; ``ratio_*``
    (bare / tpmpi) of the medians and ``ratio_*_best`` of the best times. Collective."""
    p = comm.Get_size()
    grid = ProcessGrid(comm, square_grid(p) if scheme == "tile2d" else None)
    shape: dict[str, Any] = {"heads": heads, "seq": seq} if scheme == "block" else {}
    problem = Problem(scheme=scheme, m=m, k=k, n=n if scheme in LINEAR[:3] else k,
                      hidden=(hidden or k) if scheme == "mlp" else None, dtype=dtype,
                      backward=True, **shape)
    case = build(problem, grid, backend)
    rec: dict[str, Any] = {
        "scheme": scheme, "ranks": p, "grid": grid.label, "m": problem.m, "k": problem.k,
        "n": problem.n, "hidden": problem.hidden, "dtype": dtype, "backend": backend.name,
        "gpu_aware": case.backend.gpu_aware, "warmup": warmup, "iters": iters, "clock": clock}
    for name, times in time_case(case, comm, warmup=warmup, iters=iters,
                                 with_torch=with_torch, clock=clock).items():
        rec[f"{name}_s"], rec[f"{name}_best_s"] = statistics.median(times), min(times)
    conditions: dict[str, Any] = {
        "oversubscription": oversubscription(grid.comm, configured_blas_threads(), case.backend),
        "staged": case.backend.is_gpu and not case.backend.gpu_aware}
    rec.update(conditions)
    for phase, backward in zip(PHASES, (False, True)):
        rec[f"ratio_{phase}"] = rec[f"bare_{phase}_s"] / rec[f"{phase}_s"]
        rec[f"ratio_{phase}_best"] = rec[f"bare_{phase}_best_s"] / rec[f"{phase}_best_s"]
        pred = predict(dataclasses.replace(problem, backward=backward), p, grid.shape,
                       calibration or Calibration(), backend.name, **conditions)
        assert pred is not None, f"the cost model knows scheme {scheme!r}"
        rec[f"pred_{phase}_s"] = pred.time_s
        rec[f"err_{phase}"] = pred.time_s / rec[f"{phase}_s"] - 1
    rec["mpi_library"] = mpi_library()
    rec["device"] = case.backend.device_name()
    grid.free()
    return rec


def format_line(rec: dict) -> str:
    """One case as a line of text (times in ms)."""
    if "error" in rec:
        return f"{rec['scheme']:7s} {rec['dtype']:9s} P={rec['ranks']}: ERROR {rec['error']}"
    torch = "".join(f" torch {rec[f'torch_{ph}_s'] * 1e3:.2f}" for ph in PHASES
                    if f"torch_{ph}_s" in rec)
    return (f"{rec['scheme']:7s} {rec['dtype']:9s} P={rec['ranks']} ({rec['grid']}): "
            + "  ".join(f"{ph} {rec[f'{ph}_s'] * 1e3:.2f} ms vs bare "
                        f"{rec[f'bare_{ph}_s'] * 1e3:.2f} -> {rec[f'ratio_{ph}']:.3f} (best "
                        f"{rec[f'ratio_{ph}_best']:.3f}), pred {rec[f'pred_{ph}_s'] * 1e3:.2f} "
                        f"({rec[f'err_{ph}']:+.0%})" for ph in PHASES) + torch)


def format_table(records: Sequence[dict], best: bool = False) -> str:
    """Markdown: one row per (scheme, dtype), per P the forward and forward+backward ratios
    (bare / tpmpi; of the best times with ``best``, else of the medians) and measured vs
    predicted ms; a last column with torch's time over the bare backend's for the same
    products (forward+backward, lowest P)."""
    sfx = "_best" if best else ""
    ranks = sorted({r["ranks"] for r in records})
    rows: dict = {}
    for r in records:
        rows.setdefault((r["scheme"], r["dtype"]), {})[r["ranks"]] = r
    head = ["scheme", "dtype"]
    for p in ranks:
        head += [f"P={p} fwd", f"P={p} fwd+bwd", f"P={p} fwd+bwd ms (pred)"]
    head.append("torch/bare fwd+bwd")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (scheme, dtype), by_p in sorted(rows.items(), key=lambda kv: (SCHEMES.index(kv[0][0])
                                                                       if kv[0][0] in SCHEMES
                                                                       else 99, kv[0][1])):
        cells = [scheme, dtype]
        for p in ranks:
            r = by_p.get(p)
            if r is None or "error" in r:
                cells += ["-" if r is None else "error"] * 3
                continue
            cells += [f"{r['ratio_fwd' + sfx]:.2f}", f"{r['ratio_fwdbwd' + sfx]:.2f}",
                      f"{r[f'fwdbwd{sfx}_s'] * 1e3:.1f} ({r['pred_fwdbwd_s'] * 1e3:.1f})"]
        first = by_p[min(by_p)]
        cells.append(f"{first[f'torch_fwdbwd{sfx}_s'] / first[f'bare_fwdbwd{sfx}_s']:.2f}"
                     if f"torch_fwdbwd{sfx}_s" in first else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command line of the module docstring."""
    ap = Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", metavar="FILE.jsonl",
                    help="print the markdown table of these records and exit (no MPI job)")
    ap.add_argument("--best", action="store_true",
                    help="tables of the best times instead of the medians (a loaded machine)")
    ap.add_argument("--schemes", default=",".join(LINEAR),
                    help=f"comma list of {', '.join(SCHEMES)} (default: {','.join(LINEAR)})")
    ap.add_argument("--dtypes", default=None,
                    help="default float32,float16,bfloat16 on a GPU, float32,float64 on a CPU")
    for dim in ("m", "k", "n"):
        ap.add_argument(f"--{dim}", type=int_flag(), default=2048)
    ap.add_argument("--hidden", type=int_flag(), default=None, help="mlp hidden size (default k)")
    ap.add_argument("--heads", type=int_flag(), default=None,
                    help="block: attention heads (default k / 64)")
    ap.add_argument("--seq", type=int_flag(), default=512,
                    help="block: tokens per sequence (--m must be a multiple)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--warmup", type=int_flag(), default=1)
    ap.add_argument("--iters", type=int_flag(), default=5)
    ap.add_argument("--calibration", metavar="FILE", default=None)
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: the process's CPU time (one rank and TPMPI_THREADS=1 on a loaded "
                         "CPU machine)")
    ap.add_argument("--json", metavar="FILE", help="append one JSON record per case")
    return ap


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> int:
    """Command line (see the module docstring). Usage errors raise
    :class:`~tpmpi.core.launch.UsageError` on every rank; a case's error is recorded and the
    next case runs."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    args = parse_args(_parser(), argv, comm)
    if args.table:
        if comm.Get_rank() == 0:
            print(format_table([rec for _, rec in read_lines(args.table)], args.best))
        return 0
    with usage():
        backend = get_backend(args.backend, comm)
        configure_blas_threads(comm)
        dtypes = (args.dtypes.split(",") if args.dtypes else
                  ["float32", "float16", "bfloat16"] if backend.is_gpu else
                  ["float32", "float64"])
        bad = [v for v in dtypes if v not in SUPPORTED] + \
            [v for v in args.schemes.split(",") if v not in SCHEMES]
        if bad:
            raise UsageError(f"unknown scheme or dtype {bad[0]!r}")
        calibration = load_calibration(args.calibration)
    records = []
    for dtype in dtypes:
        for scheme in args.schemes.split(","):
            try:
                rec = compare(scheme, dtype, comm, backend, m=args.m, k=args.k, n=args.n,
                              hidden=args.hidden, heads=args.heads, seq=args.seq,
                              warmup=args.warmup, iters=args.iters,
                              calibration=calibration, with_torch=args.torch,
                              clock=args.clock)
            except ValueError as exc:  # raised on every rank (tpmpi agrees on errors)
                rec = {"scheme": scheme, "dtype": dtype, "ranks": comm.Get_size(),
                       "error": str(exc)}
            records.append(rec)
            if comm.Get_rank() == 0:
                print(format_line(rec), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        write_record(rec, fh)
    if comm.Get_rank() == 0:
        print(format_table(records, args.best))
    return 0


def run() -> NoReturn:
    """Entry point under mpiexec (:func:`tpmpi.core.launch.run`): usage errors exit 2 with one
    line; an interruption or an unexpected exception aborts the whole job (no rank is left
    waiting in a collective)."""
    launch_run(main, PROG)


if __name__ == "__main__":
    run()
