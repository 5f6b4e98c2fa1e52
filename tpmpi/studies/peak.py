"""The device's measured GEMM peak, and a run record's local GEMM throughput as a fraction of it.

``python -m tpmpi.studies.peak --backend cupy --dtype float16 --n 8192 [--records runs.jsonl]``
times one big square GEMM alone on one process (cuBLAS on a GPU, the BLAS on a CPU) and prints its
GFLOP/s as one JSON line; with ``--records`` it also prints, for each record of that dtype and
backend, the fraction of that peak that the record's local GEMMs reached.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

from ..core.args import int_flag
from ..core.arrays import DTypeLike
from ..core.backend import BACKENDS, Backend, blas_info, get_backend
from ..core.dtypes import SUPPORTED
from ..core.init import init_weight
from .record import write_record
from .timing import time_calls


def gemm_peak(backend: Backend, n: int = 8192, dtype: DTypeLike = "float32", *,
              warmup: int = 2, iters: int = 5) -> float:
    """Best GFLOP/s of ``n x n @ n x n`` over ``iters`` timed products (after ``warmup``),
    each bracketed by stream syncs (:func:`tpmpi.studies.timing.time_calls` on this process)."""
    a = init_weight((n, n), 1, dtype, backend=backend, bound=1.0)
    b = init_weight((n, n), 2, dtype, backend=backend, bound=1.0)
    out = backend.xp.empty((n, n), dtype=a.dtype)
    times = time_calls([lambda: backend.xp.matmul(a, b, out=out)], sync=backend.synchronize,
                       warmup=warmup, iters=iters)
    return 2.0 * n ** 3 / float(times.min()) / 1e9


def gemm_fraction(record: dict, peak_gflops: float) -> Optional[float]:
    """Per-rank local GEMM throughput of a run record over ``peak_gflops``.

    The record's total flops (``gflops`` x median time) split over its ranks, divided by
    ``gemm_s`` (per-iteration time in local products, max over ranks); None when the record
    has no GEMM time."""
    if not record.get("gemm_s") or not record.get("gflops") or peak_gflops <= 0:
        return None
    flops_per_rank = record["gflops"] * 1e9 * record["time_s"]["median"] / record["ranks"]
    return flops_per_rank / record["gemm_s"] / 1e9 / peak_gflops


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tpmpi.studies.peak",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--dtype", choices=SUPPORTED, default="float32")
    parser.add_argument("--n", type=int_flag(), default=8192)
    parser.add_argument("--iters", type=int_flag(), default=5)
    parser.add_argument("--records", metavar="FILE", help="JSON-lines run records to rate")
    args = parser.parse_args(argv)
    backend = get_backend(args.backend)
    peak = gemm_peak(backend, args.n, args.dtype, iters=args.iters)
    write_record({"peak_gflops": peak, "n": args.n, "dtype": args.dtype,
                  "backend": backend.name, "blas": blas_info(backend)}, sys.stdout)
    if args.records:
        with open(args.records) as fh:
            for rec in map(json.loads, filter(str.strip, fh)):
                if rec.get("dtype") == args.dtype and rec.get("backend") == backend.name:
                    row = {key: rec.get(key) for key in
                           ("scheme", "ranks", "grid", "m", "k", "n", "dtype", "gemm_s")}
                    write_record({**row, "gemm_fraction_of_peak": gemm_fraction(rec, peak)},
                                 sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
