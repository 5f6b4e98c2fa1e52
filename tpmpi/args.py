"""Local argument checks shared by the public entry points (the collective agreement on their
outcome is :func:`tpmpi.comm.check`)."""
from __future__ import annotations

import numbers
from typing import Any, Optional


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
