#!/usr/bin/env python
"""Where one rank's training step of a transformer block goes, measured inside the real step
(not kernels timed alone): linear GEMMs, the attention core forward and backward, each kind of
element-wise work, input copies, each collective's blocked time, and the rest (Python, residual
adds, allocation), forward and backward apart.

    mpiexec -n 2 python scripts/step_split.py                  # d=1024, 16 heads, T=512, B=4
    flock /work/.mpi.lock mpiexec -n 2 python scripts/step_split.py --json split.jsonl

Each region is timed exclusively (a region nested in another is charged to the inner one only):
``gemm`` (:meth:`tpmpi.core.gemm.LocalWork.product`, bias add included), ``colsum`` (bias
gradients), ``attn_core`` (:func:`~tpmpi.layers.attention_core.causal_attention` and its
backward), ``layer_norm``, ``gelu`` (the block's MLP activation and its gradient), ``dropout``,
``copy_input`` (:func:`tpmpi.layers.base.enter_array`), ``agree`` (the argument agreement's
wait), and per collective ``comm.<op>`` (blocked in it, or waiting for a non-blocking one).
``other`` is the step's wall time less all of these. The functions are wrapped by this script
only (the layers run unchanged). Each rank times ``--iters`` steps after ``--warmup``; one JSON
line per rank with the median over the steps of each region's seconds per step (and its share
of the step), forward and backward apart, goes to stdout (rank order) and ``--json FILE``.
``--overlap-probe`` instead times the row-parallel output's Allreduce blocking after its GEMM,
in flight during it, and pipelined over row chunks (:func:`overlap_probe`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from tpmpi.core import agreement, gemm, launch
from tpmpi.core.backend import get_backend
from tpmpi.core.grid import ProcessGrid
from tpmpi.core.launch import Parser, parse_args
from tpmpi.core.partition import block_range
from tpmpi.core.tap import Tap
from tpmpi.layers import attention, base, block
from tpmpi.layers.module import attach_tap


def faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Clock:
    """Exclusive region timer: seconds and page faults per region name in the current phase."""

    def __init__(self) -> None:
        self.phase = "forward"
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.faults: dict[tuple[str, str], int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [start, faults at start, nested time, nested faults]

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        entry = [time.perf_counter(), faults(), 0.0, 0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent, faulted = time.perf_counter() - entry[0], faults() - entry[1]
            self.totals[self.phase, name] += spent - entry[2]
            self.faults[self.phase, name] += faulted - entry[3]
            if self._stack:
                self._stack[-1][2] += spent
                self._stack[-1][3] += faulted

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.region(name):
                return fn(*args, **kwargs)
        return timed


class SplitTap(Tap):
    """The collectives' blocked and wait regions, charged to ``comm.<op>``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def wait(self, op: str) -> Any:
        return self.clock.region(f"comm.{op}")

    def blocked(self, op: str, nbytes: int, p: int) -> Any:
        return self.clock.region(f"comm.{op}")


def instrument(clock: Clock) -> list[tuple[Any, str, Any]]:
    """Wrap the block's local work (attributes the layers look up at call time); returns the
    ``(owner, name, original)`` to put back (:func:`restore`)."""
    wraps = [(gemm.LocalWork, "product", "gemm"), (gemm.LocalWork, "column_sums", "colsum"),
             (attention, "causal_attention", "attn_core"),
             (attention, "causal_attention_backward", "attn_core"),
             (block, "layer_norm", "layer_norm"), (block, "layer_norm_backward", "layer_norm"),
             (block, "dropout", "dropout"), (block.GPTMLP, "_gelu", "gelu"),
             (block.GPTMLP, "_gelu_backward", "gelu"), (base, "enter_array", "copy_input"),
             (agreement.Settle, "settle", "agree")]
    originals = []
    for owner, name, region in wraps:
        original = getattr(owner, name)
        originals.append((owner, name, original))
        setattr(owner, name, clock.wrap(region, original))
    return originals


