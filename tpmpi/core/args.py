"""Local argument checks shared by the public entry points (the collective agreement on their
outcome is :func:`tpmpi.core.agreement.agree_checks`)."""
from __future__ import annotations

import numbers
from typing import Any, Literal, Optional, overload

from .arrays import DTypeLike


@overload
def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: Literal[False] = False
              ) -> int: ...
@overload
def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool) -> Optional[int]: ...


def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool = False
              ) -> Optional[int]:
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``); otherwise a
    ValueError naming the argument, its value and what was expected. Python and NumPy
    integers pass; booleans and floats (even integral ones) do not."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        want = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name}={value!r}: expected {'None or ' if allow_none else ''}{want}")
    return int(value)


def dtype_label(dtype: DTypeLike) -> str:
    """A dtype's name, with its byte order when that is not the machine's (``">f4 (big-endian
    float32)"``), so that a message never reads "float32: expected float32"."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.byteorder in ("=", "|") or dt == dt.newbyteorder("="):
        return dt.name
    order = "big" if dt.byteorder == ">" else "little"
    return f"{dt.str} ({order}-endian {dt.name})"


def check_plain_array(name: str, a: Any) -> None:
    """ValueError when ``a`` is an array subclass (``np.matrix``, a masked array, ...) whose
    semantics tpmpi would silently drop (the mask, matrix products)."""
    base = next((k for k in type(a).__mro__[1:] if k.__name__ == "ndarray"), None)
    if base is None:
        return
    why = f"would ignore the mask; pass {name}.filled(value)" if hasattr(a, "mask") else \
        f"would drop what the subclass adds; pass np.asarray({name})"
    raise ValueError(f"{name} is a {type(a).__module__}.{type(a).__name__}: expected a plain "
                     f"{base.__module__}.ndarray (tpmpi {why})")
