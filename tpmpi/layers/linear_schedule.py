"""The schedule of a 1D parallel linear layer (:class:`~tpmpi.ColumnParallelLinear`,
:class:`~tpmpi.RowParallelLinear`), derived from its declared layouts and its operator classes
alone, in the order the layer runs them:

forward   x operator (``x -> x_local``; blocking), the local product ``y`` per row chunk (each
          chunk's y operator in flight during the later chunks' products), the bias where the
          layout puts it, y operator (``y_local -> y``);
backward  dy operator (the y operator's adjoint; blocking), the x operator again (under
          sequence parallelism the gathered x is not kept) during the dX product, then the dx
          operator (the x operator's adjoint) during the dW product and the bias gradient, then
          the gradients final: bias, then weight.

A collective runs during the steps it overlaps only with ``overlap`` (and never under host
staging, whose caller passes ``overlap=False``); otherwise it is listed blocking after them. A
one-rank operator or one that moves nothing is left out. Sizes are those of the rank holding
the largest blocks (grid coordinates (0, 0)).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional, Union

from ..core.dtypes import resolve_dtype
from ..core.layout import PARTIAL, LinearLayouts, block_bounds
from ..core.mappings import Operator, mapping_class
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Schedule, Step


def grid_shape(parts: Union[int, Sequence[int]]) -> tuple[int, int]:
    """``(1, P)`` for ``P`` ranks, or a grid shape ``(pr, pc)`` as it is."""
    if isinstance(parts, int):
        return 1, int(parts)
    pr, pc = parts
    return int(pr), int(pc)


def block_shape(shape: Sequence[int], grid: tuple[int, int], layout: str) -> tuple[int, ...]:
    """The shape of the largest block (grid coordinates (0, 0)) of a global ``shape`` in
    ``layout``."""
    return tuple(b - a for a, b in block_bounds(shape, grid, (0, 0), layout))


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of an array of ``shape`` and ``dtype``."""
    return math.prod(int(d) for d in shape) * resolve_dtype(dtype).itemsize


def overlapped(colls: Sequence[Optional[Collective]], work: list[Step], overlap: bool
               ) -> list[Step]:
    """The collectives ``colls`` (None: none), in the order they start, during the ``work``
    steps (listed before them, each overlapping the later ones and the work) with
    ``overlap``, else after them, blocking, in that order; ``work`` alone without one."""
    found = [c for c in colls if c is not None]
    if not overlap:
        return work + list(found)
    names = [s.name for s in work if not isinstance(s, GradsReady)]
    return [dataclasses.replace(c, during=tuple(d.name for d in found[i + 1:]) + tuple(names))
            for i, c in enumerate(found)] + work


def linear_schedule(lay: LinearLayouts, names: Sequence[str], m: int, k: int, n: int,
                    grid: tuple[int, int], *, dtype: str, backward: bool, bias: bool,
                    overlap: bool, chunks: Sequence[tuple[int, int]]) -> Schedule:
    """The schedule (module docstring) of a (k, n) layer with layouts ``lay`` on an (m, k)
    input over the ``grid`` ranks of its communicator; ``names``: its x, y, dy and dx
    operators' attribute names; ``chunks``: the row chunks of the forward product."""
    x_name, y_name, dy_name, dx_name = names
    x_op, y_op = mapping_class(lay.x, lay.x_local), mapping_class(lay.y_local, lay.y)
    p = grid[0] * grid[1]
    kx, kw = block_shape((m, k), grid, lay.x_local)[1], block_shape((k, n), grid, lay.weight)
    nw = kw[1]
    item = resolve_dtype(dtype).itemsize

    def coll(cls: type[Operator], name: str, shape: tuple[int, int],
             during: tuple[str, ...] = ()) -> Optional[Collective]:
        return cls.step(name, shape, dtype, "tp", p, during)

    def bias_add(name: str, shape: Sequence[int]) -> list[Step]:
        return [Pointwise(name, 2 * nbytes(shape, dtype), dtype)] if bias else []

    def present(*steps: Optional[Step]) -> list[Step]:
        return [step for step in steps if step is not None]

    after = lay.y_local == PARTIAL  # a replicated bias is added once, after the reduction
    fwd = present(coll(x_op, x_name, (m, k)))
    for i, (a, b) in enumerate(chunks):  # each chunk's gather in flight during the later ones
        tag = f"[{i}]" if len(chunks) > 1 else ""
        fwd.append(Product(f"y{tag}", b - a, kx, nw, dtype))
        fwd += [] if after else bias_add(f"bias{tag}", (b - a, nw))
        later = tuple(f"y[{j}]" for j in range(i + 1, len(chunks)))
        fwd += present(coll(y_op, y_name, (b - a, n), later))
    fwd += bias_add("bias", block_shape((m, n), grid, lay.y)) if after else []
    saved = block_shape((m, k), grid, lay.x if x_op.allocates else lay.x_local)
    sched = Schedule(tuple(fwd), (), nbytes(kw, dtype) + (nw * item if bias else 0),
                     nbytes(saved, dtype))
    if not backward:
        return sched
    bwd = present(coll(y_op.adjoint_class, dy_name, (m, n)))
    bwd += overlapped([coll(x_op, x_name, (m, k))], [Product("dX", m, nw, kx, dtype)], overlap)
    grads: list[Step] = [Product("dW", kx, m, nw, dtype)]
    if bias:
        grads.append(Pointwise("db", (m + 1) * nw * item, dtype))
    bwd += overlapped([coll(x_op.adjoint_class, dx_name, (m, k))], grads, overlap)
    if bias:
        bwd.append(GradsReady(("bias",), nw * item, dtype))
    bwd.append(GradsReady(("weight",), nbytes(kw, dtype), dtype))
    return Schedule(sched.forward, tuple(bwd), sched.param_bytes, sched.saved_bytes)
