"""Supported dtypes and the one formula of correctness tolerances.

A result passes ``--check`` when ``max|y - y_ref| / max|y_ref| <= tolerance(dtype, K)`` for
every output and gradient, with the reference computed serially in float64 from the same
(rounded) inputs, and K the longest sum any of them is computed from (the layer's inner
dimension forward; with backward also M and N; for the MLP also the hidden size):

    tolerance(dtype, K) = 8 u + 2 K u_acc

``u`` is the dtype's unit roundoff (2**-p for p significand bits, :data:`UNIT_ROUNDOFF`) and
``u_acc`` that of the type products are accumulated in (float64 for float64, float32 for the
others: float32 BLAS, cuBLAS, tpmpi's float32 reductions of float16/bfloat16). ``8 u`` covers
the few roundings to the dtype a result goes through (the product, the bias add, partial sums
of a reduction over ranks, the MLP's activation); ``2 K u_acc`` is the probabilistic bound of a
length-K sum of random terms in the accumulation type (about ``sqrt(K) u_acc`` of ``sum |x w|``,
itself about ``sqrt(K)`` times ``max |y|``), which is what depends on the summation order (grids
reduce in different orders). A misplaced block or a missing partial sum fails by orders of
magnitude. At K = 1024 (the default problem):

    dtype     u          tolerance(dtype, 1024)
    float64   1.1e-16    2.3e-13
    float32   6.0e-8     1.2e-4
    float16   4.9e-4     4.0e-3
    bfloat16  3.9e-3     3.1e-2

bfloat16 needs the optional ``ml_dtypes`` package (it registers the dtype with NumPy); on CuPy it
also needs a CuPy that supports it (>= 14), checked at layer construction
(:meth:`tpmpi.core.backend.Backend.check_dtype`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .arrays import DTypeLike

UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
ACCUMULATION: dict[str, str] = {"float64": "float64", "float32": "float32",
                                "float16": "float32", "bfloat16": "float32"}
DEFAULT_K = 1024
"""K of the default problem (``run`` with no flags), used when a caller gives none."""
SUPPORTED = tuple(UNIT_ROUNDOFF)
HALF = ("float16", "bfloat16")
"""The 2-byte floats: multiplied and summed in float32, rounded once (:mod:`tpmpi.core.gemm`,
:mod:`tpmpi.core.comm`)."""


def dtype_name(dtype: DTypeLike) -> str:
    """Canonical name of a NumPy/CuPy dtype or dtype-like (``'float32'``...)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def resolve_dtype(dtype: DTypeLike, *, argument: str = "dtype",
                  supported: Sequence[str] = SUPPORTED) -> np.dtype:
    """``np.dtype`` for a supported float type; ValueError naming the argument otherwise."""
    name = dtype_name(dtype)
    if name not in supported:
        raise ValueError(f"{argument}={name!r}: expected one of {', '.join(supported)}")
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
        except ImportError as exc:
            raise ValueError(f"{argument}='bfloat16' needs the ml_dtypes package") from exc
    return np.dtype(name)


def tolerance(dtype: DTypeLike, k: int = DEFAULT_K) -> float:
    """Relative tolerance of ``--check`` for this dtype when the longest sum has ``k`` terms:
    ``8 u + 2 k u_acc`` (see the module docstring)."""
    name = dtype_name(dtype)
    return 8 * UNIT_ROUNDOFF[name] + 2 * max(int(k), 1) * UNIT_ROUNDOFF[ACCUMULATION[name]]
