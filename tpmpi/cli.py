"""Command line: ``python -m tpmpi {run,bench,calibrate,plan,report,info}`` under ``mpiexec -n P``
or ``srun`` (``plan`` and ``report`` need no MPI job). Reference: docs/cli.md.

Exit codes (the same on every rank; the line on rank 0's stderr):

* 0 success;
* 1 ``run --check`` failed (error above the dtype's tolerance);
* 2 usage error: bad or inconsistent flags (or environment settings such as ``TPMPI_THREADS``),
  a grid or mesh that does not factor the ranks, a backend or dtype this machine lacks, a
  problem that cannot fit in memory, a ``--json`` file that cannot be written, a missing input
  file: found before the work starts (:func:`usage`), one line ``tpmpi: error: ...``;
* 3 runtime error: the work itself failed with an error tpmpi reports on every rank together
  (e.g. records that do not parse, an agreement failing mid-run, a failed verification), one
  line ``tpmpi: error: ...``.

An unexpected exception prints its traceback and aborts the whole job (``MPI_Abort``), so no
rank is left hanging; an interruption (SIGINT/Ctrl-C, SIGTERM from ``scancel`` or a time limit)
prints one line and aborts the job at once (``MPI_Abort`` with 128 + the signal number), even
while this rank waits inside MPI.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, NoReturn, Optional, Union

from mpi4py import MPI

from ._version import __version__
from .core.agreement import Same, Text, agree, agree_checks
from .core.backend import BACKENDS, Backend, blas_info, configure_blas_threads, get_backend, \
    node_comm
from .core.colltable import OPS
from .core.dtypes import SUPPORTED, resolve_dtype
from .core.args import int_flag
from .core.grid import ProcessGrid, parse_shape
from .core.mesh import Mesh
from .layers.activations import ACTIVATIONS
from .layers.data_parallel import BUCKET_BYTES
from .layers.mlp import MODES
from .studies import footprint
from .studies.bench import case_progress, format_table, run_case
from .studies.collbench import calibrate, sizes_sweep
from .studies.costmodel import Calibration, explain, format_plan, load_calibration, plan
from .studies.record import calibration_facts, mpi_library, write_record
from .studies.schemes import KNOWN, Problem, available
from .studies.schemes.hybrid import largest_replica
from .studies.stats import short
from .studies.sweep import (SCHEME_OPTIONS, SWEEPS, collective_sweep, configs, default_ranks,
                            parse_size, run_sweep)

DESCRIPTION = ("Tensor-parallel matrix products over MPI: run, benchmark, model and report. "
               "Run under mpiexec -n P or srun (plan and report need no MPI job). "
               "Reference: docs/cli.md.")
# the command-line flag of each scheme option (tpmpi.studies.sweep.SCHEME_OPTIONS)
OPTION_FLAGS = {"panel": "--panel", "chunks": "--chunks", "mode": "--mode",
                "activation": "--activation", "overlap": "--no-overlap"}


EXIT_CHECK, EXIT_USAGE, EXIT_RUNTIME = 1, 2, 3


class UsageError(ValueError):
    """Bad command-line arguments: exit 2 with a one-line message."""


@contextlib.contextmanager
def usage() -> Iterator[None]:
    """The checks and the set-up the flags ask for (grid or mesh, BLAS threads, backend,
    problem, memory, calibration): a ValueError raised inside, agreed on every rank like every
    tpmpi error, is a usage error (exit 2); after it, the work's are runtime errors (exit 3)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help with "(required)" or the flag's default appended (lists as comma
    lists), unless the help already states it or there is none (None, switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.required and action.option_strings:
            return f"{text} (required)"
        if (not action.option_strings or default in (None, False, True, argparse.SUPPRESS)
                or "default" in text):
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse would print usage on every rank
        raise UsageError(f"{self.prog}: {message}")


_positive = int_flag(1, "a positive integer (digits only, e.g. 1024)")
_non_negative = int_flag(0, "an integer >= 0 (digits only, e.g. 1024)")


# flags that several subcommands take, declared once
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--threads": dict(type=_positive, default=None, metavar="T",
                      help="BLAS threads per rank (default: cores / ranks sharing them; env "
                           "TPMPI_THREADS)"),
    "--bucket-bytes": dict(type=_positive, default=BUCKET_BYTES, metavar="B",
                           help="data parallelism: gradient bucket size in bytes (default: "
                                "25 MiB)"),
}


