"""Synthetic result records shaped like real sweeps, for report and plot tests (no timing).

``laptop(np)``: what ``scripts/sweep_laptop.sh NP`` writes (every scheme, m = 8, 256, 2048,
k = n = 4096, P = 1, 2, 4, ..., NP, and the collective sweep 8 B - 32 MiB);
``cluster()``: a 64-rank study (P = 1 ... 64, seven layouts, four sizes);
``crowded(n)``: ``n`` series in ONE panel (options x dtypes x schemes).
Times follow a simple alpha-beta-gamma model with a seeded +-5 % spread.
"""
from __future__ import annotations

import itertools
import random
from typing import Optional

from tpmpi.studies.costmodel import square_grid

OPS = ("allgather", "allreduce", "reduce_scatter", "bcast")


def record(scheme: str, ranks: int, m: int, k: int = 4096, n: int = 4096, *,
           options: Optional[dict] = None, dtype: str = "float32",
           hidden: Optional[int] = None, grid: Optional[str] = None,
           rng: Optional[random.Random] = None, kind: str = "strong",
           backward: bool = False) -> dict:
    """One scheme record with the fields report reads (DESIGN.md names)."""
    rng = rng or random.Random(0)
    options = options or {}
    flops = 2.0 * m * k * n * (4 if scheme == "mlp" else 1) * (3 if backward else 1)
    comm_factor = {"column": 1.0, "row": 1.6, "mlp": 2.2, "tile2d": 0.5 * ranks ** 0.5}[scheme]
    comm_factor *= 0.5 if options.get("chunks") else 1.0
    comm_factor *= {"float64": 2.0, "float16": 0.5}.get(dtype, 1.0)
    gemm = flops / ranks / (50e9 if dtype != "float16" else 2e9) * \
        (1.15 if options.get("panel") else 1.0) + 2e-5
    comm = 0.0 if ranks == 1 else 2e-5 * ranks ** 0.5 + comm_factor * 4.0 * m * n / 5e9
    med = (gemm + comm) * 1.08
    spread = {}
    for key, value in (("gemm_s", gemm), ("comm_s", comm), ("time_s", med)):
        lo, hi = value * (1 - 0.05 * rng.random()), value * (1 + 0.08 * rng.random())
        spread[key] = {"median": value, "min": lo, "max": hi}
    if grid is None:
        grid = "{}x{}".format(*(square_grid(ranks) if scheme == "tile2d" else (1, ranks)))
    return {"scheme": scheme, "ranks": ranks, "grid": grid, "m": m, "k": k, "n": n,
            "hidden": hidden if hidden is not None else (4 * k if scheme == "mlp" else None),
            "dtype": dtype, "backend": "numpy", "threads_per_rank": 1, "iters": 10,
            "warmup": 2, "backward": backward, "options": options,
            "time_s": spread.pop("time_s"), "gemm_s": gemm, "comm_s": comm,
            "spread": dict(spread, baseline_s=None, fwd_s=None, bwd_s=None),
            "gflops": flops / med / 1e9, "algbw_gbs": 3.0, "busbw_gbs": 1.5,
            "mem_peak_bytes": (m * k + k * n // ranks + m * n) * 4,
            "max_rel_err": 1e-6, "tolerance": 1e-4, "predicted_s": med * rng.uniform(0.6, 1.5),
            "baseline_s": None, "speedup": None, "efficiency": None, "flags": [],
            "sweep": {"kind": kind, "dim": "m"}}


def collectives(ranks, sizes=None) -> list[dict]:
    """Collective records of ``bench --collective`` for every op of :data:`OPS`."""
    sizes = sizes or [8 * 4 ** i for i in range(12)]  # 8 B .. 32 MiB
    out = []
    for op, p, size in itertools.product(OPS, ranks, sizes):
        t = 5e-6 * p + size / 4e9
        out.append({"collective": op, "ranks": p, "size": size, "count": size // 4,
                    "dtype": "float32", "time_s": t, "algbw_gbs": size / t / 1e9,
                    "busbw_gbs": size / t / 1e9 * (2 * (p - 1) / p), "wrong": 0})
    return out


def _powers(top: int) -> list[int]:
    return [2 ** i for i in range(top.bit_length()) if 2 ** i <= top]


def laptop(np_: int = 2) -> list[dict]:
    """scripts/sweep_laptop.sh NP: strong records of every scheme plus collectives."""
    rng = random.Random(np_)
    recs = [record(s, p, m, rng=rng) for p in _powers(np_) for m in (8, 256, 2048)
            for s in ("column", "mlp", "row", "tile2d")]
    return recs + collectives([np_])


def cluster(top: int = 64) -> list[dict]:
    """A 64-rank study: seven layouts x four sizes x P = 1 ... 64, collectives at every P."""
    rng = random.Random(top)
    layouts = [("column", {}), ("column", {"chunks": 4}), ("row", {}), ("mlp", {}),
               ("mlp", {"mode": "book"}), ("tile2d", {}), ("tile2d", {"panel": 512})]
    recs = [record(s, p, m, options=o, rng=rng) for p in _powers(top)
            for m in (8, 256, 2048, 16384) for s, o in layouts]
    return recs + collectives(_powers(top)[1:])


def crowded(count: int = 20) -> list[dict]:
    """``count`` series in one panel: (scheme, options, dtype) combinations at P = 1, 2, 4."""
    rng = random.Random(count)
    combos = list(itertools.product(
        [("column", {}), ("column", {"chunks": 2}), ("column", {"chunks": 4}), ("row", {}),
         ("tile2d", {}), ("tile2d", {"panel": 256}), ("tile2d", {"panel": 1024})],
        ("float32", "float64", "float16")))[:count]
    return [record(s, p, 1024, options=o, dtype=d, rng=rng, grid=f"1x{p}")
            for (s, o), d in combos for p in (1, 2, 4)]
