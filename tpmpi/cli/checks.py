"""What the flags mean and whether this job can run them, decided on every rank together
before the work: scheme options that no named scheme takes, ``--sequence-parallel`` as a mode,
the problems and sweep configurations the flags name, dtypes the backend lacks, an output file
rank 0 cannot write, a calibration one rank cannot read. Every failure is a
:class:`~tpmpi.core.launch.UsageError` on every rank (exit 2)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Optional

from mpi4py import MPI

from ..core.agreement import agree_checks
from ..core.backend import Backend
from ..core.dtypes import resolve_dtype
from ..core.launch import UsageError, agree_usage, usage
from ..studies.clusterplan import load_target
from ..studies.costmodel import Calibration, load_calibration
from ..studies.machine import Target
from ..studies.problem import TRANSFORMER
from ..studies.schemes import Problem, available
from ..studies.sweep import SCHEME_OPTIONS, configs
from ..studies.transformer import check_shape

# the command-line flag of each scheme option (tpmpi.studies.sweep.SCHEME_OPTIONS)
OPTION_FLAGS = {"panel": "--panel", "chunks": "--chunks", "mode": "--mode",
                "activation": "--activation", "overlap": "--no-overlap",
                "sequence_parallel": "--sequence-parallel"}
MODEL_FLAGS = ("heads", "kv_heads", "seq", "vocab", "layers")  # the transformer schemes' shape


def _given_options(args: argparse.Namespace) -> dict:
    """The scheme options set on the command line: {option: value}."""
    options = {name: getattr(args, name) for name in ("panel", "chunks", "mode", "activation")
               if getattr(args, name) is not None}
    if not args.overlap:
        options["overlap"] = False
    schemes = args.scheme if isinstance(args.scheme, list) else [args.scheme]
    if args.sequence_parallel and set(schemes) & set(TRANSFORMER):
        options["sequence_parallel"] = True
    return options


def model_shape(args: argparse.Namespace) -> dict:
    """The transformer schemes' shape flags: {heads, kv_heads, seq, vocab, layers}."""
    return {name: getattr(args, name) for name in MODEL_FLAGS}


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
    """``--sequence-parallel`` as ``--mode sequence`` for mlp (a list for bench), as option
    ``sequence_parallel`` of the transformer schemes; UsageError when the scheme or mode has
    none."""
    if not args.sequence_parallel:
        return
    many = isinstance(args.scheme, list)
    schemes = args.scheme if many else [args.scheme]
    modes = (args.mode or []) if many else ([args.mode] if args.mode else [])
    if any(s != "mlp" and s not in TRANSFORMER for s in schemes):
        raise UsageError("--sequence-parallel: only --scheme mlp (the FFN) and the "
                         f"transformer schemes {', '.join(TRANSFORMER)} have a "
                         "sequence-parallel mode")
    if "mlp" not in schemes:
        return
    if any(m != "sequence" for m in modes):
        raise UsageError(f"--sequence-parallel: is --mode sequence, not --mode {modes[0]}")
    args.mode = ["sequence"] if many else "sequence"


def problem_from_args(args: argparse.Namespace) -> Problem:
    """The :class:`Problem` named by the problem flags."""
    sequence_mode(args)
    check_options(args, [args.scheme])
    options = _given_options(args)
    model = model_shape(args) if args.scheme in TRANSFORMER else {}
    return Problem(scheme=args.scheme, m=args.m, k=args.k,
                   n=args.k if args.scheme in TRANSFORMER else args.n, hidden=args.hidden,
                   dtype=args.dtype, backward=args.backward,
                   options=tuple(sorted(options.items())), **model)