def _size(text: str) -> int:
    """An argparse type for sizes with K/M/G suffixes (:func:`tpmpi.studies.sweep.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listed(conv: Callable[[str], Any], choices: Optional[Sequence[str]] = None
            ) -> Callable[[str], list]:
    """An argparse type for ``a,b,c`` whose items ``conv`` converts (and ``choices`` limits)."""
    def parse(text: str) -> list:
        items = [conv(v) for v in text.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma list" + (f" of {', '.join(choices)}" if choices
                                                      else ""))
        return items
    return parse


def _add_problem_flags(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The problem flags of ``run``; with ``many`` (``bench``), each takes a comma list."""
    def typed(conv: Callable[[str], Any], default: Any,
              choices: Optional[Sequence[str]] = None, metavar: Optional[str] = None
              ) -> dict[str, Any]:
        if many:  # a comma list; the metavar shows the choices argparse cannot check
            item = "{" + ",".join(choices) + "}" if choices else metavar
            return {"type": _listed(conv, choices), "metavar": item and f"{item}[,...]",
                    "default": None if default is None else [default]}
        return {"type": conv, "default": default, "choices": choices, "metavar": metavar}
    p.add_argument("--scheme", help="parallel scheme" + ("s ('all': every available one)"
                                                         if many else ""),
                   **typed(str, "column", KNOWN + ("all",) if many else KNOWN))
    p.add_argument("--m", help="rows of X (tokens)", **typed(_non_negative, 1024, None, "M"))
    p.add_argument("--k", help="in features", **typed(_non_negative, 1024, None, "K"))
    p.add_argument("--n", help="out features", **typed(_non_negative, 1024, None, "N"))
    p.add_argument("--hidden", help="MLP hidden size d_hidden (default: 4 times --k, e.g. "
                   "4096 for --k 1024)", **typed(_non_negative, None, None, "H"))
    p.add_argument("--grid", help="process grid RxC" + (
                   "; 'auto' = 1xP, the squarest grid for tile2d" if many else
                   " (default: 1xP)"), **typed(str, "auto" if many else None, None, "RxC"))
    p.add_argument("--dtype", help="element type",
                   **typed(str, "float32", SUPPORTED))
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="array library: auto = cupy when a CUDA device is usable (env "
                        "TPMPI_BACKEND overrides), else numpy")
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="untimed steps before timing")
    p.add_argument("--iters", type=_positive, default=10,
                   help="timed steps; times are the median (min-max) over them")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--panel", help="tile2d: K-panel width of the double-buffered broadcast "
                   "loop" + (" (0 = gather form)" if many else "") + " (default: the gather "
                   "form, no panel loop)", **typed(_non_negative if many else _positive, None,
                                                   None, "KB"))
    p.add_argument("--chunks", help="column: pipeline the output gather with the GEMM in this "
                   "many row chunks" + (" (0 = unset)" if many else "") + " (default: 1, no "
                   "pipelining)", **typed(_non_negative if many else _positive, None, None,
                                          "C"))
    p.add_argument("--mode", help="mlp: megatron (1 Allreduce each way), book (Allgather after "
                   "each GEMM), sequence (sequence parallelism: activations split by rows) or "
                   "tile2d (SUMMA FFN on --grid) (default: megatron)", **typed(str, None, MODES))
    p.add_argument("--dp", help="data-parallel replicas D: a mesh of D x (the --grid TP grid of "
                   "P/D ranks), each replica taking M/D rows, gradients averaged in backward" +
                   (" (comma list)" if many else "") + " (default: 1)",
                   **typed(_positive, 1, None, "D"))
    p.add_argument("--sequence-parallel", action="store_true",
                   help="mlp: Megatron sequence parallelism (= --mode sequence)")
    p.add_argument("--bucket-bytes", **SHARED_FLAGS["--bucket-bytes"])
    p.add_argument("--activation", help="mlp activation (default: gelu, the tanh approximation)",
                   **typed(str, None, tuple(ACTIVATIONS)))
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="backward collectives blocking after the dW GEMM (default: overlapped)")
    p.add_argument("--measure-overlap", action="store_true",
                   help="also time forward/backward as is, GEMMs only and collectives only: "
                        "record field 'overlap' (OSU overlap %%, seconds saved)")
    p.add_argument("--threads", **SHARED_FLAGS["--threads"])
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="cost-model calibration for predicted_s (default: env "
                        "TPMPI_CALIBRATION, else the model's defaults)")


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    _add_problem_flags(p, many=True)
    p.add_argument("--sweep", choices=SWEEPS, default="strong",
                   help="strong: fixed problem over P; weak: --dim scaled by P; sizes: -b/-e/-f")
    p.add_argument("-b", "--begin", type=_size, default=None, metavar="SIZE",
                   help="first size of --dim (or bytes with --collective); K/M/G suffixes "
                        "(default: no size sweep)")
    p.add_argument("-e", "--end", type=_size, default=None, metavar="SIZE",
                   help="last size (with -b) (default: no size sweep)")
    p.add_argument("-f", "--factor", type=float, default=2.0, help="size multiplication factor")
    p.add_argument("--dim", choices=("m", "k", "n", "hidden"), default="m",
                   help="the dimension -b/-e/-f sweep and weak scaling grows")
    p.add_argument("--ranks", type=_listed(_positive), default=None, metavar="P[,...]",
                   help="communicator sizes, run on the first P ranks of the job (default: "
                        "1,2,4,...,P for strong/weak, P for sizes)")
    p.add_argument("--collective", type=_listed(str, OPS), default=None,
                   metavar="{" + ",".join(OPS) + "}[,...]",
                   help="collective-only mode: time these collectives over -b/-e/-f bytes "
                        "(default: off, time the schemes)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the serial single-process baseline (speedup, efficiency)")
    p.add_argument("--json", metavar="FILE",
                   help="append one JSON line per configuration (default: no file)")


