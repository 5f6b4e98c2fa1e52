"""What MPI sees of tpmpi's arrays: datatypes and the argument plans of the gathers.

* :func:`mpi_type` -- the predefined type of a dtype; float16 and bfloat16 move as 2-byte words
  (``MPI_UINT16_T``, :func:`as_words`), so no library needs a half-precision type.
* :func:`subarray_type` -- committed subarray types, kept in one :class:`~tpmpi.core.cache.LRU`
  that frees what it evicts.
* :func:`alltoallw_args` -- the ``Alltoallw`` arguments of a gather of blocks into their places
  of a C-ordered array (:func:`tpmpi.core.comm.allgather_blocks`), cut into calls under the
  message limit (rows first, then column ranges of single rows); the plans are kept in a second
  :class:`~tpmpi.core.cache.LRU` whose entries own their datatypes.

No communication here: :mod:`tpmpi.core.comm` makes the calls.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Optional

import numpy as np
from mpi4py import MPI

from .agreement import max_message_bytes
from .arrays import Array, DTypeLike
from .cache import LRU
from .dtypes import HALF

def mpi_type(dtype: DTypeLike) -> MPI.Datatype:
    """The predefined MPI datatype that moves ``dtype``: float16 and bfloat16 as 2-byte words
    (``MPI_UINT16_T``, so the library needs no half-precision type); other dtypes as MPI's own
    type (``MPI_FLOAT``...), or the unsigned integer of their size. Never freed by callers."""
    dt = np.dtype(dtype)
    if dt.name in HALF:
        return MPI.UINT16_T
    try:
        return MPI.Datatype.fromcode(dt.char)
    except (KeyError, ValueError):
        return MPI.Datatype.fromcode(np.dtype(f"u{dt.itemsize}").char)


def reduction_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype in which tpmpi sums ``dtype``: float32 for float16 and bfloat16 (one rounding
    at the end), the dtype itself otherwise."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.name in HALF else dt


def as_words(a: Array) -> Array:
    """``a`` as MPI sees it: a uint16 view for the 2-byte floats (mpi4py cannot export
    bfloat16, and the words match :func:`mpi_type`), ``a`` itself otherwise."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.name in HALF else a  # name: slow


def _new_subarray(dtype: DTypeLike, global_shape: Sequence[int], starts: Sequence[int],
                  shape: Sequence[int]) -> MPI.Datatype:
    return mpi_type(dtype).Create_subarray(list(global_shape), list(shape), list(starts),
                                           order=MPI.ORDER_C).Commit()


def _free_types(types: Iterable[MPI.Datatype]) -> None:
    """Free the derived datatypes among ``types`` (each once)."""
    for dt in {id(t): t for t in types}.values():
        if not dt.is_predefined:
            dt.Free()


_TYPES: LRU[MPI.Datatype] = LRU(256, evict=lambda dt: _free_types([dt]))


def subarray_type(dtype: DTypeLike, global_shape: tuple, starts: tuple, shape: tuple
                  ) -> MPI.Datatype:
    """Committed subarray type of block ``shape`` at ``starts`` in C-ordered ``global_shape``;
    cached (types depend only on these numbers, not on a communicator). Never freed by
    callers."""
    return _TYPES.get((np.dtype(dtype).name, global_shape, starts, shape),
                      partial(_new_subarray, dtype, global_shape, starts, shape))


# --------------------------------------------------------------------------- gather plans

Block = tuple[Sequence[int], Sequence[int]]  # (starts, shape) of one rank's block


