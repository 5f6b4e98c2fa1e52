"""Save a parallel layer on one grid, load it on another, compare with numpy.load.

    mpiexec -n 4 python scripts/checkpoint_roundtrip.py save DIR --grid 2x2 --layer tile2d
    mpiexec -n 3 python scripts/checkpoint_roundtrip.py load DIR --grid 1x3 --layer tile2d
    python scripts/checkpoint_roundtrip.py verify DIR          # numpy only, no MPI I/O

``--layer column`` (default) or ``tile2d``: the tile layer splits W over both grid axes, so a
2x2 save re-shards for real onto 1x3, 4x1 or 1x1.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import tpmpi
from tpmpi.core import launch

PROG = "checkpoint_roundtrip.py"
K, N, SEED = 37, 23, 2024
LAYERS = {"column": "ColumnParallelLinear", "tile2d": "TileParallelLinear"}


def dense() -> tuple[np.ndarray, np.ndarray]:
    """Weights unrelated to the layer's initialiser, so a load cannot pass by re-initialising."""
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((K, N)), rng.standard_normal(N)


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> int:
    """Exit code: 0 equal, 1 a shard differs, 2 a usage or checkpoint error (one line on rank
    0; :func:`tpmpi.core.launch.exit_code`). ``comm`` defaults to COMM_WORLD."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    return launch.exit_code(lambda: roundtrip(argv, comm), comm, PROG)


def roundtrip(argv: Optional[Sequence[str]], comm: MPI.Comm) -> int:
    """The work of :func:`main`; a checkpoint the library refuses is a usage error (the
    library raises it on every rank)."""
    ap = launch.Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "load", "verify"], help="what to do")
    ap.add_argument("path", help="the checkpoint directory")
    ap.add_argument("--grid", default=None, help="RxC (default 1xP)")
    ap.add_argument("--layer", choices=sorted(LAYERS), default="column", help="layer class")
    args = launch.parse_args(ap, argv, comm)
    W, b = dense()
    if args.action == "verify":
        with open(os.path.join(args.path, "manifest.json")) as f:
            manifest = json.load(f)  # names each parameter's file, e.g. v000001/weight.npy
        saved, files = manifest["grid"], {k: os.path.join(args.path, e["file"])
                                          for k, e in manifest["parameters"].items()}
        same = np.array_equal(np.load(files["weight"]), W) and \
            np.array_equal(np.load(files["bias"]), b)
        if comm.Get_rank() == 0:
            print(f"numpy.load: weight {W.shape} and bias {b.shape} equal to the saved arrays: "
                  f"{same} (saved from grid {saved[0]}x{saved[1]})")
        return 0 if same else 1
    grid = None
    try:
        grid = tpmpi.ProcessGrid(comm, shape=args.grid)
        cls = getattr(tpmpi, LAYERS[args.layer])
        if args.action == "save":
            layer = cls.from_dense(W, b, grid=grid)
            tpmpi.save_checkpoint(args.path, layer)
        else:
            layer = cls.load_checkpoint(args.path, grid=grid)
    except ValueError as exc:
        if grid is not None:
            grid.free()
        raise launch.UsageError(f"{args.action} --layer {args.layer}: {exc}") from None
    ok = np.array_equal(layer.weight, W[layer.shard]) and np.array_equal(layer.bias,
                                                                         b[layer.bias_slice])
    rows, cols = layer.shard
    shards = grid.comm.gather((grid.rank, rows.start, rows.stop, cols.start, cols.stop, ok))
    if grid.rank == 0:
        print(f"{args.action} {args.layer} on grid {grid.label} ({grid.size} ranks): " + ", ".join(
            f"rank {r} W[{a}:{z}, {c}:{d}] {'ok' if good else 'WRONG'}"
            for r, a, z, c, d, good in shards))
    ok = grid.comm.allreduce(ok, op=MPI.LAND)
    grid.free()
    return 0 if ok else 1


if __name__ == "__main__":
    launch.run(main, PROG)
