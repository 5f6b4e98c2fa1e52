"""Supported dtypes and the one table of correctness tolerances.

A result passes ``--check`` when ``max|y - y_ref| / max|y_ref| <= TOLERANCE[dtype]``, with the
reference computed serially in float64. The bounds are loose enough for any summation order
(the grids reduce in different orders) at K up to ~10^5, tight enough that a misplaced block or
a missing partial sum fails by orders of magnitude.

bfloat16 needs the optional ``ml_dtypes`` package (it registers the dtype with NumPy); on CuPy it
also needs a CuPy that supports it (>= 14), checked at layer construction
(:meth:`tpmpi.backend.Backend.check_dtype`).
"""
from __future__ import annotations

import numpy as np

TOLERANCE: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-4,
    "float16": 2e-2,
    "bfloat16": 8e-2,
}
SUPPORTED = tuple(TOLERANCE)


def dtype_name(dtype) -> str:
    """Canonical name of a NumPy/CuPy dtype or dtype-like (``'float32'``...)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def resolve_dtype(dtype, *, argument: str = "dtype", supported=SUPPORTED) -> np.dtype:
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


def tolerance(dtype) -> float:
    """Relative tolerance of ``--check`` for this dtype."""
    return TOLERANCE[dtype_name(dtype)]
