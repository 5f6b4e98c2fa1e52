"""Command line: ``python -m tpmpi {run,bench,calibrate,plan,report,info}`` under ``mpiexec -n P``
or ``srun`` (``plan`` and ``report`` need no MPI job). Reference: docs/cli.md.

Exit codes (the same on every rank; the line on rank 0's stderr), as for every MPI program of
tpmpi (:mod:`tpmpi.core.launch`):

* 0 success;
* 1 ``run --check`` failed (error above the dtype's tolerance);
* 2 usage error: bad or inconsistent flags (or environment settings such as ``TPMPI_THREADS``),
  a grid or mesh that does not factor the ranks, a backend or dtype this machine lacks, a
  problem that cannot fit in memory, a ``--json`` file that cannot be written, a missing input
  file: found before the work starts, one line ``tpmpi: error: ...``;
* 3 runtime error: the work itself failed with an error tpmpi reports on every rank together
  (e.g. records that do not parse, an agreement failing mid-run, a failed verification), one
  line ``tpmpi: error: ...``.

An unexpected exception prints its traceback and aborts the whole job (``MPI_Abort``), so no
rank is left hanging; an interruption (SIGINT/Ctrl-C, SIGTERM from ``scancel`` or a time limit)
prints one line and aborts the job at once.

Modules: :mod:`~tpmpi.cli.parser` (the flags), :mod:`~tpmpi.cli.checks` (what they mean, agreed),
:mod:`~tpmpi.cli.fit` (the memory-fit policy), :mod:`~tpmpi.cli.commands` (the subcommands),
:mod:`~tpmpi.cli.printing` (what rank 0 prints).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Callable, NoReturn, Optional

from mpi4py import MPI

from ..core import launch
from .checks import agree_output_file
from .commands import cmd_bench, cmd_calibrate, cmd_info, cmd_plan, cmd_report, cmd_run
from .parser import make_parser

__all__ = ["COMMANDS", "main", "make_parser", "run"]

COMMANDS: dict[str, Callable[[argparse.Namespace, MPI.Comm], int]] = {
    "run": cmd_run, "bench": cmd_bench, "calibrate": cmd_calibrate, "plan": cmd_plan,
    "report": cmd_report, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> int:
    """Entry point; returns the exit code (the same on every rank; see the module docstring)."""
    comm = comm if comm is not None else MPI.COMM_WORLD

    def work() -> int:
        args = launch.parse_args(make_parser(), argv, comm)
        if args.command in ("run", "bench", "calibrate"):
            agree_output_file(args.json, comm)
        return COMMANDS[args.command](args, comm)

    return launch.exit_code(work, comm, "tpmpi")


def run() -> NoReturn:
    """Console entry (``tpmpi``, ``python -m tpmpi``): :func:`tpmpi.core.launch.run` of
    :func:`main`."""
    launch.run(main, "tpmpi")
