"""A save job for tests/test_checkpoint_crash.py, run under ``mpiexec``:

    checkpoint_driver.py PATH SEED [--kib K] [--kill STEP --rank R] [--repeat N] [--steps]

saves a ColumnParallelLinear (K KiB of float32 weights, initialised from SEED, the seed
increased by one per repeat) to PATH. ``--kill``: rank R ends itself with ``os._exit(9)`` when
the save reaches STEP (a crash there). ``--steps``: print the steps each rank reaches.
``--repeat``: save N times, a save refused because another job holds the path's lock counted;
prints one JSON line per rank {"saved": [...seeds], "refused": n}.
"""
import argparse
import json
import os
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import tpmpi  # noqa: E402
import tpmpi.checkpoint as ck  # noqa: E402

N_COLS = 64


def shape(kib: int) -> tuple:
    """(K, N) of a float32 weight of ``kib`` KiB."""
    return (max(1, kib * 1024 // 4 // N_COLS), N_COLS)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("seed", type=int)
    parser.add_argument("--kib", type=int, default=16)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--steps", action="store_true")
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
        layer = tpmpi.ColumnParallelLinear(*shape(args.kib), grid=grid, seed=args.seed + i)
        try:
            tpmpi.save_checkpoint(args.path, layer)
            saved.append(args.seed + i)
        except ValueError as exc:
            if "is being saved by another job" not in str(exc):
                raise
            refused += 1
    if args.steps:
        print(json.dumps({"rank": rank, "steps": reached}), flush=True)
    if args.repeat > 1:
        print(json.dumps({"rank": rank, "saved": saved, "refused": refused}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
