"""How an MPI program of tpmpi starts and ends on every rank together: ``python -m tpmpi``,
``python -m tpmpi.studies.vsbare`` and the scripts of ``scripts/``.

Exit codes (the same on every rank; the line on rank 0's stderr):

* 0 success (1: a program's own check failed, e.g. ``run --check``);
* 2 usage error (:class:`UsageError`): bad or inconsistent arguments or settings, found before
  the work starts, one line ``PROG: error: ...``;
* 3 runtime error: the work itself failed with an error tpmpi reports on every rank together
  (a ValueError, :mod:`tpmpi.core.agreement`), one line ``PROG: error: ...``.

The arguments are parsed on every rank and agreed before anything else (:func:`parse_args`):
argparse's own usage message would print on every rank, :class:`Parser` raises instead, and
``--help``/``--version`` print once. An unexpected exception prints its traceback and aborts the
whole job (``MPI_Abort``), so no rank is left hanging; an interruption (SIGINT/Ctrl-C, SIGTERM
from ``scancel`` or a time limit) prints one line and aborts the job at once (``MPI_Abort`` with
128 + the signal number), even while this rank waits inside MPI (:func:`watch_signals`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NoReturn, Optional, Union

from mpi4py import MPI

from .agreement import Same, Text, agree

EXIT_CHECK, EXIT_USAGE, EXIT_RUNTIME = 1, 2, 3


class UsageError(ValueError):
    """Bad arguments or settings, found before the work: exit 2 with a one-line message."""


@contextlib.contextmanager
def usage() -> Iterator[None]:
    """The checks and the set-up the arguments ask for: a ValueError raised inside (agreed on
    every rank like every tpmpi error) is a usage error (exit 2); after it, the work's errors
    are runtime errors (exit 3)."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def agree_usage(comm: MPI.Comm, error: Optional[str] = None, **values: Any) -> None:
    """:func:`~tpmpi.core.agreement.agree` whose failure is a :class:`UsageError` on every
    rank. Collective."""
    with usage():
        agree(comm, error, **values)


class HelpFormatter(argparse.HelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (argparse would print its
    usage and exit on every rank; :func:`parse_args` agrees on the error instead)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
               comm: MPI.Comm) -> argparse.Namespace:
    """``parser.parse_args(argv)`` on every rank, agreed before anything else: the same
    sub-command and arguments everywhere (else :class:`UsageError` on every rank). ``--help``
    and ``--version`` (which must be asked for on every rank) print on rank 0 only, then raise
    ``SystemExit`` on every rank. Collective (three small agreements)."""
    error, text = None, io.StringIO()
    args: Union[argparse.Namespace, int, None] = None
    try:
        with contextlib.redirect_stdout(text):
            args = parser.parse_args(argv)
    except UsageError as exc:
        error = str(exc)
    except SystemExit as exc:  # --help / --version, printed into ``text``
        args = int(exc.code or 0)
    asked = Text("asked for" if isinstance(args, int) else "not asked for")
    agree_usage(comm, error, **{"--help/--version": Same(asked, "every rank must be given the "
                                                                "same command line")})
    if isinstance(args, int):
        if comm.Get_rank() == 0:
            sys.stdout.write(text.getvalue())
        raise SystemExit(args)
    assert args is not None  # else agree raised
    agree_usage(comm, command=getattr(args, "command", None))  # hence the same set of flags
    agree_usage(comm, **{f"--{name}": value for name, value in sorted(vars(args).items())})
    return args


def exit_code(work: Callable[[], Optional[int]], comm: MPI.Comm, prog: str) -> int:
    """``work()``'s exit code (None: 0); an agreed ValueError (raised on every rank together)
    prints one line on rank 0 and gives 2 (:class:`UsageError`) or 3; ``--help`` and
    ``--version`` (:func:`parse_args`) give their own."""
    try:
        return work() or 0
    except SystemExit as exc:
        return int(exc.code or 0)
    except ValueError as exc:
        if comm.Get_rank() == 0:  # a parser named ``prog`` already names it: not twice
            text = str(exc).splitlines()[0].removeprefix(f"{prog}: ")
            sys.stderr.write(f"{prog}: error: {text}\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_RUNTIME


def _abort(comm: MPI.Comm, line: str, code: int) -> NoReturn:
    """Print ``line`` (on a line of its own, after a progress bar too; nothing when empty) and
    end the whole MPI job (this rank exits even if MPI_Abort returns)."""
    if line:
        sys.stderr.write("\n" + line + "\n")
        sys.stderr.flush()
        time.sleep(0.2)  # the launcher's I/O forwarding reads the line before the abort ends it
    try:
        comm.Abort(code)
    finally:
        os._exit(code)


def watch_signals(comm: MPI.Comm, prog: str, delay: float = 2.0) -> None:
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
               f"{prog}: interrupted by {name} (rank {rank}): aborting the MPI job", 128 + number)

    threading.Thread(target=watch, daemon=True, name="tpmpi-signals").start()


def run(main: Callable[[], Optional[int]], prog: str) -> NoReturn:
    """The entry of an MPI program called ``prog``: exit with :func:`exit_code` of ``main()``
    (the same on every rank); any interruption or crash aborts the whole job (never a rank left
    waiting in a collective)."""
    comm = MPI.COMM_WORLD
    try:
        watch_signals(comm, prog)
        code = exit_code(main, comm, prog)
    except KeyboardInterrupt:  # a SIGINT before the watcher was installed
        _abort(comm, f"{prog}: interrupted (rank {comm.Get_rank()}): aborting the MPI job", 130)
    except BaseException:  # noqa: BLE001 - any crash must end the whole MPI job, not hang it
        traceback.print_exc()
        sys.stderr.flush()
        _abort(comm, f"{prog}: rank {comm.Get_rank()} crashed (traceback above): aborting the "
               "MPI job", 1)
    sys.exit(code)
