"""Local products and column sums of the layers, half precision included.

NumPy has no half-precision BLAS: ``np.matmul`` on float16 runs a scalar loop (~0.7 GFLOP/s)
and on bfloat16 (ml_dtypes) returns float32. For NumPy operands of a 2-byte float dtype,
:func:`matmul` therefore converts them to float32 in panels, multiplies with float32 BLAS and
rounds each result once to the dtype -- what a GPU's tensor cores do (float32 accumulation,
one rounding). The float32 workspace is bounded by :data:`WORKSPACE_BYTES` (or 1 KiB per unit
of K when K is huge): B is converted in column panels, A in row blocks. CuPy keeps its native
half-precision GEMM (cuBLAS accumulates in float32), and every other dtype goes straight to
``xp.matmul``.

:func:`column_sums` (the bias gradient) accumulates 2-byte floats in float32 on every backend.

:class:`LocalWork` is how a module runs them: each product (bias add included), column sum and
element-wise function is a region of the module's tap (:mod:`tpmpi.core.tap`), and the end of
a product completes the agreement of the operation in progress (:class:`tpmpi.core.agreement.
Settle`), so that the ranks agree on their arguments while the first product runs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .agreement import Settle
from .arrays import Array
from .dtypes import HALF
from .tap import NULL_TAP, Tap

WORKSPACE_BYTES = 32 * 2**20
"""float32 workspace of one half-precision NumPy product (converted panels and result block)."""
_MIN_PANEL = 256  # columns of a B panel: keeps the float32 GEMMs efficient


def matmul(xp: Any, a: Array, b: Array, out: Optional[Array] = None) -> Array:
    """``a @ b`` (M, K) x (K, N) -> (M, N) of ``a``'s dtype, into ``out`` when given. NumPy
    2-byte floats: float32 products rounded once (see the module docstring); otherwise
    ``xp.matmul``. A float32 ``out`` for 2-byte float operands keeps the float32 products
    unrounded (partial sums that are reduced before their one rounding); CuPy refuses an
    ``out`` of another dtype, so it multiplies float32 copies of the operands."""
    if out is not None and out.dtype != a.dtype and xp is not np:
        return xp.matmul(a.astype(out.dtype), b.astype(out.dtype), out=out)
    if xp is not np or a.dtype.itemsize != 2 or a.dtype.name not in HALF:  # name: slow
        return xp.matmul(a, b, out=out)
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    budget = WORKSPACE_BYTES // 4  # float32 elements
    if m * k + k * n + m * n <= budget:
        out[...] = np.matmul(a.astype(np.float32), b.astype(np.float32))
        return out
    nb = min(n, max(_MIN_PANEL, budget // (2 * max(k, 1))))
    mb = max(1, (budget - k * nb) // (k + nb))
    b32 = np.empty((k, nb), dtype=np.float32)
    a32 = np.empty((min(mb, m), k), dtype=np.float32)
    c32 = np.empty((min(mb, m), nb), dtype=np.float32)
    for j0 in range(0, n, nb):
        j1 = min(n, j0 + nb)
        bj = b32[:, :j1 - j0]
        np.copyto(bj, b[:, j0:j1])
        for i0 in range(0, m, mb):
            i1 = min(m, i0 + mb)
            ai, ci = a32[:i1 - i0], c32[:i1 - i0, :j1 - j0]
            np.copyto(ai, a[i0:i1])
            np.matmul(ai, bj, out=ci)
            out[i0:i1, j0:j1] = ci
    return out


def column_sums(a: Array, dtype: Any = None) -> Array:
    """Sums over axis 0 of a 2D array (NumPy or CuPy), accumulated in float32 for 2-byte
    floats and returned in ``dtype`` (default ``a``'s: rounded once)."""
    if a.dtype.name in HALF:
        return a.sum(axis=0, dtype=np.float32).astype(a.dtype if dtype is None else dtype,
                                                      copy=False)
    return a.sum(axis=0)


class LocalWork:
    """A module's local computation on array namespace ``xp`` (see the module docstring):
    ``tap`` is the null tap until a measurement attaches one; ``pending`` is the module's
    :class:`~tpmpi.core.agreement.Settle`. No communication."""

    def __init__(self, xp: Any, pending: Optional[Settle] = None) -> None:
        self.xp = xp
        self.tap: Tap = NULL_TAP
        self.pending = pending if pending is not None else Settle()

    def product(self, a: Array, b: Array, out: Optional[Array] = None,
                bias: Optional[Array] = None) -> Array:
        """``a @ b (+ bias)``, (M, K) x (K, N) -> (M, N), into ``out`` when given
        (:func:`matmul`); then the pending agreement is completed."""
        with self.tap.product():
            out = matmul(self.xp, a, b, out=out)
            if bias is not None:
                out += bias
        self.pending.settle()
        return out

    def partial(self, a: Array, b: Array) -> Array:
        """``a @ b`` as a partial sum that the ranks add up: float32 for 2-byte floats (each
        rank's partial may exceed float16's range where the sum does not; the caller rounds
        once, after the reduction), else of ``a``'s dtype (:meth:`product`)."""
        out = None
        if a.dtype.itemsize == 2 and a.dtype.name in HALF:
            out = self.xp.empty((a.shape[0], b.shape[1]), dtype=np.float32)
        return self.product(a, b, out=out)

    def column_sums(self, a: Array, dtype: Any = None) -> Array:
        """:func:`column_sums` of ``a`` (a bias gradient), in ``dtype`` (default ``a``'s)."""
        with self.tap.product():
            return column_sums(a, dtype)

    def pointwise(self, fn: Callable[..., Array], x: Array, *args: Array) -> Array:
        """``fn(x, *args)``, element-wise work of the shape of ``x`` (an activation or its
        gradient)."""
        with self.tap.product():
            return fn(x, *args)