def make_parser() -> argparse.ArgumentParser:
    """The ``python -m tpmpi`` parser: one subcommand per job kind (docs/cli.md)."""
    parser = _Parser(prog="python -m tpmpi", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tpmpi {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_run, _add_bench, _add_calibrate, _add_plan, _add_report):
        add(sub)
    sub.add_parser("info", help="MPI library, backend, GPU-awareness, BLAS threads")
    return parser


def _add_run(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``run``: the problem flags, --check, --json, --baseline."""
    run = sub.add_parser("run", help="one timed, verified run; prints a table",
                         description="Time one scheme on all the job's ranks, verify it "
                                     "against a serial float64 reference, print a table.")
    _add_problem_flags(run)
    run.add_argument("--check", action="store_true",
                     help="exit 1 if the relative error exceeds the dtype's tolerance")
    run.add_argument("--json", metavar="FILE",
                     help="append the JSON-lines record to FILE (default: no file)")
    run.add_argument("--baseline", action="store_true",
                     help="also time one process using all the node's BLAS threads (speedup)")


def _add_bench(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``bench``: sweeps and the collective benchmark."""
    _add_bench_flags(sub.add_parser(
        "bench", help="scaling sweeps and collective benchmarks",
        description="Sweeps: every combination of the problem flags (each takes a comma list), "
                    "sizes -b/-e/-f of --dim, and --ranks; one JSON line per configuration. "
                    "With --collective: nccl-tests-style collective benchmark."))


def _add_calibrate(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``calibrate``: message sizes, dtypes, backend and threads to fit."""
    cal = sub.add_parser("calibrate", help="fit the cost model's alpha/beta/gamma",
                         description="Time the collectives over message sizes and "
                                     "communicator sizes 2, 4, ..., P and local GEMMs; write "
                                     "the fitted alpha/beta per collective and P and the GEMM "
                                     "rates. Run with the ranks and threads you will use.")
    cal.add_argument("--json", metavar="FILE", required=True, help="calibration file to write")
    cal.add_argument("--dtype", type=_listed(str, SUPPORTED), default=None,
                     metavar="{" + ",".join(SUPPORTED) + "}[,...]",
                     help="dtypes whose GEMM rates are measured (default float32,float64; on "
                          "a GPU every supported dtype)")
    cal.add_argument("-b", "--begin", type=_size, default="64", metavar="SIZE",
                     help="smallest message in bytes (K/M/G suffixes)")
    cal.add_argument("-e", "--end", type=_size, default="4M", metavar="SIZE",
                     help="largest message in bytes (K/M/G suffixes)")
    cal.add_argument("-f", "--factor", type=float, default=4.0,
                     help="message size multiplication factor")
    cal.add_argument("--iters", type=_positive, default=10,
                     help="calls timed per message size")
    cal.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="array library whose GEMM rates and buffers are measured")
    cal.add_argument("--threads", **SHARED_FLAGS["--threads"])


def _add_plan(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``plan``: one product's sizes, the ranks, dtype and calibration."""
    plan = sub.add_parser("plan", help="layouts ranked by predicted time (no MPI job needed)",
                          description="Rank the layouts of one product (or, with --hidden, "
                                      "the FFN modes) on every dp x tp mesh of P ranks by the "
                                      "cost model's predicted time, and say why the first "
                                      "wins.")
    for dim, what in (("m", "rows of X (tokens)"), ("k", "in features"), ("n", "out features")):
        plan.add_argument(f"--{dim}", type=_positive, required=True, help=what)
    plan.add_argument("--hidden", type=_positive, default=None,
                      help="rank FFN layouts (mlp modes) with this hidden size instead of "
                           "single-GEMM layouts (default: single-GEMM layouts)")
    plan.add_argument("--ranks", type=_positive, required=True,
                      help="number of ranks P (every dp x tp factorisation is ranked)")
    plan.add_argument("--bucket-bytes", **SHARED_FLAGS["--bucket-bytes"])
    plan.add_argument("--dtype", choices=SUPPORTED, default="float32", help="element type")
    plan.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                      help="whose GEMM rates to use")
    plan.add_argument("--backward", action="store_true", help="predict forward + backward")
    plan.add_argument("--calibration", metavar="FILE", default=None,
                      help="a calibrate file (default: env TPMPI_CALIBRATION, else the "
                           "model's defaults)")


def _add_report(sub: argparse._SubParsersAction[_Parser]) -> None:
    """``report``: the record files and the output directory."""
    report = sub.add_parser("report", help="PNG plots, report.md and report.csv from JSON-lines "
                                           "records")
    report.add_argument("files", nargs="+", metavar="FILE.jsonl",
                        help="records written by run/bench --json")
    report.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the PNGs, report.md and report.csv")


def _given_options(args: argparse.Namespace) -> dict:
    """The scheme options set on the command line: {option: value}."""
    options = {name: getattr(args, name) for name in ("panel", "chunks", "mode", "activation")
               if getattr(args, name) is not None}
    if not args.overlap:
        options["overlap"] = False
    return options


def check_options(args: argparse.Namespace, schemes: Sequence[str]) -> None:
    """UsageError naming the first option flag that no scheme of ``schemes`` takes."""
    for name, value in _given_options(args).items():
        takers = SCHEME_OPTIONS[name]
        if not set(schemes) & set(takers):
            shown = "" if value is False else " " + (
                ",".join(map(str, value)) if isinstance(value, list) else str(value))
            which = " or ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1
                                else takers)
            raise UsageError(f"{OPTION_FLAGS[name]}{shown}: applies to --scheme {which} only, "
                             f"not {','.join(schemes)}")


def sequence_mode(args: argparse.Namespace) -> None:
    """``--sequence-parallel`` as ``--mode sequence`` (a list for bench); UsageError when the
    scheme or mode has none."""
    if not args.sequence_parallel:
        return
    many = isinstance(args.scheme, list)
    schemes = args.scheme if many else [args.scheme]
    modes = (args.mode or []) if many else ([args.mode] if args.mode else [])
    if any(s != "mlp" for s in schemes):
        raise UsageError("--sequence-parallel: only --scheme mlp (the FFN) has a "
                         "sequence-parallel mode")
    if any(m != "sequence" for m in modes):
        raise UsageError(f"--sequence-parallel: is --mode sequence, not --mode {modes[0]}")
    args.mode = ["sequence"] if many else "sequence"


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The :class:`Problem` named by the problem flags."""
    sequence_mode(args)
    check_options(args, [args.scheme])
    options = _given_options(args)
    return Problem(scheme=args.scheme, m=args.m, k=args.k, n=args.n, hidden=args.hidden,
                   dtype=args.dtype, backward=args.backward,
                   options=tuple(sorted(options.items())))


def agree_problems(problems: Sequence[Problem], backend: Backend, comm: MPI.Comm) -> None:
    """UsageError on every rank for a problem the flags describe but this job cannot run: an
    mlp whose --n differs from --k, a dtype the backend lacks (also agrees
    ``TPMPI_MAX_MESSAGE_BYTES``). Collective."""
    def local_checks() -> None:
        for p in problems:
            if p.scheme == "mlp" and p.n != p.k:
                raise ValueError(f"--n {p.n}: scheme mlp maps d_model (--k {p.k}) to itself; "
                                 f"pass --n {p.k} (or leave --n and --k equal)")
            backend.check_dtype(resolve_dtype(p.dtype, argument="--dtype"))

    with usage():
        agree_checks(comm, local_checks)


def cmd_run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():
        problem = problem_from_args(args)
        shape = parse_shape(args.grid) if args.grid else None
        configure_blas_threads(comm, args.threads)
        mesh = Mesh(comm, dp=args.dp, tp=shape) if args.dp > 1 else None
        tp = mesh.tp if mesh is not None else ProcessGrid(comm, shape)
        grid = mesh if mesh is not None else tp
        replica = largest_replica(problem, args.dp)  # what one replica's TP group holds and runs
        backend = get_backend(args.backend, comm)
        agree_problems([problem], backend, comm)
        agree_fits([(replica, tp.shape)], backend, comm)
        cal = agree_calibration(args.calibration, comm)
    timing = {"warmup": args.warmup, "iters": args.iters, "baseline": args.baseline,
              "overlap": args.measure_overlap}
    rec = run_case(problem, grid, backend, calibration=cal, bucket_bytes=args.bucket_bytes,
                   progress=case_progress(replica, tp, backend, cal, **timing), **timing)
    ok = rec["max_rel_err"] is not None and rec["max_rel_err"] <= rec["tolerance"]
    if comm.Get_rank() == 0:
        print(format_table([rec]))
        print(f"check: max_rel_err={rec['max_rel_err']:.3e} tolerance={rec['tolerance']:.1e}"
              f" -> {'PASS' if ok else 'FAIL'}  (vs float64 reference)")
        base = (rec.get("spread") or {}).get("baseline_s")
        if base:
            print(f"serial baseline (1 process, {rec['baseline_threads']} threads): "
                  f"{base['median'] * 1e3:.3f} ms ({short(base['min'] * 1e3)}-"
                  f"{short(base['max'] * 1e3)}); speedup {rec['speedup']:.3f}, eff/core "
                  f"{rec['efficiency']:.3f}")
        if rec["flags"]:
            print(f"flags: {', '.join(rec['flags'])} (see docs/statistics.md)")
        if rec["mesh"]["dp"] > 1:
            print(f"data parallel: mesh {rec['mesh']['dp']}x({rec['grid']}), DP Allreduce "
                  f"{rec['dp_bytes'] / 2**20:.3f} MiB per iteration, "
                  f"{rec['dp_comm_s'] * 1e3:.3f} ms blocked in it")
        for phase, times in (rec.get("overlap") or {}).items():
            print(f"overlap {phase}: overall {times['overall_s'] * 1e3:.3f} ms, compute only "
                  f"{times['compute_s'] * 1e3:.3f} ms, communication only "
                  f"{times['comm_only_s'] * 1e3:.3f} ms -> overlap {times['overlap_pct']:.1f}%, "
                  f"saved {times['saved_s'] * 1e3:.3f} ms")
        if args.json:
            with open(args.json, "a") as fh:
                write_record(rec, fh)
    grid.free()
    return 0 if ok or not args.check else EXIT_CHECK


def cmd_info(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():  # TPMPI_THREADS / TPMPI_BACKEND
        threads = configure_blas_threads(comm)
        backend = get_backend("auto", comm)
    local = node_comm(comm)
    nodes = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    local.Free()
    import mpi4py
    import numpy

    vendor, version = MPI.get_vendor()
    facts = {
        "tpmpi": __version__, "mpi4py": mpi4py.__version__, "numpy": numpy.__version__,
        "mpi_library": mpi_library(), "mpi_vendor": f"{vendor} {'.'.join(map(str, version))}",
        "ranks": comm.Get_size(), "nodes": nodes, "backend(auto)": backend.name,
        "gpu_aware": backend.gpu_aware, "threads_per_rank": threads,
        "blas": blas_info(backend), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    if comm.Get_rank() == 0:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _out(comm: MPI.Comm) -> Callable[[str], None]:
    """print on rank 0 only."""
    return (lambda line: print(line, flush=True)) if comm.Get_rank() == 0 else \
        (lambda line: None)


def _appender(path: Optional[str], comm: MPI.Comm) -> Callable[[Mapping[str, Any]], None]:
    """Append records to ``path`` as JSON lines (rank 0; the file opened per record)."""
    def append(rec: Mapping[str, Any]) -> None:
        if path:
            with open(path, "a") as fh:
                write_record(rec, fh)
    return append if comm.Get_rank() == 0 else (lambda rec: None)


def bench_configs(args: argparse.Namespace, ranks: Sequence[int], sizes: Sequence[int]) -> list:
    """The sweep's configurations (:func:`tpmpi.studies.sweep.configs`) named by the flags;
    UsageError for flags that name none or that contradict each other. Local (the flags are
    agreed)."""
    if args.sweep == "sizes" and not sizes:
        raise UsageError("--sweep sizes needs -b/-e [-f]")
    if "all" in args.scheme:
        args.scheme = available()
    sequence_mode(args)
    check_options(args, args.scheme)
    dims = {d: getattr(args, d) or [None] for d in ("m", "k", "n", "hidden")}
    if args.dim == "hidden" and dims["hidden"] == [None] and not sizes:
        raise UsageError("--dim hidden needs --hidden or -b/-e")
    cfgs = configs(args.sweep, schemes=args.scheme, dims=dims, dim=args.dim, sizes=sizes,
                   ranks=ranks, grids=args.grid, dtypes=args.dtype, backward=args.backward,
                   dps=args.dp, options={
                       "panel": [v or None for v in args.panel or [0]],
                       "chunks": [v or None for v in args.chunks or [0]],
                       "mode": args.mode or [None], "activation": args.activation or [None],
                       "overlap": [None] if args.overlap else [False]})
    if not cfgs:
        raise UsageError(f"no configuration: none of --grid {','.join(args.grid)} has "
                         f"{','.join(map(str, ranks))} ranks")
    return cfgs


def cmd_bench(args: argparse.Namespace, comm: MPI.Comm) -> int:
    world = comm.Get_size()
    with usage():
        ranks = args.ranks or default_ranks("sizes" if args.collective else args.sweep, world)
        if max(ranks) > world:
            raise UsageError(f"--ranks {max(ranks)} exceeds the job's {world} ranks")
        if (args.begin is None) != (args.end is None):
            raise UsageError("-b and -e go together")
        sizes = sizes_sweep(args.begin, args.end, args.factor) if args.begin is not None else []
        backend = get_backend(args.backend, comm)
        if args.collective and not sizes:
            raise UsageError("--collective needs a size sweep: -b BYTES -e BYTES [-f F]")
        if args.collective and len(args.dtype) > 1:
            raise UsageError("--collective takes one --dtype")
    if args.collective:
        collective_sweep(comm, args.collective, sizes, ranks, args.dtype[0], backend,
                         warmup=args.warmup, iters=args.iters, on_record=_appender(args.json, comm),
                         out=_out(comm))
        return 0
    with usage():
        cfgs = bench_configs(args, ranks, sizes)
        agree_problems([c.problem for c in cfgs], backend, comm)
        agree_fits([(largest_replica(c.problem, c.dp), c.grid) for c in cfgs], backend, comm)
        calibration = agree_calibration(args.calibration, comm)
        threads = configure_blas_threads(comm, args.threads)
    records: list[Mapping[str, Any]] = []
    save = _appender(args.json, comm)

    def on_record(rec: Mapping[str, Any]) -> None:
        records.append(rec)
        save(rec)
    run_sweep(comm, cfgs, backend, threads=threads, warmup=args.warmup, iters=args.iters,
              baseline=args.baseline, calibration=calibration,
              on_record=on_record, measure_overlap=args.measure_overlap,
              bucket_bytes=args.bucket_bytes)
    _out(comm)(format_table(records))
    return 0


def cmd_calibrate(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():
        backend = get_backend(args.backend, comm)
        threads = configure_blas_threads(comm, args.threads)
        sizes = sizes_sweep(args.begin, args.end, args.factor)
    out = _out(comm)
    dtypes = args.dtype or (SUPPORTED if backend.is_gpu else ["float32", "float64"])
    cal = calibrate(comm, backend, dtypes=dtypes, sizes=sizes, threads=threads,
                    iters=args.iters, progress=lambda what: out(f"calibrating {what}"))
    if comm.Get_rank() == 0:
        with open(args.json, "w") as fh:
            json.dump(cal.to_json(), fh, indent=1)
        out(f"wrote {args.json}")
    return 0


def calibration_warning(cal: Calibration, backend: str, ranks: int, source: Optional[str]
                        ) -> Optional[str]:
    """What plan says on stderr about its calibration: a note when it uses the model's defaults;
    a warning when the calibration measured another backend than ``--backend`` (its GEMM
    rates would be the defaults) or fitted no collective while ``ranks`` > 1. Communicator
    sizes without a fit are no mismatch: the nearest fitted size's alpha and beta are used with
    the ring formulas' P factors, which is the model (docs/cli.md, plan)."""
    facts = calibration_facts(cal)
    name = source or "(TPMPI_CALIBRATION)"
    if facts["source"] == "defaults":
        return ("tpmpi: note: predictions use the cost model's defaults (uncalibrated); run "
                "calibrate on the machine you plan for")
    if facts["backend"] not in (None, backend):
        return (f"tpmpi: warning: calibration {name} measured the {facts['backend']} backend: "
                f"the {backend} GEMM rates are the model's defaults")
    if ranks > 1 and not facts["fitted"]:
        return (f"tpmpi: warning: calibration {name} fitted no collective (calibrate ran on "
                f"{facts['ranks']} rank(s)): the collectives use the model's defaults")
    return None


def cmd_plan(args: argparse.Namespace, comm: MPI.Comm) -> int:
    cal = agree_calibration(args.calibration, comm)
    with usage():  # plan computes from the flags (and the calibration file) alone
        preds = plan(args.m, args.k, args.n, args.ranks, hidden=args.hidden, dtype=args.dtype,
                     backward=args.backward, backend=args.backend, calibration=cal,
                     bucket_bytes=args.bucket_bytes)
    warning = calibration_warning(cal, args.backend, args.ranks, args.calibration)
    if warning and comm.Get_rank() == 0:
        sys.stderr.write(warning + "\n")
    _out(comm)(format_plan(preds))
    _out(comm)(explain(preds))
    return 0


def cmd_report(args: argparse.Namespace, comm: MPI.Comm) -> int:
    """Rank 0 writes the report; a file it cannot open (an input missing, --out not writable)
    is a usage error, records it cannot use a runtime error, on every rank."""
    error = None
    if comm.Get_rank() == 0:
        from .studies.report import report

        try:
            print(f"wrote {report(args.files, args.out)}")
        except OSError as exc:
            error = (True, str(exc))
        except ValueError as exc:
            error = (False, str(exc))
    error = comm.bcast(error, root=0)
    if error:
        raise (UsageError if error[0] else ValueError)(error[1])
    return 0


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "calibrate": cmd_calibrate, "plan": cmd_plan,
            "report": cmd_report, "info": cmd_info}


