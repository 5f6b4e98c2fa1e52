"""Train a tensor x data parallel MLP on a synthetic regression task, next to a serial reference.

Run: ``mpiexec -n P python scripts/train_mlp.py [--dp D] [--tp T | --tp RxC]
[--sequence-parallel] [options]`` (see ``--help``). The P ranks form a :class:`tpmpi.Mesh` of D
data-parallel replicas of a TP group (default D=1, T=P/D). Each replica trains on its block of
the rows of the data set (full-batch steps); every rank holds only its shards of the
ParallelMLP (weights, gradients, optimizer state), gradients are averaged over the replicas by
:class:`tpmpi.DataParallel` during backward, and the optimizer is purely local.

The TP group: ``--tp T`` runs the 1D Megatron FFN (``--mode megatron`` or ``book``; with
``--sequence-parallel`` mode "sequence": activations outside the GEMMs split by rows);
``--tp RxC`` runs the 2D tile FFN (mode "tile2d": both GEMMs SUMMA on an R x C grid, x and y
in tiles). Sequence parallelism is a 1D-TP feature: the tile FFN already splits rows over its
grid rows.

Rank 0 also trains the same model serially in float64 NumPy on all rows (not counted in the
budget) and prints both loss curves side by side, then the per-rank bytes of weights,
gradients, optimizer state and activations and the time blocked in DP communication.

Checkpoints: ``--save DIR`` writes the model, the optimizer's state (Adam's moments, sharded
like the parameters) and the step reached (:func:`tpmpi.save_checkpoint` with ``state=`` and
``meta=``; every rank calls it, replica 0 writes); ``--resume DIR`` loads them into the model
built for this run, on any dp x tp mesh (re-sharded), and continues the loss curve from that
step (the serial reference replays the steps it missed).
``main(argv, comm)`` is importable (tests call it on sub-communicators) and returns the curves.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
from mpi4py import MPI

import tpmpi
from tpmpi.checkpoint.load import resume_training
from tpmpi.layers.activations import ACTIVATIONS, get_activation
from tpmpi.core import launch
from tpmpi.core.args import int_flag
from tpmpi.core.agreement import agree_checks
from tpmpi.core.launch import Parser, parse_args, usage
from tpmpi.studies.overlap import measure_dp_overlap
from tpmpi.core.dtypes import SUPPORTED, tolerance
from tpmpi.core.grid import factorisations
from tpmpi.core.profiler import Profiler
from tpmpi.layers.mlp import MODES
from tpmpi.layers.module import attach_tap
from tpmpi.core.mesh import tp_shape
from tpmpi.core.partition import block_partition, block_sizes

EPILOG = """\
memory budget example (default model, float32, Adam: 16 bytes per parameter and rank):
  mpiexec -n 1 python scripts/train_mlp.py --max-rank-bytes 200000   # refused: needs 529,408
                                                                     # bytes; smallest P is 3
  mpiexec -n 4 python scripts/train_mlp.py --max-rank-bytes 200000   # trains: 133,120 bytes
hybrid meshes (4 ranks):
  mpiexec -n 4 python scripts/train_mlp.py --dp 2 --tp 2 --sequence-parallel
  mpiexec -n 4 python scripts/train_mlp.py --dp 1 --tp 2x2            # tile2d FFN on 2x2
checkpoint and resume (on another mesh, too):
  mpiexec -n 4 python scripts/train_mlp.py --dp 2 --tp 2 --steps 50 --save ckpt
  mpiexec -n 2 python scripts/train_mlp.py --dp 1 --tp 2 --steps 50 --resume ckpt
