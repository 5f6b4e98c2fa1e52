"""Every kind of bad input to tpmpi's public entry points, run under MPI: the message a user
sees (checked to be the same on every rank) and the time to fail (max over ranks).

    mpiexec -n 4 python scripts/bad_inputs.py        # markdown table on rank 0

tests/test_bad_inputs.py runs the same cases at world sizes 1-4.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import tpmpi  # noqa: E402
from tpmpi import comm as tcomm  # noqa: E402

Col = tpmpi.ColumnParallelLinear


class OtherLayer(Col):
    """A different layer class, for the class-mismatch case."""


class Context:
    """A grid, a column layer, inputs and a scratch directory shared by the ranks of ``comm``."""

    def __init__(self, comm: MPI.Comm, tmpdir: str):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.tmpdir = tmpdir
        self.last = self.size - 1  # the rank that misbehaves in one-rank cases
        self.grid = tpmpi.ProcessGrid(comm)
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((4, 5)).astype(np.float32)
        self.W = rng.standard_normal((5, 6)).astype(np.float32)
        self.b = rng.standard_normal(6).astype(np.float32)
        self.layer = Col.from_dense(self.W, self.b, grid=self.grid)

    def checkpoint(self, damage: Optional[Callable[[str], None]] = None) -> str:
        """A fresh checkpoint of ``self.layer``; ``damage(weight file)`` runs on rank 0."""
        path = os.path.join(self.tmpdir, "ckpt")
        tpmpi.save_checkpoint(path, self.layer)
        if damage is not None and self.rank == 0:
            damage(os.path.join(path, "weight.npy"))
        self.comm.Barrier()
        return path


@dataclass
class Case:
    label: str
    min_ranks: int
    make: Callable[[Context], Callable[[], object]]  # setup -> the call that must fail


CASES: list[Case] = []


def case(label: str, min_ranks: int = 1):
    def register(make):
        CASES.append(Case(label, min_ranks, make))
        return make
    return register


def _flip_last_byte(filename: str) -> None:
    with open(filename, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([byte ^ 0xFF]))


# ---- grid
case("ProcessGrid: pr*pc != ranks")(
    lambda c: lambda: tpmpi.ProcessGrid(c.comm, shape=(c.size + 1, 1)))
case("ProcessGrid: shape differs across ranks", 2)(
    lambda c: lambda: tpmpi.ProcessGrid(c.comm, shape=(1, c.size) if c.rank else (c.size, 1)))
# ---- layer construction
case("layer: out_features < 0")(lambda c: lambda: Col(5, -1, grid=c.grid))
case("layer: unsupported dtype")(lambda c: lambda: Col(5, 6, grid=c.grid, dtype="int8"))
case("layer: grid is not a ProcessGrid")(lambda c: lambda: Col(5, 6, grid=c.comm))
case("layer: out_features differs across ranks", 2)(
    lambda c: lambda: Col(5, 6 + (c.rank == c.last), grid=c.grid))
case("layer: dtype differs across ranks", 2)(
    lambda c: lambda: Col(5, 6, grid=c.grid, dtype="float64" if c.rank == c.last else "float32"))
case("layer: option gather_output differs", 2)(
    lambda c: lambda: Col(5, 6, grid=c.grid, gather_output=c.rank != c.last))
case("from_dense: b has the wrong shape on one rank", 2)(
    lambda c: lambda: Col.from_dense(c.W, c.b[: 6 - (c.rank == c.last)], grid=c.grid))
case("from_dense: W is a list on one rank", 2)(
    lambda c: lambda: Col.from_dense(c.W.tolist() if c.rank == c.last else c.W, c.b, grid=c.grid))
case("from_dense: b is a list on one rank", 2)(
    lambda c: lambda: Col.from_dense(c.W, c.b.tolist() if c.rank == c.last else c.b, grid=c.grid))
# ---- forward / backward
case("forward: x has wrong columns on one rank", 2)(
    lambda c: lambda: c.layer(c.X[:, : 5 - (c.rank == c.last)]))
case("forward: x rows differ across ranks", 2)(
    lambda c: lambda: c.layer(c.X[: 4 - (c.rank == c.last)]))
case("forward: x dtype float64 for a float32 layer")(
    lambda c: lambda: c.layer(c.X.astype(np.float64)))
case("forward: x is a list")(lambda c: lambda: c.layer(c.X.tolist()))


def _nan_on_last(c: Context):
    layer = Col.from_dense(c.W, c.b, grid=c.grid, check_finite=True)
    x = c.X.copy()
    if c.rank == c.last:
        x[1, 2] = np.nan
        x[3, 0] = np.inf
    return lambda: layer(x)


case("forward: NaN/Inf in x on one rank (check_finite=True)")(_nan_on_last)
case("backward: called before forward")(
    lambda c: lambda: Col.from_dense(c.W, c.b, grid=c.grid).backward(c.X[:, :1]))


def _dy_rows(c: Context):
    c.layer(c.X)
    return lambda: c.layer.backward(np.zeros((3, 6), np.float32))


case("backward: dy rows != forward input rows")(_dy_rows)
# ---- layouts
case("gather: local block of the wrong shape on one rank", 2)(
    lambda c: lambda: tpmpi.gather(np.zeros((2, 3 - (c.rank == c.last))), c.grid, "cols",
                                   (2, 3 * c.size)))
case("gather: unknown layout")(lambda c: lambda: tpmpi.gather(c.X, c.grid, "diag", c.X.shape))
case("gather: a list instead of an array on one rank", 2)(
    lambda c: lambda: tpmpi.gather(c.X.tolist() if c.rank == c.last else c.X, c.grid,
                                   "replicated", c.X.shape))
case("scatter: unknown layout (local, no communication)")(
    lambda c: lambda: tpmpi.scatter(c.X, c.grid, "diag"))
case("init_weight: negative seed (local, no communication)")(
    lambda c: lambda: tpmpi.init_weight((3, 4), -1))
# ---- large messages
case("TPMPI_MAX_MESSAGE_BYTES differs across ranks", 2)(
    lambda c: lambda: _with_limit(2**20 + c.rank, lambda: c.layer(c.X)))


def _with_limit(limit: int, fn):
    old, tcomm.MAX_MESSAGE_BYTES = tcomm.MAX_MESSAGE_BYTES, limit
    try:
        return fn()
    finally:
        tcomm.MAX_MESSAGE_BYTES = old


# ---- checkpoints
case("save_checkpoint: path differs across ranks", 2)(
    lambda c: lambda: tpmpi.save_checkpoint(os.path.join(c.tmpdir, f"r{c.rank}"), c.layer))
case("load_checkpoint: no checkpoint at path")(
    lambda c: lambda: Col.load_checkpoint(os.path.join(c.tmpdir, "none"), grid=c.grid))
case("load_checkpoint: weight file missing")(
    lambda c: (lambda p: lambda: Col.load_checkpoint(p, grid=c.grid))(c.checkpoint(os.remove)))
case("load_checkpoint: truncated file")(
    lambda c: (lambda p: lambda: Col.load_checkpoint(p, grid=c.grid))(
        c.checkpoint(lambda f: os.truncate(f, os.path.getsize(f) - 8))))
case("load_checkpoint: corrupted data byte")(
    lambda c: (lambda p: lambda: Col.load_checkpoint(p, grid=c.grid))(
        c.checkpoint(_flip_last_byte)))
case("load_checkpoint: class mismatch")(
    lambda c: (lambda p: lambda: OtherLayer.load_checkpoint(p, grid=c.grid))(c.checkpoint()))
case("load_checkpoint: shape mismatch")(
    lambda c: (lambda p: lambda: tpmpi.load_checkpoint(p, into=Col(5, 4, grid=c.grid)))(
        c.checkpoint()))


@dataclass
class Result:
    label: str
    message: Optional[str]  # "Type: text" as rank 0 saw it; None if nothing was raised
    seconds: float  # max over ranks
    same_everywhere: bool


def run_case(c: Context, item: Case) -> Result:
    """Set up ``item``, time the failing call on every rank, compare the messages."""
    fn = item.make(c)
    c.comm.Barrier()
    start = time.perf_counter()
    try:
        fn()
        message = None
    except Exception as exc:  # noqa: BLE001 - we report whatever the user would see
        message = f"{type(exc).__name__}: {exc}"
    seconds = c.comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    messages = c.comm.allgather(message)
    return Result(item.label, messages[0], seconds, len(set(messages)) == 1)


def run_all(comm: MPI.Comm, tmpdir: str) -> list[Result]:
    """Every case that applies at ``comm``'s size. Collective."""
    c = Context(comm, tmpdir)
    try:
        return [run_case(c, item) for item in CASES if comm.Get_size() >= item.min_ranks]
    finally:
        c.grid.free()


def main() -> int:
    comm = MPI.COMM_WORLD
    tmpdir = comm.bcast(tempfile.mkdtemp(prefix="tpmpi-bad-") if comm.Get_rank() == 0 else None)
    try:
        results = run_all(comm, tmpdir)
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if comm.Get_rank() == 0:
        print(f"{comm.Get_size()} ranks\n")
        print("| input | message (every rank) | time to fail (s) |")
        print("|---|---|---|")
        for r in results:
            msg = (r.message or "NOT RAISED").replace("|", "\\|")
            flag = "" if r.same_everywhere else " **(differs across ranks)**"
            print(f"| {r.label} | {msg}{flag} | {r.seconds:.3f} |")
    ok = all(r.message and r.same_everywhere for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