def agree_problems(problems: Sequence[Problem], backend: Backend, comm: MPI.Comm,
                   dps: Optional[Sequence[int]] = None) -> None:
    """UsageError on every rank for a problem the flags describe but this job cannot run: an
    mlp whose --n differs from --k, a transformer whose --m is not whole sequences of --seq
    (``dps``: each problem's replicas, which take whole sequences) or whose heads do not fit
    --k, a dtype the backend lacks (also agrees ``TPMPI_MAX_MESSAGE_BYTES``). Collective."""
    def local_checks() -> None:
        for p, dp in zip(problems, dps or [1] * len(problems)):
            if p.scheme == "mlp" and p.n != p.k:
                raise ValueError(f"--n {p.n}: scheme mlp maps d_model (--k {p.k}) to itself; "
                                 f"pass --n {p.k} (or leave --n and --k equal)")
            if p.scheme in TRANSFORMER:
                check_shape(p, dp)
            backend.check_dtype(resolve_dtype(p.dtype, argument="--dtype"))

    with usage():
        agree_checks(comm, local_checks)


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
                       "overlap": [None] if args.overlap else [False],
                       "sequence_parallel": [True if args.sequence_parallel else None]},
                   model=model_shape(args))
    if not cfgs:
        raise UsageError(f"no configuration: none of --grid {','.join(args.grid)} has "
                         f"{','.join(map(str, ranks))} ranks")
    return cfgs


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
    agree_usage(comm, error)


def agree_calibration(path: Optional[str], comm: MPI.Comm) -> Calibration:
    """:func:`load_calibration` of ``path`` (else env TPMPI_CALIBRATION) on every rank; a file
    one rank cannot read fails on every rank, naming the flag or the variable. Collective."""
    error, calibration = None, None
    try:
        calibration = load_calibration(path)
    except ValueError as exc:
        error = f"--calibration: {exc}" if path else f"TPMPI_CALIBRATION: {exc}"
    agree_usage(comm, error)
    assert calibration is not None  # else agree raised
    return calibration


LAYER_PLAN = {"m": "--m", "k": "--k", "n": "--n", "ranks": "--ranks"}
"""The flags plan needs without --cluster."""
CLUSTER_PLAN = {"model": "--model", "micro_batch": "--micro-batch",
                "global_batch": "--global-batch", "tp": "--tp", "dp": "--dp"}
"""The flags plan needs with --cluster."""
LAYER_ONLY = {**LAYER_PLAN, "hidden": "--hidden", "calibration": "--calibration",
              "backward": "--backward", "scheme": "--scheme"}
CLUSTER_ONLY = {**CLUSTER_PLAN, "gpus": "--gpus", "sequence_parallel": "--sequence-parallel",
                "json": "--json"}


def check_plan_flags(args: argparse.Namespace) -> None:
    """plan's two forms: one product's layouts (``--m --k --n --ranks``) or, with ``--cluster``,
    a GPT training step (``--model --micro-batch --global-batch --tp --dp``); a flag of the
    other form, or a missing one, is a ValueError naming it."""
    cluster = args.cluster is not None
    needed, foreign = (CLUSTER_PLAN, LAYER_ONLY) if cluster else (LAYER_PLAN, CLUSTER_ONLY)
    form = "plan --cluster" if cluster else "plan without --cluster"
    for attr, flag in foreign.items():
        if getattr(args, attr) not in (None, False):
            raise ValueError(f"{form}: {flag} belongs to the other form of plan "
                             f"({'without' if cluster else 'with'} --cluster)")
    if not cluster and args.scheme is not None:  # a transformer: d is --k, no --n
        if args.n is not None:
            raise ValueError(f"plan --scheme {args.scheme}: --n belongs to the single-GEMM and "
                             "FFN layouts (the transformer's width is --k)")
        needed = {a: f for a, f in needed.items() if a != "n"}
    missing = [flag for attr, flag in needed.items() if getattr(args, attr) is None]
    if missing:
        raise ValueError(f"{form}: {', '.join(missing)} required")


def agree_target(name: str, comm: MPI.Comm) -> Target:
    """:func:`~tpmpi.studies.clusterplan.load_target` of ``--cluster`` on every rank; a preset
    one rank cannot read fails on every rank, naming the flag. Collective."""
    error, target = None, None
    try:
        target = load_target(name)
    except ValueError as exc:
        error = f"--cluster: {exc}"
    agree_usage(comm, error)
    assert target is not None  # else agree raised
    return target