def _gather_pieces(shape: tuple, itemsize: int, size: int, limit: int
                   ) -> list[tuple[tuple[int, int], Optional[tuple[int, int]]]]:
    """``((row0, row1), cols)`` of each MPI call of a gather into ``shape``: ``cols`` None
    (whole rows) or ``(col0, col1)`` of the last axis when one row is over the limit. A call
    covers at most ``limit // (size * cell)`` cells (cell: one element times the middle axes),
    so that neither what a rank sends (its part, to ``size`` peers) nor what it receives
    exceeds ``limit``."""
    rows = shape[0]
    ncols = shape[-1] if len(shape) > 1 else 1
    cell = itemsize * math.prod(shape[1:-1])
    cap = max(1, limit // (size * max(cell, 1)))
    if rows * ncols <= cap:
        return [((0, rows), None)]
    if ncols <= cap:
        step = cap // ncols
        return [((r, min(r + step, rows)), None) for r in range(0, rows, step)]
    return [((r, r + 1), (c, min(c + cap, ncols))) for r in range(rows)
            for c in range(0, ncols, cap)]


def row_window(blocks: Sequence[Block], rank: int, r0: int, r1: int
                ) -> tuple[slice, list[Block]]:
    """Rows ``r0:r1`` of the global array: this rank's local rows in that window and every
    block clipped to it, with starts relative to row ``r0``."""
    clipped: list[Block] = []
    for starts, shape in blocks:
        first = min(max(r0, starts[0]), r1)
        stop = max(first, min(r1, starts[0] + shape[0]))
        clipped.append(((first - r0,) + tuple(starts[1:]), (stop - first,) + tuple(shape[1:])))
    own_start = blocks[rank][0][0]
    first = clipped[rank][0][0] + r0 - own_start
    return slice(first, first + clipped[rank][1][0]), clipped


def _clip_cols(block: Block, cols: Optional[tuple[int, int]]) -> tuple[Block, int]:
    """``block`` restricted to last-axis range ``cols`` and the offset of that range inside the
    block's own columns."""
    if cols is None:
        return block, 0
    (starts, shape), (c0, c1) = block, cols
    first = min(max(c0, starts[-1]), c1)
    stop = max(first, min(c1, starts[-1] + shape[-1]))
    return ((*starts[:-1], first), (*shape[:-1], stop - first)), first - starts[-1]


def _spec(dtype: DTypeLike, out_shape: tuple, local_shape: tuple, blocks: Sequence[Block],
          rank: int, cols: Optional[tuple[int, int]]) -> tuple:
    """Counts, zero displacements and types of one Alltoallw call (new types, owned by the
    plan that holds them); zero counts carry a valid predefined type."""
    base, size = mpi_type(dtype), len(blocks)
    rcounts, rtypes = [], []
    for block in blocks:
        (starts, shape), _ = _clip_cols(block, cols)
        full = all(s > 0 for s in shape)
        rcounts.append(1 if full else 0)
        rtypes.append(_new_subarray(dtype, out_shape, tuple(starts), tuple(shape)) if full
                      else base)
    (_, own), offset = _clip_cols(blocks[rank], cols)
    if not all(s > 0 for s in own):
        scount, stype = 0, base
    elif tuple(own) == tuple(local_shape):
        scount, stype = math.prod(own), base
    else:
        scount = 1
        stype = _new_subarray(dtype, local_shape, (0,) * (len(own) - 1) + (offset,), own)
    return [scount] * size, [0] * size, [stype] * size, rcounts, [0] * size, rtypes


def _make_plan(local: Array, out: Array, blocks: tuple, rank: int, limit: int) -> list:
    plan = []
    for (r0, r1), cols in _gather_pieces(tuple(out.shape), out.itemsize, len(blocks), limit):
        rows, clipped = row_window(blocks, rank, r0, r1)
        spec = _spec(out.dtype, (r1 - r0,) + tuple(out.shape[1:]),
                     (rows.stop - rows.start,) + tuple(local.shape[1:]), clipped, rank, cols)
        plan.append((rows, slice(r0, r1), spec))
    return plan


_PLANS: LRU[list] = LRU(64, evict=lambda plan: _free_types(
    t for *_, spec in plan for t in spec[2] + spec[5]))
"""``(local rows, out rows, Alltoallw spec)`` of each call of a gather, per gather shape (a
repeated forward costs one lookup); an entry owns its datatypes (freed on eviction)."""


def alltoallw_args(local: Array, out: Array, blocks: Sequence[Block], rank: int,
                   limit: Optional[int] = None) -> list[tuple[list, list]]:
    """``(send, recv)`` buffer specifications of each ``Alltoallw`` of a gather of C-contiguous
    ``local`` (this rank's block) into C-ordered ``out`` (see :func:`allgather_blocks`), split
    so that no call exceeds ``limit`` (default :func:`max_message_bytes`)."""
    try:
        key = tuple(blocks)
        hash(key)
    except TypeError:  # lists inside
        key = tuple((tuple(s), tuple(sh)) for s, sh in blocks)
    limit = limit or max_message_bytes()
    spec = (out.dtype.str, out.shape, local.shape, key, rank, limit)
    plan = _PLANS.find(spec)
    if plan is None:
        plan = _PLANS.put(spec, _make_plan(local, out, key, rank, limit))
    if len(plan) == 1:
        sc, sd, st, rc, rd, rt = plan[0][2]
        return [([as_words(local), sc, sd, st], [as_words(out), rc, rd, rt])]
    return [([as_words(local[rows]), sc, sd, st], [as_words(out[orows]), rc, rd, rt])
            for rows, orows, (sc, sd, st, rc, rd, rt) in plan]


