"""Layout-invariant deterministic initialisation (counter-based RNG).

Element ``(i, j)`` of a global matrix of shape ``(R, C)`` (or ``j`` of a vector) is a function
of ``(seed, stream, i*C + j)`` alone: NumPy's Philox4x64 counter-based generator, keyed by
``(seed, stream)``, gives exactly one raw 64-bit draw per element; draw ``e`` is lane ``e % 4``
of counter ``e // 4``. Any block is therefore generated alone, bit-identical to the same slice
of the whole matrix, whatever the grid, and without materialising the rest.
Values are ``uniform(-bound, bound)`` from the top 53 bits, computed in float64 and rounded
once to ``dtype`` (row by row, so temporaries stay small); the default bound is ``1/sqrt(R)``
for a matrix (fan-in, as in ``torch.nn.Linear``) and 1 for a vector.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
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

    def draws(first: int, count: int) -> np.ndarray:
        gen = np.random.Philox(counter=first // 4, key=key)
        return gen.random_raw(first % 4 + count)[first % 4:]

    if out.size:
        if c0 == 0 and c1 == ncols:  # whole rows: contiguous runs of draws, ~2**20 at a time
            flat = out.reshape(-1)
            step = max(ncols, (1 << 20) // max(ncols, 1) * ncols)
            for start in range(0, flat.size, step):
                count = min(step, flat.size - start)
                flat[start:start + count] = _uniform(draws(r0 * ncols + start, count), bound)
        else:
            for i in range(r0, r1):
                out[i - r0] = _uniform(draws(i * ncols + c0, c1 - c0), bound)
    block = out if len(shape) == 2 else out[0]
    return get_backend(backend or "numpy").asarray(block)