def agree_args(argv: Optional[Sequence[str]], comm: MPI.Comm
               ) -> argparse.Namespace | tuple[int, str]:
    """Parse ``argv`` on every rank and agree on the outcome before anything else: the same
    sub-command and flags everywhere (else UsageError on every rank). ``--help``/``--version``
    give ``(exit code, text)`` (to be printed by rank 0 only), and must be asked for on every
    rank. Collective (three small agreements)."""
    error, text = None, io.StringIO()
    args: Union[argparse.Namespace, tuple[int, str], None] = None
    try:
        with contextlib.redirect_stdout(text):
            args = make_parser().parse_args(argv)
    except UsageError as exc:
        error = str(exc)
    except SystemExit as exc:  # --help / --version, printed into ``text``
        args = (int(exc.code or 0), text.getvalue())
    asked = Text("asked for" if isinstance(args, tuple) else "not asked for")
    agree(comm, error, **{"--help/--version": Same(asked, "every rank must be given the same "
                                                          "command line")})
    if isinstance(args, tuple):
        return args
    assert args is not None  # else agree raised
    agree(comm, command=args.command)  # same sub-command, hence the same set of flags
    agree(comm, **{f"--{name}": value for name, value in sorted(vars(args).items())})
    return args


def agree_output_file(path: Optional[str], comm: MPI.Comm, flag: str = "--json") -> None:
    """UsageError on every rank unless rank 0 can write ``path`` (its directory exists and is
    writable; an existing file is writable), before any work is done. Collective."""
    error = None
    if path and comm.Get_rank() == 0:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            error = f"{flag} {path}: directory {folder} does not exist"
        elif os.path.isdir(path):
            error = f"{flag} {path}: is a directory, expected a file"
        elif not os.access(path if os.path.exists(path) else folder, os.W_OK):
            error = f"{flag} {path}: not writable"
    try:
        agree(comm, error)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def agree_calibration(path: Optional[str], comm: MPI.Comm) -> Calibration:
    """:func:`load_calibration` of ``path`` (else env TPMPI_CALIBRATION) on every rank; a file
    one rank cannot read fails on every rank, naming the flag or the variable. Collective."""
    error, calibration = None, None
    try:
        calibration = load_calibration(path)
    except ValueError as exc:
        error = f"--calibration: {exc}" if path else f"TPMPI_CALIBRATION: {exc}"
    try:
        agree(comm, error)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    assert calibration is not None  # else agree raised
    return calibration