def restore(originals: list[tuple[Any, str, Any]]) -> None:
    """Put back what :func:`instrument` wrapped."""
    for owner, name, original in originals:
        setattr(owner, name, original)


def parse(argv: Optional[list[str]], comm: MPI.Comm) -> argparse.Namespace:
    ap = Parser(prog="step_split.py", description=__doc__.splitlines()[0])
    for flag, default in (("--d-model", 1024), ("--heads", 16), ("--seq", 512), ("--batch", 4)):
        ap.add_argument(flag, type=int, default=default, help=f"the block's shape ({default})")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--label", default="", help="a free-form label copied into the records")
    ap.add_argument("--overlap-probe", action="store_true",
                    help="instead: whether an Allreduce of the row layer's output hides under "
                         "a GEMM of its size here (blocking after, non-blocking during, and in "
                         "4 pipelined chunks), one JSON line")
    ap.add_argument("--json", metavar="FILE", help="append the JSON lines to FILE")
    return parse_args(ap, argv, comm)


def main(argv: Optional[list[str]] = None) -> int:
    comm = MPI.COMM_WORLD
    a = parse(argv, comm)
    if a.overlap_probe:
        record = overlap_probe(a, comm)
    else:
        clock = Clock()
        originals = instrument(clock)
        try:
            record = measure(a, comm, clock)
        finally:
            restore(originals)
    for line in comm.gather(json.dumps(record), root=0) or []:
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(line + "\n")
    return 0


def measure(a: argparse.Namespace, comm: MPI.Comm, clock: Clock) -> dict[str, Any]:
    """Build the block on ``comm`` (1D TP), run its steps under ``clock``; the rank's record.
    Collective."""
    grid = ProcessGrid(comm, (1, comm.Get_size()))
    backend = get_backend("numpy", comm)
    blk = block.TransformerBlock(a.d_model, a.heads, layer=0, grid=grid, backend=backend,
                                 dtype="float32", sequence_parallel=a.sequence_parallel,
                                 seed=5)
    attach_tap(blk, SplitTap(clock))
    n = a.batch * a.seq
    rows = (0, n)
    if a.sequence_parallel:
        rows = block_range(n, comm.Get_size(), comm.Get_rank())
    rng = np.random.default_rng(7)
    x_all = rng.standard_normal((n, a.d_model), dtype=np.float32)
    dy_all = rng.standard_normal((n, a.d_model), dtype=np.float32)
    x, dy = x_all[rows[0]:rows[1]].copy(), dy_all[rows[0]:rows[1]].copy()
    steps: list[dict[tuple[str, str], float]] = []
    walls: list[tuple[float, float]] = []
    flts: list[tuple[dict[tuple[str, str], int], int, int]] = []
    with threadpool_limits(a.threads):
        for i in range(a.warmup + a.iters):
            drop = block.DropoutCall(a.dropout, 3, i, a.seq, 0, rows, a.d_model)
            blk.zero_grad()
            comm.Barrier()
            clock.totals.clear()
            clock.faults.clear()
            clock.phase = "forward"
            f0, t0 = faults(), time.perf_counter()
            blk.forward(x, a.batch, drop)
            f1, t1 = faults(), time.perf_counter()
            clock.phase = "backward"
            blk.backward(dy)
            f2, t2 = faults(), time.perf_counter()
            if i >= a.warmup:
                steps.append(dict(clock.totals))
                walls.append((t1 - t0, t2 - t1))
                flts.append((dict(clock.faults), f1 - f0, f2 - f1))
    return summarise(a, comm, steps, walls, flts)


