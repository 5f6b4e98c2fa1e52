"""The layouts of a global array over a ProcessGrid, moving between them, and the layouts a
module declares for its arrays.

* ``"replicated"``: every rank holds all of it.
* ``"cols"``: last axis block-split over all ranks of the grid, in rank order (1D layers).
* ``"rows"``: first axis block-split over all ranks of the grid, in rank order.
* ``"tiles"``: first axis split over grid rows, last axis over grid columns; rank ``(r, c)``
  holds block ``(r, c)``.

A layer declares where its arrays live as data (:class:`Layouts`, :class:`LinearLayouts`,
PyTorch's ``ColwiseParallel``/``RowwiseParallel`` idea), following from its flags in one
place (its ``layouts_for``); the layers' communication (:func:`tpmpi.core.mappings.between`),
checkpoints, the memory footprint and the benchmarks' inputs read the declaration. A local
product before its reduction is :data:`PARTIAL`: every rank holds a whole-shape array of
partial sums (a declaration only; arrays are stored, gathered and saved in the four layouts).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .agreement import CALL_ORDER, Same, Text, agree_checks
from .args import check_plain_array, dtype_label
from .arrays import Array
from .backend import backend_of
from .comm import Staging, allgather_blocks
from .grid import ProcessGrid
from .partition import block_range

LAYOUTS = ("replicated", "cols", "rows", "tiles")
PARTIAL = "partial"
"""Per-rank partial sums of a replicated-shape array (a GEMM output before its reduction)."""

Block = tuple[tuple[int, ...], tuple[int, ...]]  # (starts, shape) of one rank's block


@dataclasses.dataclass(frozen=True)
class Layouts:
    """Layouts of a module's input ``x`` (and ``dx``) and output ``y`` (and ``dy``)."""

    x: str
    y: str


@dataclasses.dataclass(frozen=True)
class LinearLayouts(Layouts):
    """A linear layer's layouts: ``x`` and ``y`` as the caller sees them, the parameters, and
    the local GEMM's operands: ``x_local`` (x as the GEMM reads it) and ``y_local`` (the GEMM's
    output, :data:`PARTIAL` when it still has to be summed over the ranks). The layer's input
    and output mappings are ``x -> x_local`` and ``y_local -> y``."""

    weight: str
    bias: str
    x_local: str
    y_local: str


def _check_layout(layout: str, allowed: Sequence[str] = LAYOUTS) -> None:
    if layout not in allowed:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(allowed)}")


def block_bounds(global_shape: Sequence[int], shape: tuple[int, int], coords: Sequence[int],
                 layout: str) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of the block held at grid ``coords`` of a ``shape`` grid
    (:data:`PARTIAL`: the whole array, like "replicated")."""
    _check_layout(layout, LAYOUTS + (PARTIAL,))
    global_shape = tuple(int(n) for n in global_shape)
    bounds = [(0, n) for n in global_shape]
    pr, pc = shape
    flat = coords[0] * pc + coords[1]
    if not global_shape:
        return ()
    if layout == "cols":
        bounds[-1] = block_range(global_shape[-1], pr * pc, flat)
    elif layout == "rows":
        bounds[0] = block_range(global_shape[0], pr * pc, flat)
    elif layout == "tiles":
        if len(global_shape) == 1:
            bounds[0] = block_range(global_shape[0], pc, coords[1])
        else:
            bounds[0] = block_range(global_shape[0], pr, coords[0])
            bounds[-1] = block_range(global_shape[-1], pc, coords[1])
    return tuple(bounds)


def local_slices(global_shape: Sequence[int], grid: ProcessGrid, layout: str) -> tuple[slice, ...]:
    """Slices of the global array that this rank holds in ``layout``."""
    bounds = block_bounds(global_shape, grid.shape, grid.coords, layout)
    return tuple(slice(a, b) for a, b in bounds)


def local_shape(global_shape: Sequence[int], grid: ProcessGrid, layout: str) -> tuple[int, ...]:
    """Shape of this rank's block in ``layout``."""
    return tuple(b - a for a, b in block_bounds(global_shape, grid.shape, grid.coords, layout))


def blocks(global_shape: Sequence[int], shape: tuple[int, int], layout: str) -> list[Block]:
    """``(starts, shape)`` of every rank's block, in rank order (grid coordinates row-major, as
    :class:`~tpmpi.core.grid.ProcessGrid` numbers them)."""
    pc = shape[1]
    out = []
    for rank in range(shape[0] * pc):
        bounds = block_bounds(global_shape, shape, divmod(rank, pc), layout)
        out.append((tuple(a for a, _ in bounds), tuple(b - a for a, b in bounds)))
    return out


def scatter(a_global: Array, grid: ProcessGrid, layout: str) -> Array:
    """This rank's block of a replicated global array, C-contiguous. No communication."""
    _check_layout(layout)
    xp = backend_of(a_global).xp
    return xp.ascontiguousarray(a_global[local_slices(a_global.shape, grid, layout)])


def check_movable(name: str, a: Any) -> None:
    """ValueError unless ``a`` is a plain array whose dtype MPI can move: bool, integer, float
    or complex (bfloat16 included) in this machine's byte order. An object array would send
    pointers (a segfault on the receiver)."""
    if getattr(a, "shape", None) is None or getattr(a, "dtype", None) is None:
        raise ValueError(f"{name} is a {type(a).__name__}: expected an array")
    check_plain_array(name, a)
    dt = a.dtype
    if not (dt.kind in "biufc" or dt.name == "bfloat16") or dt.fields is not None:
        raise ValueError(f"{name}.dtype={dt}: expected a numeric dtype (bool, integer, float or "
                         "complex) that MPI can move")
    if dtype_label(dt) != dt.name:
        raise ValueError(f"{name}.dtype={dtype_label(dt)}: expected this machine's byte order "
                         f"({name}.astype({name}.dtype.newbyteorder('=')))")


def gather(a_local: Array, grid: ProcessGrid, layout: str, global_shape: Sequence[int]
           ) -> Array:
    """The global array on every rank from each rank's block in ``layout``. Collective
    (``Alltoallw`` into subarray types, see :func:`tpmpi.core.comm.allgather_blocks`)."""
    return agreed_gather(a_local, grid, layout, global_shape,
                         Same(Text("tpmpi.gather()"), CALL_ORDER))


def agreed_gather(a_local: Array, grid: ProcessGrid, layout: str, global_shape: Sequence[int],
                  call: Same) -> Array:
    """:func:`gather` whose agreement names ``call`` (e.g. a layer's gather_weight)."""
    def local_checks() -> None:
        _check_layout(layout)
        check_movable("a_local", a_local)
        want = local_shape(global_shape, grid, layout)
        if tuple(a_local.shape) != want:
            raise ValueError(f"a_local.shape={tuple(a_local.shape)}: expected {want} for layout "
                             f"{layout!r} of global shape {global_shape} on grid {grid.label}")

    try:
        global_shape = tuple(int(n) for n in global_shape)
    except (TypeError, ValueError):
        pass  # reported by local_checks on the ranks concerned
    agree_checks(grid.comm, local_checks, call=call, layout=layout, global_shape=global_shape,
                 dtype=str(getattr(a_local, "dtype", None)))
    backend = backend_of(a_local)
    if layout == "replicated":
        return a_local
    out = backend.xp.empty(global_shape, dtype=a_local.dtype)
    return allgather_blocks(backend.xp.ascontiguousarray(a_local), out,
                            blocks(global_shape, grid.shape, layout), grid.comm, Staging(backend))
