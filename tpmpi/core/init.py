"""Layout-invariant deterministic initialisation (counter-based RNG).

Element ``(i, j)`` of a global matrix of shape ``(R, C)`` (or ``j`` of a vector) is a function
of ``(seed, stream, i*C + j)`` alone: NumPy's Philox4x64 counter-based generator, keyed by
``(seed, stream)``, gives exactly one raw 64-bit draw per element; draw ``e`` is lane ``e % 4``
of counter ``e // 4``. Any block is therefore generated alone, bit-identical to the same slice
of the whole matrix, whatever the grid, and without materialising the rest.
Values are ``uniform(-bound, bound)`` from the top 53 bits, computed in float64 and rounded
once to ``dtype`` (in runs of at most 2**20 elements, so temporaries stay small); the default
bound is ``1/sqrt(R)`` for a matrix (fan-in, as in ``torch.nn.Linear``) and 1 for a vector.

The machinery -- any draw of a keyed stream (:func:`philox_draws`) and any block of a C-ordered
array as contiguous runs of draws (:func:`block_runs`) -- also makes the dropout masks
(:mod:`tpmpi.core.dropout`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Optional

import numpy as np

from .arrays import Array, DTypeLike
from .backend import Backend, get_backend
from .dtypes import resolve_dtype


def _norm(s: slice, n: int, name: str) -> tuple[int, int]:
    if not isinstance(s, slice):
        raise ValueError(f"{name}={s!r}: expected a slice")
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"{name}={s!r}: expected a contiguous slice (step 1)")
    return start, max(start, stop)


def philox_draws(key: np.ndarray, first: int, count: int, base: int = 0) -> np.ndarray:
    """Raw 64-bit draws ``first .. first + count - 1`` of the Philox4x64 stream keyed by ``key``
    (two uint64 words): draw ``e`` is lane ``e % 4`` of counter ``base + e // 4``. ``base`` (an
    integer below 2**256) lets a caller give each stream of one key its own counter range."""
    gen = np.random.Philox(counter=base + first // 4, key=key)
    return gen.random_raw(first % 4 + count)[first % 4:]


def block_runs(shape: Sequence[int], block: Sequence[tuple[int, int]],
               chunk: int = 1 << 20) -> Iterator[tuple[int, int, int]]:
    """The block ``[start_i, stop_i)`` per axis of a C-ordered array of ``shape`` as contiguous
    runs ``(offset in the block's flat array, flat index in the whole array, length)``, each at
    most ``chunk`` long, in order: the trailing axes the block covers whole join one run with the
    partial axis before them, and the leading axes are iterated."""
    sizes = [stop - start for start, stop in block]
    if not shape or 0 in sizes:
        return
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    j = len(shape) - 1  # the partial axis whose range ends each run
    while j > 0 and sizes[j] == shape[j]:
        j -= 1
    length = sizes[j] * strides[j]
    offset = 0
    for lead in itertools.product(*(range(start, stop) for start, stop in block[:j])):
        first = sum(i * s for i, s in zip(lead, strides)) + block[j][0] * strides[j]
        for piece in range(0, length, chunk):
            count = min(chunk, length - piece)
            yield offset + piece, first + piece, count
        offset += length


def _uniform(raw: np.ndarray, bound: float) -> np.ndarray:
    u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return (2.0 * u - 1.0) * bound


def init_weight(shape: Sequence[int], seed: int, dtype: DTypeLike = "float32",
                rows: slice = slice(None), cols: slice = slice(None),
                backend: str | Backend | None = None, *, stream: int = 0,
                bound: Optional[float] = None) -> Array:
    """Block ``[rows, cols]`` of the global ``shape`` matrix defined by ``(seed, stream)``.

    ``shape`` is ``(R, C)`` or ``(C,)`` (then only ``cols`` applies). Returns an array of the
    block's shape on ``backend`` (default NumPy). No communication.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (1, 2) or min(shape, default=0) < 0:
        raise ValueError(f"shape={shape}: expected (rows, cols) or (cols,) with sizes >= 0")
    if int(seed) != seed or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**64)")
    dt = resolve_dtype(dtype)
    nrows, ncols = (shape if len(shape) == 2 else (1, shape[0]))
    r0, r1 = _norm(rows, nrows, "rows") if len(shape) == 2 else (0, 1)
    c0, c1 = _norm(cols, ncols, "cols")
    if bound is None:
        bound = 1.0 / math.sqrt(max(1, nrows)) if len(shape) == 2 else 1.0
    out = np.empty((r1 - r0, c1 - c0), dtype=dt)
    key = np.array([seed, stream], dtype=np.uint64)
    flat = out.reshape(-1)
    for offset, first, count in block_runs((nrows, ncols), [(r0, r1), (c0, c1)]):
        flat[offset:offset + count] = _uniform(philox_draws(key, first, count), bound)
    block = out if len(shape) == 2 else out[0]
    return get_backend(backend or "numpy").asarray(block)