def overlap_probe(a: argparse.Namespace, comm: MPI.Comm, chunks: int = 4) -> dict[str, Any]:
    """Median seconds of the MLP's c_proj forward (``(N, 4d/P) x (4d/P, d)``) with its ``(N,
    d)`` Allreduce three ways: blocking after the GEMM, one Iallreduce of the previous output
    in flight during the GEMM, and the GEMM in ``chunks`` row chunks each followed by its
    Iallreduce (waited for at the end). On a core that the GEMM keeps busy and an MPI without
    a progress thread, the non-blocking forms can hide nothing. Collective."""
    n, d, p = a.batch * a.seq, a.d_model, comm.Get_size()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4 * d // p), dtype=np.float32)
    w = rng.standard_normal((4 * d // p, d), dtype=np.float32)
    y = np.empty((n, d), dtype=np.float32)
    cut = [i * n // chunks for i in range(chunks + 1)]

    def blocking() -> None:
        np.matmul(x, w, out=y)
        comm.Allreduce(MPI.IN_PLACE, y)

    def during() -> None:
        request = comm.Iallreduce(MPI.IN_PLACE, y)
        np.matmul(x, w)
        request.Wait()

    def pipelined() -> None:
        requests = []
        for i0, i1 in zip(cut, cut[1:]):
            np.matmul(x[i0:i1], w, out=y[i0:i1])
            requests.append(comm.Iallreduce(MPI.IN_PLACE, y[i0:i1]))
        MPI.Request.Waitall(requests)

    forms = {"blocking": blocking, "during": during, "pipelined": pipelined,
             "gemm_only": lambda: np.matmul(x, w, out=y)}
    times: dict[str, list[float]] = {name: [] for name in forms}
    with threadpool_limits(a.threads):
        for i in range(a.warmup + a.iters):
            for name, form in forms.items():
                comm.Barrier()
                t0 = time.perf_counter()
                form()
                if i >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
    return {"label": a.label, "rank": comm.Get_rank(), "tp": p, "overlap_probe": True,
            "shape": [n, 4 * d // p, d], "chunks": chunks,
            **{f"{name}_s": round(statistics.median(v), 7) for name, v in times.items()}}


def summarise(a: argparse.Namespace, comm: MPI.Comm, steps: list[dict[tuple[str, str], float]],
              walls: list[tuple[float, float]],
              flts: list[tuple[dict[tuple[str, str], int], int, int]]) -> dict[str, Any]:
    """The rank's record: median seconds per step of each region and phase, ``other`` the
    rest of the phase's wall time; the last step's page faults per region and phase."""
    out: dict[str, Any] = {"label": a.label, "rank": comm.Get_rank(), "tp": comm.Get_size(),
                           "threads": a.threads, "d_model": a.d_model, "heads": a.heads,
                           "seq": a.seq, "batch": a.batch, "iters": a.iters,
                           "sequence_parallel": a.sequence_parallel, "dropout": a.dropout}
    names = sorted({name for s in steps for _, name in s})
    step_s = [f + b for f, b in walls]
    out["step_s"] = round(statistics.median(step_s), 5)
    out["step_min_s"] = round(min(step_s), 5)
    for k, phase in enumerate(("forward", "backward")):
        wall = [w[k] for w in walls]
        regions = {name: [s.get((phase, name), 0.0) for s in steps] for name in names}
        other = [w - sum(r[i] for r in regions.values()) for i, w in enumerate(wall)]
        split = {name: round(statistics.median(v), 5) for name, v in regions.items()
                 if max(v) > 0}
        split["other"] = round(statistics.median(other), 5)
        last, whole = flts[-1][0], flts[-1][1 + k]
        pages = {name: last[phase, name] for name in names if last.get((phase, name))}
        pages["other"] = whole - sum(pages.values())
        out[phase] = {"wall_s": round(statistics.median(wall), 5), "split_s": split,
                      "page_faults": pages}
    total: dict[str, float] = defaultdict(float)
    for phase in ("forward", "backward"):
        for name, v in out[phase]["split_s"].items():
            total[name] += v
    out["split_s"] = {k: round(v, 5) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
    out["share"] = {k: round(v / out["step_s"], 3) for k, v in out["split_s"].items()}
    return out


if __name__ == "__main__":
    launch.run(main, "step_split.py")
