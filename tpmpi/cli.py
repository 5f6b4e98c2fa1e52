"""Command line: ``python -m tpmpi {run,info}`` under ``mpiexec -n P`` or ``srun``.

Exit codes: 0 success; 1 ``--check`` failed (error above the dtype's tolerance); 2 usage error
(one line on rank 0, raised on every rank together). An unexpected exception prints its
traceback and aborts the whole job (``MPI_Abort``), so no rank is left hanging.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

from mpi4py import MPI

from . import __version__
from .backend import BACKENDS, blas_info, get_backend, node_comm
from .bench import format_table, mpi_library, run_case, write_record
from .comm import agree
from .dtypes import SUPPORTED, tolerance
from .grid import ProcessGrid, parse_shape
from .schemes import KNOWN, Problem


class UsageError(Exception):
    """Bad command-line arguments: exit 2 with a one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage on every rank
        raise UsageError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def _add_problem_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=KNOWN, default="column", help="parallel scheme")
    p.add_argument("--m", type=_non_negative, default=1024, help="rows of X (tokens)")
    p.add_argument("--k", type=_non_negative, default=1024, help="in features")
    p.add_argument("--n", type=_non_negative, default=1024, help="out features")
    p.add_argument("--hidden", type=_non_negative, default=None, help="MLP hidden size")
    p.add_argument("--grid", default=None, help="process grid RxC (default 1xP)")
    p.add_argument("--dtype", choices=SUPPORTED, default="float32")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--warmup", type=_non_negative, default=2)
    p.add_argument("--iters", type=_positive, default=10)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--panel", type=_positive, default=None, help="tile2d K-panel width")
    p.add_argument("--chunks", type=_positive, default=None, help="column: M chunks pipelined")
    p.add_argument("--threads", type=_positive, default=None,
                   help="BLAS threads per rank (default: cores / ranks sharing them; env "
                        "TPMPI_THREADS)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tpmpi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tpmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="one timed, verified run; prints a table")
    _add_problem_flags(run)
    run.add_argument("--check", action="store_true",
                     help="exit 1 if the relative error exceeds the dtype's tolerance")
    run.add_argument("--json", metavar="FILE", help="append the JSON-lines record to FILE")
    run.add_argument("--baseline", action="store_true",
                     help="also time one process using all the node's BLAS threads (speedup)")
    sub.add_parser("info", help="MPI library, backend, GPU-awareness, BLAS threads")
    return parser


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The :class:`Problem` named by the problem flags."""
    options = {name: getattr(args, name) for name in ("panel", "chunks")
               if getattr(args, name) is not None}
    return Problem(scheme=args.scheme, m=args.m, k=args.k, n=args.n, hidden=args.hidden,
                   dtype=args.dtype, backward=args.backward,
                   options=tuple(sorted(options.items())))


def cmd_run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    shape = parse_shape(args.grid) if args.grid else None
    grid = ProcessGrid(comm, shape, blas_threads=args.threads if args.threads else "auto")
    backend = get_backend(args.backend, comm)
    rec = run_case(problem_from_args(args), grid, backend, warmup=args.warmup, iters=args.iters,
                   baseline=args.baseline)
    ok = rec["max_rel_err"] is not None and rec["max_rel_err"] <= tolerance(args.dtype)
    if comm.Get_rank() == 0:
        print(format_table([rec]))
        print(f"check: max_rel_err={rec['max_rel_err']:.3e} tolerance={tolerance(args.dtype):.0e}"
              f" -> {'PASS' if ok else 'FAIL'}  (vs float64 reference)")
        if rec["baseline_s"]:
            print(f"serial baseline (1 process, all threads): {rec['baseline_s'] * 1e3:.3f} ms; "
                  f"throughput ratio {rec['speedup']:.3f}, efficiency {rec['efficiency']:.3f}")
        if args.json:
            with open(args.json, "a") as fh:
                write_record(rec, fh)
    grid.free()
    return 0 if ok or not args.check else 1


def cmd_info(args: argparse.Namespace, comm: MPI.Comm) -> int:
    grid = ProcessGrid(comm)
    backend = get_backend("auto", comm)
    local = node_comm(comm)
    nodes = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    local.Free()
    import mpi4py
    import numpy

    facts = {
        "tpmpi": __version__, "mpi4py": mpi4py.__version__, "numpy": numpy.__version__,
        "mpi_library": mpi_library(), "mpi_vendor": "%s %s" % (MPI.get_vendor()[0],
                                                              ".".join(map(str, MPI.get_vendor()[1]))),
        "ranks": comm.Get_size(), "nodes": nodes, "backend(auto)": backend.name,
        "gpu_aware": backend.gpu_aware, "threads_per_rank": grid.threads,
        "blas": blas_info(backend), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    if comm.Get_rank() == 0:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key.ljust(width)}  {value}")
    grid.free()
    return 0


COMMANDS = {"run": cmd_run, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> int:
    """Entry point; returns the exit code (the same on every rank)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    try:
        error, args = None, None
        try:
            args = make_parser().parse_args(argv)
        except UsageError as exc:
            error = str(exc)
        except SystemExit as exc:  # --help / --version printed by every rank
            return int(exc.code or 0)
        agree(comm, error)
        agree(comm, command=args.command)  # same sub-command, hence the same set of flags
        agree(comm, **{f"--{name}": value for name, value in sorted(vars(args).items())})
        return COMMANDS[args.command](args, comm)
    except (UsageError, ValueError) as exc:
        if comm.Get_rank() == 0:
            sys.stderr.write(f"tpmpi: error: {str(exc).splitlines()[0]}\n")
        return 2


def run() -> None:
    """Console entry: exit with main()'s code; abort the job on an unexpected exception."""
    try:
        code = main()
    except Exception:  # noqa: BLE001 - any crash must end the whole MPI job, not hang it
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
        raise
    sys.exit(code)
