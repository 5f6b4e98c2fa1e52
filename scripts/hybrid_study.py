#!/usr/bin/env python
"""Measured vs predicted time of the FFN on every dp x tp mesh of the job's ranks.

    mpiexec -n 4 python scripts/hybrid_study.py [--m 2048 --k 256 --hidden 1024 --iters 10]
        [--bucket-bytes B] [--calibration calib.json] [--measure-overlap] [--json FILE]

For every mesh (dp replicas x a TP grid of P/dp ranks) and FFN mode (megatron, book and
sequence on 1D grids, tile2d on every grid; one run when the TP group is a single rank) it runs
one verified forward + backward benchmark (``tpmpi.studies.bench.run_case``; each replica takes M/dp
rows, gradients averaged by DataParallel) and prints the median time next to the cost model's
prediction, the exposed TP and DP communication, the DP bytes per rank, then the layouts
ranked by measured and by predicted time and ``plan``'s first choice. Timings on a shared or
oversubscribed machine are noisy: rerun on a quiet one (and with a ``calibrate`` file).
"""
from __future__ import annotations

import argparse

from mpi4py import MPI

from tpmpi.core.args import int_flag
from tpmpi.core.backend import configure_blas_threads, get_backend
from tpmpi.studies.bench import run_case
from tpmpi.studies.costmodel import explain, layout_label, load_calibration, plan
from tpmpi.layers.data_parallel import BUCKET_BYTES
from tpmpi.core.mesh import Mesh, mesh_shapes
from tpmpi.studies.record import write_record
from tpmpi.studies.schemes import Problem


def layouts(ranks: int) -> list[tuple[int, tuple[int, int], str]]:
    """``(dp, TP grid, mode)`` of every mesh and FFN mode worth running on ``ranks``."""
    out = []
    for dp, grid in mesh_shapes(ranks):
        t = grid[0] * grid[1]
        modes = ["megatron"] if t == 1 else (["megatron", "book", "sequence"] if grid[0] == 1
                                             else [])
        out += [(dp, grid, mode) for mode in modes + (["tile2d"] if t > 1 else [])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int_flag(), default=2048, help="rows (tokens) of the whole batch")
    ap.add_argument("--k", type=int_flag(), default=256, help="d_model")
    ap.add_argument("--hidden", type=int_flag(), default=1024, help="d_hidden")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int_flag(), default=10)
    ap.add_argument("--warmup", type=int_flag(), default=2)
    ap.add_argument("--bucket-bytes", type=int_flag(), default=BUCKET_BYTES)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--measure-overlap", action="store_true",
                    help="also the OSU overlap of the DP Allreduce with backward")
    ap.add_argument("--json", default=None, help="append the records (JSON lines)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()
    backend = get_backend("auto", comm)
    configure_blas_threads(comm)
    cal = load_calibration(args.calibration)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"FFN m={args.m} d_model={args.k} hidden={args.hidden} {args.dtype}, forward + "
        f"backward, {ranks} ranks, DP buckets of {args.bucket_bytes:,} bytes; times in ms "
        f"(max over ranks, median of {args.iters}); noisy on a shared machine")
    head = (f"{'layout':34} {'measured':>9} {'predicted':>9} {'ratio':>6} {'tp_comm':>8} "
            f"{'dp_comm':>8} {'dp_MiB':>7} {'err':>8}" + ("  dp hidden" if args.measure_overlap
                                                             else ""))
    say(head)
    rows = []
    for dp, grid, mode in layouts(ranks):
        opts = () if mode == "megatron" else (("mode", mode),)
        problem = Problem(scheme="mlp", m=args.m, k=args.k, n=args.k, hidden=args.hidden,
                          dtype=args.dtype, backward=True, options=opts)
        with Mesh(comm, dp=dp, tp=grid) as mesh:
            rec = run_case(problem, mesh if dp > 1 else mesh.tp, backend, warmup=args.warmup,
                           iters=args.iters, calibration=cal, overlap=args.measure_overlap,
                           bucket_bytes=args.bucket_bytes)
        pred = rec["predicted"]
        label = layout_label("mlp", grid, dp, dict(opts))
        measured, predicted = rec["time_s"]["median"], rec["predicted_s"]
        rows.append((label, measured, predicted))
        hidden = (rec.get("overlap") or {}).get("dp")
        say(f"{label:34} {measured * 1e3:9.3f} {predicted * 1e3:9.3f} "
            f"{predicted / measured:6.2f} {rec['comm_s'] * 1e3:8.3f} "
            f"{rec['dp_comm_s'] * 1e3:8.3f} {rec['dp_bytes'] / 2**20:7.3f} "
            f"{rec['max_rel_err']:8.1e}" + (f"  {hidden['overlap_pct']:5.1f}%" if hidden else
                                            ("      -" if args.measure_overlap else ""))
            + ("" if pred else " (no prediction)"))
        if rank == 0 and args.json:
            with open(args.json, "a") as fh:
                write_record(rec, fh)
    by_measured = [r[0] for r in sorted(rows, key=lambda r: r[1])]
    by_predicted = [r[0] for r in sorted(rows, key=lambda r: r[2])]
    say("ranked by measured time : " + " < ".join(by_measured))
    say("ranked by predicted time: " + " < ".join(by_predicted))
    preds = plan(args.m, args.k, args.k, ranks, hidden=args.hidden, dtype=args.dtype,
                 backward=True, backend=backend.name, calibration=cal,
                 bucket_bytes=args.bucket_bytes)
    say(f"plan's first choice: {preds[0].label} (measured fastest: {by_measured[0]})")
    say(explain(preds))


if __name__ == "__main__":
    main()
