"""Memory a run needs per rank, from the layouts its layers declare, so that the CLI can refuse a
problem that cannot fit before allocating anything.

The figure is a lower bound of a run's peak: every array the timed step allocates (transients
included) at its layout's block size on the rank holding the largest blocks, in the problem's
dtype; the verification (float64 copies of global arrays) and the serial baseline come on top, as
do temporaries of the array library. A linear layer (:class:`~tpmpi.core.layout.LinearLayouts`)
holds x; x gathered for the GEMM when its input operator allocates
(:attr:`tpmpi.core.mappings.Mapping.allocates`); the copy of its input it keeps for backward
(:func:`tpmpi.layers.base.enter_array`: x's block, or the block the GEMM reads when that is a view
of x; not fc2's in a composite, whose input is the composite's own activation); W, b; the GEMM's
output; y when its output operator allocates; with backward dy (and dy gathered), x gathered again,
the GEMM's dx, dx when the adjoint of the input operator allocates, and the gradients of W and b. A
composite (:class:`~tpmpi.ParallelMLP`) chains its children through the activation (one more array
forward, its gradient backward), each child's x being the previous one's activation. A layer class
adds what its layouts do not show (:meth:`tpmpi.layers.base.ParallelLinear.workspace_elements`:
the tile scheme's panels).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import numpy as np

from ..core.layout import LinearLayouts, block_bounds
from ..core.mappings import mapping_class
from ..layers import ColumnParallelLinear, ParallelLinear, ParallelMLP, RowParallelLinear, \
    TileParallelLinear

Array = tuple[tuple[int, ...], str]  # (global shape, layout)

SCHEME_LAYERS: dict[str, type[Union[ParallelLinear, ParallelMLP]]] = {
    "column": ColumnParallelLinear, "row": RowParallelLinear, "tile2d": TileParallelLinear,
    "mlp": ParallelMLP}
"""The layer class each scheme of the CLI runs."""


def _allocates(src: str, dst: str, adjoint: bool = False) -> bool:
    """Whether the operator from layout ``src`` to ``dst`` (or its adjoint) makes a new array."""
    cls = mapping_class(src, dst)
    return (cls.adjoint_class if adjoint else cls).allocates


def linear_arrays(lay: LinearLayouts, m: int, k: int, n: int, backward: bool,
                  copy_input: bool = True) -> tuple[list[Array], list[Array]]:
    """(forward, backward) arrays of a (k, n) linear layer on an (m, k) input, besides its x
    (forward) and dy (backward); ``copy_input``: the layer keeps a copy of its input."""
    gathers = _allocates(lay.x, lay.x_local)
    fwd: list[Array] = [((m, k), lay.x if gathers else lay.x_local)] if copy_input else []
    fwd += [((m, k), lay.x_local)] if gathers else []
    fwd += [((k, n), lay.weight), ((n,), lay.bias), ((m, n), lay.y_local)]
    if _allocates(lay.y_local, lay.y):
        fwd.append(((m, n), lay.y))
    if not backward:
        return fwd, []
    bwd: list[Array] = ([((m, n), lay.y_local)] if _allocates(lay.y_local, lay.y, adjoint=True)
                        else [])
    if _allocates(lay.x, lay.x_local):  # x gathered again (not kept from forward)
        bwd.append(((m, k), lay.x_local))
    bwd.append(((m, k), lay.x_local))  # the GEMM's dx (partial sums for a replicated x)
    if _allocates(lay.x, lay.x_local, adjoint=True):
        bwd.append(((m, k), lay.x))
    return fwd, bwd + [((k, n), lay.weight), ((n,), lay.bias)]


def _workspace(p: Any, grid_shape: tuple[int, int]) -> int:
    """Elements of the workspaces of the layers of problem ``p`` (a known scheme)."""
    cls, opts = SCHEME_LAYERS[p.scheme], p.opts
    if issubclass(cls, ParallelLinear):
        return cls.workspace_elements(p.m, p.k, p.n, grid_shape, **opts)
    (cls1, opts1), (cls2, opts2) = ParallelMLP.sublayers(opts.get("mode", "megatron"))
    return (cls1.workspace_elements(p.m, p.k, p.d_hidden, grid_shape, **opts1)
            + cls2.workspace_elements(p.m, p.d_hidden, p.k, grid_shape, **opts2))


def _arrays(p: Any) -> Optional[list[Array]]:
    """The arrays a run of problem ``p`` holds, or None for a scheme this table does not
    know."""
    cls = SCHEME_LAYERS.get(p.scheme)
    if cls is None:
        return None
    m, k, n, opts = p.m, p.k, p.n, p.opts
    if issubclass(cls, ParallelLinear):
        lay = cls.layouts_for(**opts)
        fwd, bwd = linear_arrays(lay, m, k, n, p.backward)
        return [((m, k), lay.x)] + fwd + ([((m, n), lay.y)] + bwd if p.backward else [])
    h = p.d_hidden
    (cls1, opts1), (cls2, opts2) = ParallelMLP.sublayers(opts.get("mode", "megatron"))
    lay1, lay2 = cls1.layouts_for(**opts1), cls2.layouts_for(**opts2)
    fwd1, bwd1 = linear_arrays(lay1, m, k, h, p.backward)
    fwd2, bwd2 = linear_arrays(lay2, m, h, k, p.backward, copy_input=False)
    act = [((m, h), lay1.y)]  # the activation's output forward (fc2's x), its gradient backward
    return ([((m, k), lay1.x)] + fwd1 + act + fwd2
            + ([((m, k), lay2.y)] + bwd2 + act + bwd1 if p.backward else []))


def bytes_per_rank(p: Any, grid_shape: tuple[int, int]) -> Optional[int]:
    """Lower bound of the bytes a run of ``p`` (a :class:`tpmpi.studies.problem.Problem`) holds on
    the rank with the largest blocks (grid coordinates (0, 0): block partitions give the first
    parts the remainder); None for an unknown scheme."""
    arrays = _arrays(p)
    if arrays is None:
        return None
    item = 2 if p.dtype == "bfloat16" else np.dtype(p.dtype).itemsize  # no ml_dtypes needed
    total = _workspace(p, grid_shape) * item
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
