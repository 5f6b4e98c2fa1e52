"""Failed writes on one rank, for real: tests/failwrite.c (an ``LD_PRELOAD`` shim that makes
``write``/``pwrite``/``fsync``/``ftruncate`` of one file fail with ENOSPC or EIO on one rank)
compiled with gcc at test time, and the save job that uses it:

    mpiexec -n P -genv LD_PRELOAD $(python tests/failwrite.py --build) \\
        python tests/failwrite.py PATH

runs every case of :data:`CASES` in turn on a checkpoint at PATH: a first save (no fault), then a
second save with the case's fault switched on (the shim reads its variables at each call, so
one job runs every case), then, faults off, a load of what the path holds. Rank 0 prints one
JSON line per case: whether the fault fired (a rank that leaves its I/O to another rank's
collective buffering never calls the failing write), the message each rank got, which version
loads afterwards (1: the first, intact; 2: the second) and the directory's contents.
tests/test_checkpoint_faults.py runs it under MPICH and Open MPI at 2 and 4 ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "failwrite.c")
ENOSPC, EIO = 28, 5

# (label, layer kind, calls that fail, file pattern under the checkpoint, rank ("last" or 0),
#  the matching call that fails first, errno): a header (rank 0's first write), rank 0's data
#  block (its second), the last rank's block of a row layer's weight and of a column layer's bias
#  (written by that rank unless the library's collective buffering has an aggregator write
#  them: then the fault does not fire and the save must succeed), a sync (ROMIO opens and syncs
#  the file on its aggregators only: rank 0), a resize, rank 0's manifest, rank 0's lock
CASES = [
    ("header write, rank 0, ENOSPC", "column", "write", "v*/weight.npy", 0, 1, ENOSPC),
    ("data write, rank 0, ENOSPC", "row", "write", "v*/weight.npy", 0, 2, ENOSPC),
    ("data write, last rank, ENOSPC", "row", "write", "v*/weight.npy", "last", 1, ENOSPC),
    ("data write, last rank, EIO", "column", "write", "v*/bias.npy", "last", 1, EIO),
    ("fsync, rank 0, EIO", "column", "fsync", "v*/weight.npy", 0, 1, EIO),
    ("resize, rank 0, EIO", "column", "truncate", "v*/bias.npy", 0, 1, EIO),
    ("manifest write, rank 0, ENOSPC", "column", "write", ".manifest.json.tmp-*", 0, 1, ENOSPC),
    ("lock write, rank 0, ENOSPC", "column", "write", ".lock", 0, 1, ENOSPC),
]


def build(folder: Optional[str] = None) -> str:
    """Compile the shim into ``folder`` (default: a temporary directory); its path.
    RuntimeError (with gcc's output) when gcc is missing or fails."""
    out = os.path.join(folder or tempfile.mkdtemp(prefix="failwrite-"), "failwrite.so")
    try:
        done = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", out, SOURCE,
                               "-ldl"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("gcc is not installed") from None
    if done.returncode:
        raise RuntimeError(f"gcc failed: {done.stderr}")
    return out


def _fault(path: str, calls: str, pattern: str, rank: int, nth: int, err: int, log: str
           ) -> None:
    os.environ.update(FAILWRITE_CALLS=calls, FAILWRITE_PATH=os.path.join(path, pattern),
                      FAILWRITE_RANK=str(rank), FAILWRITE_NTH=str(nth),
                      FAILWRITE_ERRNO=str(err), FAILWRITE_LOG=log)


def _no_fault() -> None:
    os.environ.pop("FAILWRITE_PATH", None)


def main(path: str) -> int:
    import numpy as np
    from mpi4py import MPI

    sys.path.insert(0, os.path.dirname(HERE))
    import tpmpi
    from jobs import listing

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((64, 48)).astype(np.float32), np.ones(48, np.float32)
    grid = tpmpi.ProcessGrid(comm)
    for i, (label, kind, calls, pattern, who, nth, err) in enumerate(CASES):
        cls = tpmpi.ColumnParallelLinear if kind == "column" else tpmpi.RowParallelLinear
        where, log = os.path.join(path, f"case{i}"), os.path.join(path, f"case{i}.log")
        _no_fault()
        tpmpi.save_checkpoint(where, cls.from_dense(W, b, grid=grid))
        _fault(where, calls, pattern, size - 1 if who == "last" else 0, nth, err, log)
        try:
            tpmpi.save_checkpoint(where, cls.from_dense(W + 1, b, grid=grid))
            message = None
        except ValueError as exc:
            message = str(exc)
        _no_fault()
        messages = comm.allgather(message)
        held = cls.load_checkpoint(where, grid=grid).gather_weight()
        version = 1 if np.array_equal(held, W) else 2 if np.array_equal(held, W + 1) else None
        if rank == 0:
            print(json.dumps({"case": label, "fired": os.path.exists(log), "messages": messages,
                              "loads": version, "listing": listing(where)}), flush=True)
    grid.free()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--build"]:
        print(build())
        sys.exit(0)
    sys.exit(main(sys.argv[1]))
