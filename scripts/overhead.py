#!/usr/bin/env python
"""tpmpi overhead per ColumnParallelLinear forward call.

    mpiexec -n 2 python scripts/overhead.py [--m 8 --k 4096 --n 4096 --iters 20 --repeats 100]

overhead = forward time - local GEMM (+ bias) time - the bare collective's time, where the bare
collective is the same Alltoallw (same buffers, same subarray datatypes) called directly, and
each is timed alone, back-to-back, as the best of ``--repeats`` interleaved blocks of
``--iters`` calls, each block the slowest rank's (``tpmpi.studies.timing.time_calls``). Target:
under 100 us. Two more robust variants are printed: with the GEMM time measured inside the same
forward calls (the layer's profiler), and forward minus a hand-written loop doing the same
GEMM, bias add and Alltoallw (it suffers the same rank skew, so the difference is what tpmpi
adds). Also the bare Allgather of the same bytes and,
with ``--profile``, rank 0's cProfile of the forward loop.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
from mpi4py import MPI

import tpmpi
from tpmpi.core.args import int_flag
from tpmpi.core.comm import alltoallw_args
from tpmpi.core.partition import largest_block
from tpmpi.studies.timing import time_calls


def per_call(fns: dict[str, Callable[[], object]], comm: MPI.Comm, iters: int,
             repeats: int) -> dict[str, float]:
    """Per function: the best over ``repeats`` samples of the mean time of ``iters``
    back-to-back calls, each sample the slowest rank's (:func:`tpmpi.studies.timing.time_calls`; the
    functions' samples interleaved, so that load from other processes hits them alike)."""
    samples = time_calls(list(fns.values()), comm, iters=repeats, warmup=3, repeat=iters)
    return {name: float(row.min()) for name, row in zip(fns, samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int_flag(), default=8)
    ap.add_argument("--k", type=int_flag(), default=4096)
    ap.add_argument("--n", type=int_flag(), default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int_flag(), default=20)
    ap.add_argument("--repeats", type=int_flag(), default=100)
    ap.add_argument("--profile", action="store_true", help="cProfile the forward loop (rank 0)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    threads = tpmpi.configure_blas_threads(comm)
    grid = tpmpi.ProcessGrid(comm)
    layer = tpmpi.ColumnParallelLinear(args.k, args.n, grid=grid, dtype=args.dtype)
    x = tpmpi.init_weight((args.m, args.k), 1001, args.dtype, bound=1.0)
    y_local = np.empty((args.m, layer.weight.shape[1]), dtype=args.dtype)
    y = np.empty((args.m, args.n), dtype=args.dtype)

    def gemm() -> None:
        np.matmul(x, layer.weight, out=y_local)
        np.add(y_local, layer.bias, out=y_local)

    (send, recv), = alltoallw_args(y_local, y, layer.y_map.blocks(y), comm.Get_rank())
    item = y.dtype.itemsize
    widest = largest_block(args.n, comm.Get_size())  # rank 0's block of the N columns
    ag_send = np.empty(args.m * widest, dtype=args.dtype)
    ag_recv = np.empty(ag_send.size * comm.Get_size(), dtype=args.dtype)
    timings = per_call({"forward": lambda: layer(x), "gemm": gemm,
                        "alltoallw": lambda: comm.Alltoallw(send, recv),
                        "raw": lambda: (gemm(), comm.Alltoallw(send, recv)),
                        "allgather": lambda: comm.Allgather(ag_send, ag_recv)},
                       comm, args.iters, args.repeats)
    overhead = timings["forward"] - timings["gemm"] - timings["alltoallw"]
    # the same, with the GEMM time taken inside the very forward calls (layer.profiler), which
    # cancels the GEMM's run-to-run noise on a loaded machine
    prof = layer.attach_profiler()
    fwd, gemm_in = time_calls([lambda: layer(x)], comm, iters=args.repeats, repeat=args.iters,
                              readings=lambda: (prof.gemm_s,))
    inside = float((fwd - gemm_in / args.iters).min()) - timings["alltoallw"]
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        comm.Barrier()
        prof.enable()
        for _ in range(args.iters * args.repeats):
            layer(x)
        prof.disable()
        if comm.Get_rank() == 0:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if comm.Get_rank() == 0:
        print(f"ColumnParallelLinear forward, M={args.m} K={args.k} N={args.n} {args.dtype}, "
              f"P={comm.Get_size()}, {threads} BLAS thread(s)/rank, "
              f"{args.m * args.n * item / 1024:.0f} KiB gathered")
        for name, t in timings.items():
            print(f"  {name:10s} {t * 1e6:10.1f} us")
        print(f"  tpmpi overhead per call = forward - gemm - alltoallw = {overhead * 1e6:.1f} us "
              f"({'under' if overhead < 100e-6 else 'OVER'} the 100 us target)")
        print(f"  same, GEMM timed inside the forward calls: {inside * 1e6:.1f} us")
        print(f"  forward - raw (hand-written GEMM + bias + the same Alltoallw, no tpmpi): "
              f"{(timings['forward'] - timings['raw']) * 1e6:.1f} us")
    grid.free()


if __name__ == "__main__":
    main()
