"""Memory a run needs per rank, from the layouts of the arrays its scheme holds, so that the CLI
can refuse a problem that cannot fit before allocating anything.

The figure is a lower bound: the inputs, parameters, outputs and (with backward) gradients of
the timed step at their layouts' block sizes on the rank holding the largest blocks, in the
problem's dtype. Temporaries, the float64 verification and the serial baseline come on top.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from .layout import block_bounds
from .schemes import Problem

Array = tuple[tuple[int, ...], str]  # (global shape, layout)


def _arrays(p: Problem) -> Optional[list[Array]]:
    """The arrays a run of ``p`` holds, or None for a scheme this table does not know."""
    m, k, n = p.m, p.k, p.n
    if p.scheme == "column":
        fwd = [((m, k), "replicated"), ((k, n), "cols"), ((n,), "cols"), ((m, n), "cols"),
               ((m, n), "replicated")]
        bwd = [((m, n), "replicated"), ((m, k), "replicated"), ((k, n), "cols"), ((n,), "cols")]
    elif p.scheme == "row":
        fwd = [((m, k), "replicated"), ((k, n), "rows"), ((n,), "replicated"),
               ((m, n), "replicated")]
        bwd = [((m, n), "replicated"), ((m, k), "cols"), ((m, k), "replicated"),
               ((k, n), "rows"), ((n,), "replicated")]
    elif p.scheme == "tile2d":
        fwd = [((m, k), "tiles"), ((k, n), "tiles"), ((n,), "tiles"), ((m, n), "tiles")]
        bwd = [((m, n), "tiles"), ((m, k), "tiles"), ((k, n), "tiles"), ((n,), "tiles")]
    elif p.scheme == "mlp" and p.opts.get("mode") == "tile2d":  # every array in tiles
        h = p.hidden if p.hidden is not None else 4 * k
        fwd = [((m, k), "tiles"), ((k, h), "tiles"), ((h,), "tiles"), ((m, h), "tiles"),
               ((m, h), "tiles"), ((h, k), "tiles"), ((k,), "tiles"), ((m, k), "tiles")]
        bwd = [((m, k), "tiles"), ((m, h), "tiles"), ((m, k), "tiles"), ((k, h), "tiles"),
               ((h, k), "tiles")]
    elif p.scheme == "mlp":
        h = p.hidden if p.hidden is not None else 4 * k
        hidden = "replicated" if p.opts.get("mode") == "book" else "cols"
        io = "rows" if p.opts.get("mode") == "sequence" else "replicated"  # x, y, dx, dy
        fwd = [((m, k), io), ((k, h), "cols"), ((h,), "cols"), ((m, h), hidden),
               ((m, h), hidden), ((h, k), "rows" if hidden == "cols" else "cols"),
               ((k,), "replicated"), ((m, k), io)]
        bwd = [((m, k), io), ((m, h), hidden), ((m, k), io),
               ((k, h), "cols"), ((h, k), "rows" if hidden == "cols" else "cols")]
    else:
        return None
    return fwd + (bwd if p.backward else [])


def bytes_per_rank(p: Problem, grid_shape: tuple[int, int]) -> Optional[int]:
    """Lower bound of the bytes a run of ``p`` holds on the rank with the largest blocks (grid
    coordinates (0, 0): block partitions give the first parts the remainder); None for an
    unknown scheme."""
    arrays = _arrays(p)
    if arrays is None:
        return None
    item = 2 if p.dtype == "bfloat16" else np.dtype(p.dtype).itemsize  # no ml_dtypes needed
    total = 0
    for shape, layout in arrays:
        bounds = block_bounds(shape, grid_shape, (0, 0), layout)
        total += math.prod(b - a for a, b in bounds) * item
    return total


def host_available() -> Optional[int]:
    """``MemAvailable`` of this node in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(nbytes: float) -> str:
    """``"1.5 GiB"``."""
    return f"{nbytes / 2**30:.3g} GiB"