def agree_fits(runs: Sequence[tuple[Problem, tuple[int, int]]], backend: Backend,
               comm: MPI.Comm) -> None:
    """UsageError on every rank when one of ``runs`` (a problem on a grid shape) needs more
    memory than this node (or this rank's GPU) has: a lower bound per rank from the layouts
    (:mod:`tpmpi.studies.footprint`) times the ranks of the run on this node. Before any allocation;
    collective."""
    local = node_comm(comm)
    sharing = local.Get_size()
    local.Free()
    if backend.is_gpu:
        free, where = backend.xp.cuda.runtime.memGetInfo()[0], "free on this rank's GPU"
    else:
        free, where = footprint.host_available(), "available on this node"
    error = None
    for p, shape in runs:
        per_rank = footprint.bytes_per_rank(p, shape)
        ranks = 1 if backend.is_gpu else min(sharing, shape[0] * shape[1])
        if per_rank is None or free is None or per_rank * ranks <= free:
            continue
        error = (f"--m {p.m} --k {p.k} --n {p.n}{f' --hidden {p.hidden}' if p.hidden else ''} "
                 f"--dtype {p.dtype} ({p.scheme} on {shape[0]}x{shape[1]}"
                 f"{', backward' if p.backward else ''}) needs at least {per_rank} bytes "
                 f"({footprint.gib(per_rank)}) per rank for its arrays, "
                 f"{footprint.gib(per_rank * ranks)} for its {ranks} rank(s) on this node; "
                 f"{footprint.gib(free)} {where}")
        break
    try:
        agree(comm, error)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> int:
    """Entry point; returns the exit code (the same on every rank; see the module docstring)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    try:
        with usage():
            args = agree_args(argv, comm)
        if isinstance(args, tuple):  # --help / --version on every rank
            if comm.Get_rank() == 0:
                sys.stdout.write(args[1])
            return args[0]
        if args.command in ("run", "bench", "calibrate"):
            agree_output_file(args.json, comm)
        return COMMANDS[args.command](args, comm)
    except ValueError as exc:  # agreed: raised on every rank together
        if comm.Get_rank() == 0:
            sys.stderr.write(f"tpmpi: error: {str(exc).splitlines()[0]}\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_RUNTIME


def _abort(comm: MPI.Comm, line: str, code: int) -> NoReturn:
    """Print ``line`` (on a line of its own, after a progress bar too; nothing when empty) and
    end the whole MPI job (this rank exits even if MPI_Abort returns)."""
    if line:
        sys.stderr.write("\n" + line + "\n")
        sys.stderr.flush()
    try:
        comm.Abort(code)
    finally:
        os._exit(code)


def watch_signals(comm: MPI.Comm, delay: float = 2.0) -> None:
    """SIGINT and SIGTERM end the whole job with one line: a watcher thread wakes on the
    signal (through :func:`signal.set_wakeup_fd`, so even while the main thread waits inside an
    MPI call) and calls ``MPI_Abort``.

    Launchers forward a Ctrl-C or ``scancel`` to every rank, and Open MPI's abort SIGTERMs the
    other ranks (SIGKILL 1 s later), so that one rank alone prints: rank 0 acts at once on
    SIGINT and after ``delay`` seconds on SIGTERM, the other ranks after ``1.5 * delay``; a
    rank that the abort of another ends meanwhile prints nothing. Inside a SLURM job every
    task gets the signal together (scancel, a time limit, srun's Ctrl-C), and under ``srun``
    the abort of rank 0 does not end the others: there they abort without a line."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)  # the watcher acts; no KeyboardInterrupt
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    rank = comm.Get_rank()
    quiet = rank != 0 and "SLURM_JOB_ID" in os.environ

    def watch() -> None:
        number = os.read(read_fd, 1)[0]
        time.sleep(1.5 * delay if rank else 0.0 if number == signal.SIGINT else delay)
        name = signal.Signals(number).name
        _abort(comm, "" if quiet else
               f"tpmpi: interrupted by {name} (rank {rank}): aborting the MPI job", 128 + number)

    threading.Thread(target=watch, daemon=True, name="tpmpi-signals").start()


def run() -> None:
    """Console entry: exit with main()'s code; any interruption or crash aborts the whole job
    (never a rank left waiting in a collective)."""
    comm = MPI.COMM_WORLD
    try:
        watch_signals(comm)
        code = main()
    except KeyboardInterrupt:  # a SIGINT before the watcher was installed
        _abort(comm, f"tpmpi: interrupted (rank {comm.Get_rank()}): aborting the MPI job", 130)
    except BaseException:  # noqa: BLE001 - any crash must end the whole MPI job, not hang it
        traceback.print_exc()
        sys.stderr.flush()
        _abort(comm, f"tpmpi: rank {comm.Get_rank()} crashed (traceback above): aborting the "
               "MPI job", 1)
    sys.exit(code)
