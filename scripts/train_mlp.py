"""Train a tensor-parallel MLP on a synthetic regression task, next to a serial reference.

Run: ``mpiexec -n P python scripts/train_mlp.py [options]`` (see ``--help``). Every rank holds
only its shards of the ParallelMLP (weights, gradients, optimizer state); the optimizer is
purely local. Rank 0 also trains the same model serially in float64 NumPy (not counted in the
budget) and prints both loss curves side by side. ``main(argv, comm)`` is importable (tests
call it on sub-communicators) and returns the curves.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np
from mpi4py import MPI

import tpmpi
from tpmpi.activations import ACTIVATIONS, get_activation
from tpmpi.comm import check
from tpmpi.dtypes import SUPPORTED, tolerance
from tpmpi.layers.mlp import MODES
from tpmpi.partition import block_sizes

EPILOG = """\
memory budget example (default model, float32, Adam: 16 bytes per parameter and rank):
  mpiexec -n 1 python scripts/train_mlp.py --max-rank-bytes 200000   # refused: needs 529,408
                                                                     # bytes; smallest P is 3
  mpiexec -n 4 python scripts/train_mlp.py --max-rank-bytes 200000   # trains: 133,120 bytes
"""

STATE_PER_PARAM = {"adam": 2, "sgd": 0}  # optimizer-state arrays per parameter


class _Parser(argparse.ArgumentParser):
    """Usage errors raise ValueError (the same on every rank); help prints on rank 0 only."""

    rank = 0

    def error(self, message: str):
        raise ValueError(message)

    def _print_message(self, message, file=None):
        if self.rank == 0:
            super()._print_message(message, file)


def build_parser(rank: int = 0) -> argparse.ArgumentParser:
    """The command-line options (help printed by ``rank`` 0 only)."""
    p = _Parser(prog="train_mlp.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.rank = rank
    p.add_argument("--samples", type=int, default=256, help="rows M of the data set (256)")
    p.add_argument("--d-model", type=int, default=64, help="input/output width (64)")
    p.add_argument("--d-hidden", type=int, default=256, help="hidden width (256)")
    p.add_argument("--steps", type=int, default=100, help="full-batch steps (100)")
    p.add_argument("--print-every", type=int, default=10, help="loss print interval (10)")
    p.add_argument("--optimizer", choices=sorted(STATE_PER_PARAM), default="adam")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (3e-3)")
    p.add_argument("--mode", choices=MODES, default="megatron")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu")
    p.add_argument("--dtype", choices=SUPPORTED[:3], default="float32")
    p.add_argument("--backend", choices=["auto", "numpy", "cupy"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rank-bytes", type=int, default=None,
                   help="refuse to build the model if one rank's weights + gradients + "
                        "optimizer state would exceed this many bytes (default: no limit)")
    p.add_argument("--quiet", action="store_true", help="print nothing (tests)")
    return p


# ---------------------------------------------------------------- memory budget


def rank_param_counts(args, nranks: int) -> list[int]:
    """Parameters held by each rank of a ParallelMLP over ``nranks`` (block partition)."""
    d, h = args.d_model, args.d_hidden
    counts = []
    for h_p, d_p in zip(block_sizes(h, nranks), block_sizes(d, nranks)):
        if args.mode == "megatron":  # fc1 cols (d, h_p) + b1_p; fc2 rows (h_p, d) + b2 whole
            counts.append(2 * d * h_p + h_p + d)
        else:  # fc1 cols (d, h_p) + b1_p; fc2 cols (h, d_p) + b2_p
            counts.append(d * h_p + h_p + h * d_p + d_p)
    return counts


def rank_need(args, nranks: int) -> int:
    """Largest per-rank bytes of weights + gradients + optimizer state over ``nranks``."""
    per_param = np.dtype(args.dtype).itemsize * (2 + STATE_PER_PARAM[args.optimizer])
    return max(rank_param_counts(args, nranks)) * per_param


def check_budget(args, nranks: int) -> None:
    """ValueError naming the budget, the need and the smallest P that fits, if exceeded."""
    budget = args.max_rank_bytes
    if budget is None or rank_need(args, nranks) <= budget:
        return
    limit = max(args.d_model, args.d_hidden) + 1  # shards stop shrinking beyond this
    fits = next((p for p in range(1, limit + 1) if rank_need(args, p) <= budget), None)
    hint = f"the smallest P that fits is {fits}" if fits else "no P fits (replicated parts)"
    raise ValueError(f"--max-rank-bytes={budget:,}: at P={nranks} a rank needs "
                     f"{rank_need(args, nranks):,} bytes (weights + gradients + "
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


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> dict:
    """Train; returns ``{"losses", "reference", "max_rel_diff", "agree",
    "rank_weight_bytes"}`` (``reference`` and ``rank_weight_bytes`` are None except on rank 0).
    Collective over ``comm`` (default COMM_WORLD); bad arguments or an exceeded budget raise
    the same ValueError on every rank."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank, nranks = comm.Get_rank(), comm.Get_size()
    parser = build_parser(rank)
    args = None

    def local_checks() -> None:
        nonlocal args
        args = parser.parse_args(argv)
        for name in ("samples", "d_model", "d_hidden", "steps", "print_every"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected "
                                 "a positive integer")
        check_budget(args, nranks)

    check(comm, local_checks, argv=list(argv) if argv is not None else sys.argv[1:])
    say = (lambda *a: None) if args.quiet or rank else print
    grid = tpmpi.ProcessGrid(comm)
    mlp = tpmpi.ParallelMLP(args.d_model, args.d_hidden, grid=grid, mode=args.mode,
                            activation=args.activation, dtype=args.dtype, seed=args.seed,
                            backend=args.backend)
    backend = mlp.fc1.backend
    params = [(p, g) for _, p, g in mlp.parameters()]
    opt = Optimizer(args.optimizer, args.lr, params)
    X, T = make_data(args)
    x, t = backend.asarray(X, dtype=args.dtype), backend.asarray(T, dtype=args.dtype)
    ref = SerialMLP(args) if rank == 0 else None
    ref_opt = Optimizer(args.optimizer, args.lr, zip(ref.p, ref.g)) if ref else None

    weight_bytes = sum(p.nbytes for p, _ in params)
    per_rank = comm.gather(weight_bytes, root=0)
    n_params = sum(rank_param_counts(args, 1))
    say(f"train_mlp: P={nranks}, mode {args.mode}, activation {args.activation}, "
        f"{args.dtype} on {backend.name}, {args.optimizer} lr={args.lr}; data {args.samples} x "
        f"{args.d_model}, hidden {args.d_hidden}: {n_params:,} parameters")
    if rank == 0:
        serial = n_params * np.dtype(args.dtype).itemsize
        say(f"weight bytes per rank: {', '.join(f'{b:,}' for b in per_rank)} "
            f"(serial {serial:,}; 1/P = {serial / nranks:,.0f}); weights + grads + "
            f"{args.optimizer} state, max over ranks: {rank_need(args, nranks):,}"
            + (f" <= budget {args.max_rank_bytes:,}" if args.max_rank_bytes else ""))
        say(f"{'step':>5} {f'loss (P={nranks}, {args.dtype})':>24} "
            f"{'loss (serial float64)':>22} {'rel diff':>9}")
    losses, reference, diffs = [], [], []
    start = MPI.Wtime()
    for step in range(args.steps + 1):
        y = mlp(x)
        r = y - t
        losses.append(float((r * r).mean()))  # y is replicated: the same on every rank
        if ref is not None:
            reference.append(ref.step(X, T))
            diffs.append(abs(losses[-1] - reference[-1]) / abs(reference[-1]))
            if step % args.print_every == 0 or step == args.steps:
                say(f"{step:5d} {losses[-1]:24.8e} {reference[-1]:22.8e} {diffs[-1]:9.1e}")
        if step == args.steps:
            break
        mlp.zero_grad()
        mlp.backward(2 * r / r.size)
        opt.step()
        if ref_opt is not None:
            ref_opt.step()
    elapsed = comm.allreduce(MPI.Wtime() - start, op=MPI.MAX)
    worst = comm.bcast(max(diffs) if diffs else None, root=0)
    agree = worst <= tolerance(args.dtype)
    say(f"max rel diff over the curve {worst:.1e} (tolerance {tolerance(args.dtype):.0e} for "
        f"{args.dtype}): {'agree' if agree else 'DISAGREE'}; {args.steps} steps in "
        f"{elapsed:.2f} s (serial reference on rank 0 included)")
    grid.free()
    return {"losses": losses, "reference": reference if ref else None, "max_rel_diff": worst,
            "agree": agree, "rank_weight_bytes": per_rank}


def cli() -> int:
    """Entry point: exit 2 with a one-line message (rank 0) on usage/budget errors, 1 if the
    curves disagree."""
    comm = MPI.COMM_WORLD
    try:
        result = main(sys.argv[1:], comm)
    except ValueError as exc:
        if comm.Get_rank() == 0:
            print(f"train_mlp.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(cli())