"""

STATE_PER_PARAM = {"adam": 2, "sgd": 0}  # optimizer-state arrays per parameter


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (errors raise :class:`tpmpi.core.launch.UsageError`)."""
    p = Parser(prog="train_mlp.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int_flag(), default=256, help="rows M of the data set (256)")
    p.add_argument("--d-model", type=int_flag(), default=64, help="input/output width (64)")
    p.add_argument("--d-hidden", type=int_flag(), default=256, help="hidden width (256)")
    p.add_argument("--steps", type=int_flag(), default=100, help="full-batch steps (100)")
    p.add_argument("--print-every", type=int_flag(), default=10, help="loss print interval (10)")
    p.add_argument("--optimizer", choices=sorted(STATE_PER_PARAM), default="adam")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (3e-3)")
    p.add_argument("--dp", type=int_flag(), default=1, help="data-parallel replicas D (1)")
    p.add_argument("--tp", default=None,
                   help="TP group: T ranks (1D FFN) or RxC (2D tile FFN); default P/D, 1D")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="1D TP: activations outside the GEMMs split by rows (mode sequence)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="FFN mode (default megatron; sequence with --sequence-parallel, tile2d "
                        "with --tp RxC)")
    p.add_argument("--bucket-bytes", type=int_flag(), default=25 * 2**20,
                   help="DP gradient bucket size in bytes (25 MiB)")
    p.add_argument("--measure-overlap", action="store_true",
                   help="after training, measure the share of the DP Allreduce hidden under "
                        "backward (OSU convention; with --dp > 1)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu")
    p.add_argument("--dtype", choices=SUPPORTED[:3], default="float32")
    p.add_argument("--backend", choices=["auto", "numpy", "cupy"], default="auto")
    p.add_argument("--seed", type=int_flag(), default=0)
    p.add_argument("--max-rank-bytes", type=int_flag(), default=None,
                   help="refuse to build the model if one rank's weights + gradients + "
                        "optimizer state would exceed this many bytes (default: no limit)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="after training, save model + optimizer state + step to DIR")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="start from the checkpoint in DIR (any mesh); --steps more steps")
    p.add_argument("--quiet", action="store_true", help="print nothing (tests)")
    return p


# ---------------------------------------------------------------- mode and memory budget


def resolve(args, nranks: int) -> tuple[str, tuple[int, int]]:
    """``(mode, TP grid)`` of the arguments on ``nranks`` ranks; ValueError naming the flag."""
    two_d = args.tp is not None and "x" in str(args.tp).lower()
    shape = tp_shape(args.tp, nranks, args.dp)
    mode = args.mode or ("tile2d" if two_d else "sequence" if args.sequence_parallel
                         else "megatron")
    if args.sequence_parallel and mode != "sequence":
        raise ValueError(f"--sequence-parallel: needs a 1D --tp T and mode sequence, not "
                         f"{'--tp ' + args.tp if two_d else '--mode ' + mode} (the tile2d FFN "
                         "already splits the rows over its grid rows)")
    if two_d and mode != "tile2d":
        raise ValueError(f"--tp {args.tp}: a 2D TP grid runs the tile2d FFN, not --mode {mode}")
    return mode, shape


def rank_param_counts(args, tp: int | tuple[int, int], mode: str = "megatron") -> list[int]:
    """Parameters held by each rank of a ParallelMLP in ``mode`` over a TP group of ``tp``
    ranks (1D) or grid ``(pr, pc)`` (block partitions)."""
    d, h = args.d_model, args.d_hidden
    pr, pc = (1, tp) if isinstance(tp, int) else tp
    counts = []
    for r in range(pr):
        for c in range(pc):
            if mode == "tile2d":  # fc1 tile (d_r, h_c) + b1_c; fc2 tile (h_r, d_c) + b2_c
                d_r, h_r = block_sizes(d, pr)[r], block_sizes(h, pr)[r]
                h_c, d_c = block_sizes(h, pc)[c], block_sizes(d, pc)[c]
                counts.append(d_r * h_c + h_c + h_r * d_c + d_c)
                continue
            i = r * pc + c
            h_p, d_p = block_sizes(h, pr * pc)[i], block_sizes(d, pr * pc)[i]
            if mode == "book":  # fc1 cols (d, h_p) + b1_p; fc2 cols (h, d_p) + b2_p
                counts.append(d * h_p + h_p + h * d_p + d_p)
            else:  # fc1 cols (d, h_p) + b1_p; fc2 rows (h_p, d) + b2 whole
                counts.append(2 * d * h_p + h_p + d)
    return counts


def rank_need(args, tp: int | tuple[int, int], mode: str = "megatron") -> int:
    """Largest per-rank bytes of weights + gradients + optimizer state over the TP group."""
    per_param = np.dtype(args.dtype).itemsize * (2 + STATE_PER_PARAM[args.optimizer])
    return max(rank_param_counts(args, tp, mode)) * per_param


def check_budget(args, tp: tuple[int, int], mode: str) -> None:
    """ValueError naming the budget, the need and the smallest TP group that fits, if
    exceeded (DP replicas hold the same shards: only the TP group divides the model)."""
    budget = args.max_rank_bytes
    if budget is None or rank_need(args, tp, mode) <= budget:
        return
    limit = max(args.d_model, args.d_hidden) + 1  # shards stop shrinking beyond this
    shapes = (s for t in range(1, limit + 1)
              for s in (factorisations(t) if mode == "tile2d" else [(1, t)]))
    fits = next((s for s in shapes if rank_need(args, s, mode) <= budget), None)

    def label(shape: tuple[int, int]) -> str:
        return f"{shape[0]}x{shape[1]}" if mode == "tile2d" else str(shape[1])

    hint = f"the smallest TP group that fits is {label(fits)}" if fits else \
        "no TP group fits (replicated parts)"
    raise ValueError(f"--max-rank-bytes={budget:,}: at tp={label(tp)} a rank needs "
                     f"{rank_need(args, tp, mode):,} bytes (weights + gradients + "
                     f"{args.optimizer} state, {args.dtype}); {hint}")


# ---------------------------------------------------------------- data, optimizer, reference


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic X (M, d) in [-1, 1] and targets ``sin(2 X T)`` with a random teacher T."""
    d = args.d_model
    X = tpmpi.init_weight((args.samples, d), args.seed + 100, "float64", bound=1.0)
    T = tpmpi.init_weight((d, d), args.seed + 101, "float64")
    return X, np.sin(2.0 * X @ T)


class Optimizer:
    """SGD or Adam over ``(param, grad)`` pairs, updated in place; purely local."""

    def __init__(self, kind: str, lr: float, params: Sequence, betas=(0.9, 0.999), eps=1e-8):
        self.kind, self.lr, self.betas, self.eps, self.t = kind, lr, betas, eps, 0
        self.params = list(params)
        self.state = [[p * 0 for _ in range(STATE_PER_PARAM[kind])] for p, _ in self.params]

    def state_arrays(self, names: Sequence[str]) -> dict:
        """``{"adam.m": {name: m}, "adam.v": {name: v}}`` of the parameters ``names`` (in the
        order of ``params``), as :func:`tpmpi.save_checkpoint` and ``load_checkpoint`` take the
        state (sharded like the parameters); ``{}`` for SGD."""
        groups = [f"{self.kind}.{g}" for g in ("m", "v")[:STATE_PER_PARAM[self.kind]]]
        return {g: dict(zip(names, (arrays[i] for arrays in self.state)))
                for i, g in enumerate(groups)}

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for (p, g), state in zip(self.params, self.state):
            if self.kind == "sgd":
                p -= self.lr * g
                continue
            m, v = state
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            step = self.lr / (1 - b1 ** self.t)
            p -= step * m / ((v / (1 - b2 ** self.t)) ** 0.5 + self.eps)


class SerialMLP:
    """The same MLP in float64 NumPy on one rank, initialised like ParallelMLP's seeds."""

    def __init__(self, args):
        d, h, dt = args.d_model, args.d_hidden, args.dtype

        def init(shape, seed, fan_in, bias):
            a = tpmpi.init_weight(shape, seed, dt, stream=1, bound=fan_in ** -0.5) if bias \
                else tpmpi.init_weight(shape, seed, dt)
            return a.astype(np.float64)

        self.p = [init((d, h), args.seed, d, False), init((h,), args.seed, d, True),
                  init((h, d), args.seed + 1, h, False), init((d,), args.seed + 1, h, True)]
        self.g = [np.zeros_like(a) for a in self.p]
        self.act, self.dact = get_activation(args.activation)

    def step(self, X, T) -> float:
        """One forward/backward; returns the loss, leaves the gradients in ``self.g``."""
        W1, b1, W2, b2 = self.p
        pre = X @ W1 + b1
        h = self.act(pre)
        r = h @ W2 + b2 - T
        dy = 2 * r / r.size
        dpre = (dy @ W2.T) * self.dact(pre)
        for g, new in zip(self.g, (X.T @ dpre, dpre.sum(0), h.T @ dy, dy.sum(0))):
            g[...] = new
        return float(np.mean(r * r))


# ---------------------------------------------------------------- main


def _print_bytes(say, args, per_rank: dict, n_params: int, need: int) -> None:
    """Rank 0's table of bytes per rank (``per_rank``: kind -> list over ranks)."""
    serial = n_params * np.dtype(args.dtype).itemsize
    say(f"bytes per rank (serial weights {serial:,}; activations = this rank's block of the FFN "
        f"input + output; step peak = most bytes allocated during the first forward + "
        f"backward); weights + gradients + {args.optimizer} state, max over ranks: {need:,}"
        + (f" <= budget {args.max_rank_bytes:,}" if args.max_rank_bytes else ""))
    say(f"{'rank':>5} {'weights':>10} {'gradients':>10} {args.optimizer + ' state':>11} "
        f"{'activations':>12} {'step peak':>10}")
    for i in range(len(per_rank["weights"])):
        say(f"{i:5d} " + " ".join(f"{per_rank[k][i]:{w},d}" for k, w in (
            ("weights", 10), ("gradients", 10), ("optimizer", 11), ("activations", 12),
            ("step_peak", 10))))


def _reference(args, X: np.ndarray, T: np.ndarray, start: int) -> tuple[SerialMLP, Optimizer]:
    """The serial float64 model and its optimizer, after ``start`` steps (a resumed run's
    reference replays the steps it missed)."""
    ref = SerialMLP(args)
    opt = Optimizer(args.optimizer, args.lr, zip(ref.p, ref.g))
    for _ in range(start):
        ref.step(X, T)
        opt.step()
    return ref, opt


RESUMED = ("samples", "d_model", "d_hidden", "activation", "seed", "optimizer")
"""Flags a resumed run must share with the run that saved (the data, the model, the state)."""


def _saved(args, step: int, t: int) -> dict:
    """The ``meta`` of a checkpoint after ``step`` steps (``t`` optimizer updates)."""
    return {"train_mlp": {"step": step, "t": t, **{k: getattr(args, k) for k in RESUMED}}}


def _resume(args, model, opt: Optimizer, names: list) -> int:
    """Load ``--resume`` into ``model`` and ``opt`` (collective); the step it had reached.
    ValueError naming the flag whose value differs from the saving run's."""
    saved = resume_training(args.resume, model, state=opt.state_arrays(names) or None,
                            program="train_mlp", flags={k: getattr(args, k) for k in RESUMED})
    opt.t = saved["t"]
    return saved["step"]


def _owned_sum(a, layout: str, tp_rank: int) -> float:
    """This rank's share of the global sum of ``a``: all of it for a distributed layout; for a
    replicated one, only TP rank 0 counts it."""
    return float(a.sum()) if layout != "replicated" or tp_rank == 0 else 0.0


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> dict:
    """Train; returns ``{"losses", "reference", "max_rel_diff", "agree", "rank_weight_bytes",
    "rank_bytes", "dp_comm_s", "dp_bytes", "overlap"}`` (``reference`` and the ``rank_*`` lists
    are None except on rank 0; ``rank_bytes`` maps weights, gradients, optimizer, activations
    and step_peak to per-rank lists; ``overlap`` is the DP overlap measurement or None).
    Collective over ``comm`` (default COMM_WORLD); bad arguments, a bad mesh or an exceeded
    budget raise the same ValueError on every rank."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank, nranks = comm.Get_rank(), comm.Get_size()
    args = parse_args(build_parser(), argv, comm)
    mode, shape = None, None

    def local_checks() -> None:
        nonlocal mode, shape
        for name in ("samples", "d_model", "d_hidden", "steps", "print_every", "dp",
                     "bucket_bytes"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected "
                                 "a positive integer")
        mode, shape = resolve(args, nranks)
        check_budget(args, shape, mode)

    agree_checks(comm, local_checks)
    say = (lambda *a: None) if args.quiet or rank else print
    tpmpi.configure_blas_threads(comm)
    mesh = tpmpi.Mesh(comm, dp=args.dp, tp=shape)
    grid = mesh.tp
    mlp = tpmpi.ParallelMLP(args.d_model, args.d_hidden, grid=grid, mode=mode,
                            activation=args.activation, dtype=args.dtype, seed=args.seed,
                            backend=args.backend)
    model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=args.bucket_bytes)
    backend, lay = mlp.fc1.backend, mlp.layouts.x  # = y's
    names = [name for name, _, _ in model.parameters()]
    dp_prof = attach_tap(model, Profiler.for_backend(backend))  # the DP communication time
    params = [(p, g) for _, p, g in model.parameters()]
    opt = Optimizer(args.optimizer, args.lr, params)
    start = _resume(args, model, opt, names) if args.resume else 0
    X, T = make_data(args)
    rows = slice(*block_partition(args.samples, args.dp)[mesh.dp_rank])  # this replica's data
    x, t = (backend.asarray(tpmpi.scatter(a[rows], grid, lay), dtype=args.dtype) for a in (X, T))
    ref, ref_opt = _reference(args, X, T, start) if rank == 0 else (None, None)
    n_params = sum(rank_param_counts(args, 1))
    # dL/dy of the global mean squared error; x dp because DataParallel averages the replicas
    scale = 2.0 * args.dp / (args.samples * args.d_model)

    if args.resume:
        say(f"resumed from {args.resume} at step {start}")
    say(f"train_mlp: P={nranks} as mesh dp x tp = {mesh.label}, mode {mode}, activation "
        f"{args.activation}, {args.dtype} on {backend.name}, {args.optimizer} lr={args.lr}; "
        f"data {args.samples} x {args.d_model} (rows per replica "
        f"{'/'.join(map(str, block_sizes(args.samples, args.dp)))}), hidden {args.d_hidden}: "
        f"{n_params:,} parameters")
    say(f"{'step':>5} {f'loss ({mesh.label}, {args.dtype})':>26} "
        f"{'loss (serial float64)':>22} {'rel diff':>9}")
    losses, reference, diffs = [], [], []
    peak, io_bytes = 0, 0
    began = MPI.Wtime()
    for step in range(start, start + args.steps + 1):  # the peak: measured in the first step
        first = step == start
        with backend.memory_peak() if first else contextlib.nullcontext({"peak": 0}) as mem:
            y = model(x)
            r = y - t
            if step < start + args.steps:
                model.zero_grad()
                model.backward(r * scale)
        peak, io_bytes = max(peak, mem["peak"]), max(io_bytes, x.nbytes + y.nbytes)
        losses.append(comm.allreduce(_owned_sum(r * r, lay, grid.rank))
                      / (args.samples * args.d_model))
        if ref is not None:
            reference.append(ref.step(X, T))
            diffs.append(abs(losses[-1] - reference[-1]) / abs(reference[-1]))
            if step % args.print_every == 0 or step == start + args.steps:
                say(f"{step:5d} {losses[-1]:26.8e} {reference[-1]:22.8e} {diffs[-1]:9.1e}")
        if step == start + args.steps:
            break
        opt.step()
        if ref_opt is not None:
            ref_opt.step()
    elapsed = comm.allreduce(MPI.Wtime() - began, op=MPI.MAX)
    if args.save:
        tpmpi.save_checkpoint(args.save, model, state=opt.state_arrays(names) or None,
                              meta=_saved(args, start + args.steps, opt.t))
        say(f"saved model, {args.optimizer} state and step {start + args.steps} to {args.save}")
    worst = comm.bcast(max(diffs) if diffs else None, root=0)
    agree = worst <= tolerance(args.dtype)
    dp_comm_s = comm.allreduce(dp_prof.comm_s, op=MPI.MAX)
    dp_bytes = dp_prof.bytes
    mine = {"weights": sum(p.nbytes for p, _ in params),
            "gradients": sum(g.nbytes for _, g in params),
            "optimizer": sum(a.nbytes for state in opt.state for a in state),
            "activations": io_bytes, "step_peak": peak}
    every = comm.gather(mine, root=0)
    per_rank = {key: [m[key] for m in every] for key in mine} if rank == 0 else None
    say(f"max rel diff over the curve {worst:.1e} (tolerance {tolerance(args.dtype):.0e} for "
        f"{args.dtype}): {'agree' if agree else 'DISAGREE'}; {args.steps} steps in "
        f"{elapsed:.2f} s (serial reference on rank 0 included)")
    if rank == 0:
        _print_bytes(say, args, per_rank, n_params, rank_need(args, shape, mode))
    if args.dp > 1:
        say(f"DP gradient averaging over {args.dp} replicas: {dp_bytes / args.steps:,.0f} bytes "
            f"per step in {len(model.buckets)} bucket(s) (Allreduce size on rank 0); time "
            f"blocked in DP communication {dp_comm_s * 1e3:.2f} ms in all, "
            f"{dp_comm_s / args.steps * 1e6:.1f} us per step (max over ranks)")
    overlap = None
    if args.measure_overlap and args.dp > 1:
        y = model(x)
        overlap = measure_dp_overlap(model, (y - t) * scale, iters=max(3, args.steps // 10))
        say(f"DP overlap (OSU): backward with DP {overlap.overall_s * 1e3:.3f} ms, backward "
            f"alone {overlap.compute_s * 1e3:.3f} ms, DP Allreduce alone "
            f"{overlap.comm_s * 1e3:.3f} ms -> {overlap.overlap_pct:.1f}% hidden")
    mesh.free()
    return {"losses": losses, "reference": reference if ref else None, "max_rel_diff": worst,
            "agree": agree, "rank_weight_bytes": per_rank["weights"] if per_rank else None,
            "rank_bytes": per_rank, "dp_comm_s": dp_comm_s, "dp_bytes": dp_bytes,
            "overlap": overlap}


def cli() -> int:
    """The command line's work: exit 2 with a one-line message (rank 0) on usage/budget
    errors, 1 if the curves disagree."""
    with usage():
        result = main(sys.argv[1:], MPI.COMM_WORLD)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    launch.run(cli, "train_mlp.py")
