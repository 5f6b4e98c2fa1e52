"""A save job for tests/test_checkpoint_crash.py, run under ``mpiexec``:

    checkpoint_driver.py PATH SEED [--kib K] [--kill STEP --rank R] [--repeat N]

saves a ColumnParallelLinear (K KiB of float32 weights made from SEED by :func:`dense`, the
seed increased by one per repeat) to PATH. ``--kill``: rank R ends itself with ``os._exit(9)`` when
the save reaches STEP (a crash there). ``--repeat``: save N times, a save refused because
another job holds the path's lock counted. At the end rank 0 prints one JSON line (nothing when
a rank was killed): {"steps": [[steps rank 0 reached], [rank 1's], ...], "saved": [seeds],
"refused": n}.
"""
import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import tpmpi
import tpmpi.checkpoint.save as ck

N_COLS = 64


def dense(kib: int, seed: int):
    """The global float32 W (``kib`` KiB, N_COLS columns) and b of ``seed``: every element
    exact in float32 and telling both the seed and its position (a misplaced or mixed block
    shows), cheap to make at any size."""
    k = max(1, kib * 1024 // 4 // N_COLS)
    W = (np.arange(k * N_COLS, dtype=np.int64) % 4096 + seed * 4096).astype(np.float32)
    return W.reshape(k, N_COLS), np.arange(N_COLS, dtype=np.float32) - seed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("seed", type=int)
    parser.add_argument("--kib", type=int, default=16)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    reached = []

    def hook(step: str) -> None:
        reached.append(step)
        if step == args.kill and rank == args.rank:
            os._exit(9)

    ck.STEP_HOOK = hook
    grid = tpmpi.ProcessGrid(comm)
    saved, refused = [], 0
    for i in range(args.repeat):
        layer = tpmpi.ColumnParallelLinear.from_dense(*dense(args.kib, args.seed + i), grid=grid)
        try:
            tpmpi.save_checkpoint(args.path, layer)
            saved.append(args.seed + i)
        except ValueError as exc:
            if "is being saved by another job" not in str(exc):
                raise
            refused += 1
    steps, outcomes = comm.gather(reached), comm.gather((saved, refused))
    if rank == 0:  # the job's one line (none when a rank was killed)
        assert all(o == outcomes[0] for o in outcomes), outcomes  # every rank saw the same
        print(json.dumps({"steps": steps, "saved": saved, "refused": refused}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
