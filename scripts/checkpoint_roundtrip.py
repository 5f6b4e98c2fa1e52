"""Save a column-parallel layer on one grid, load it on another, compare with numpy.load.

    mpiexec -n 4 python scripts/checkpoint_roundtrip.py save DIR --grid 2x2
    mpiexec -n 3 python scripts/checkpoint_roundtrip.py load DIR --grid 1x3
    python scripts/checkpoint_roundtrip.py verify DIR          # numpy only, no MPI I/O
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

K, N, SEED = 37, 23, 2024


def dense() -> tuple[np.ndarray, np.ndarray]:
    """Weights unrelated to the layer's initialiser, so a load cannot pass by re-initialising."""
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((K, N)), rng.standard_normal(N)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "load", "verify"])
    ap.add_argument("path")
    ap.add_argument("--grid", default=None, help="RxC (default 1xP)")
    args = ap.parse_args()
    W, b = dense()
    if args.action == "verify":
        same = np.array_equal(np.load(os.path.join(args.path, "weight.npy")), W) and \
            np.array_equal(np.load(os.path.join(args.path, "bias.npy")), b)
        with open(os.path.join(args.path, "manifest.json")) as f:
            saved = json.load(f)["grid"]
        print(f"numpy.load: weight {W.shape} and bias {b.shape} equal to the saved arrays: "
              f"{same} (saved from grid {saved[0]}x{saved[1]})")
        return 0 if same else 1
    from mpi4py import MPI

    import tpmpi

    grid = tpmpi.ProcessGrid(MPI.COMM_WORLD, shape=args.grid)
    if args.action == "save":
        layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
        tpmpi.save_checkpoint(args.path, layer)
    else:
        layer = tpmpi.ColumnParallelLinear.load_checkpoint(args.path, grid=grid)
    ok = np.array_equal(layer.weight, W[layer.shard]) and np.array_equal(layer.bias,
                                                                         b[layer.bias_slice])
    shards = grid.comm.gather((grid.rank, layer.shard[1].start, layer.shard[1].stop, ok))
    if grid.rank == 0:
        print(f"{args.action} on grid {grid.label} ({grid.size} ranks): " + ", ".join(
            f"rank {r} W[:, {a}:{z}] {'ok' if good else 'WRONG'}" for r, a, z, good in shards))
    return 0 if grid.comm.allreduce(ok, op=MPI.LAND) else 1


if __name__ == "__main__":
    sys.exit(main())
