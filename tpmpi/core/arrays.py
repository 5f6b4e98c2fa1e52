"""The type names of the one NumPy/CuPy code path (annotations only).

:data:`Array` is a NumPy or a CuPy array: layers, mappings and collectives take either and
reach the array library through ``backend.xp``. CuPy ships no type stubs, so to the type
checker an ``Array`` is ``Any``; the name says what is meant. :data:`DTypeLike` is NumPy's (a
dtype, its name, or a scalar type such as ``ml_dtypes.bfloat16``).
"""
from __future__ import annotations

from typing import Any

from numpy.typing import DTypeLike

Array = Any

__all__ = ["Array", "DTypeLike"]
