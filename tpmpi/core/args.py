"""Local argument checks shared by the public entry points (the collective agreement on their
outcome is :func:`tpmpi.core.agreement.agree_checks`), and :func:`parse_int`, the one reader of
every integer that comes from a string (flags, environment variables, mesh and grid shapes)."""
from __future__ import annotations

import argparse
import math
import numbers
import re
from collections.abc import Callable
from typing import Any, Literal, Optional, Union, overload

from numpy.typing import DTypeLike


def _expected(minimum: int) -> str:
    return {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")


DIGITS = re.compile(r"[0-9]+")
"""What :func:`parse_int` reads: ASCII digits only. ``str.isdigit`` also accepts superscripts
(``"²"``, which ``int()`` then refuses with a message naming nothing) and ``int()`` accepts other
scripts' digits (``"١٢"``) and underscores (``"1_000"``): numbers nobody typed as such."""


def parse_int(name: str, text: Any, minimum: int = 0) -> int:
    """The integer written in ``text``: ASCII digits, blanks around them ignored, at least
    ``minimum``; otherwise a ValueError naming ``name`` (the flag, variable or argument), the
    text and what was expected, e.g. ``TPMPI_THREADS='²': expected a positive integer (digits
    0-9)``."""
    digits = text.strip() if isinstance(text, str) else ""
    if DIGITS.fullmatch(digits) and int(digits) >= minimum:
        return int(digits)
    raise ValueError(f"{name}={text!r}: expected {_expected(minimum)} (digits 0-9)")


def int_flag(minimum: int = 0, want: Optional[str] = None) -> Callable[[str], int]:
    """An argparse ``type=`` reading a flag's value with :func:`parse_int`; argparse puts the
    flag before the message (``argument --m: '²': expected a non-negative integer (digits
    0-9)``; ``want`` replaces what follows "expected")."""
    def integer(text: str) -> int:
        try:
            return parse_int("", text, minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected {want or _expected(minimum) + ' (digits 0-9)'}") from None
    return integer


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
        raise ValueError(f"{name}={value!r}: expected {'None or ' if allow_none else ''}"
                         f"{_expected(minimum)}")
    return int(value)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: what a JSON field holding a measurement may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def check_field(where: str, obj: Any, key: str, kind: Union[type, tuple[type, ...]], what: str,
                test: Optional[Callable[[Any], bool]] = None, label: Optional[str] = None
                ) -> Any:
    """``obj[key]`` when ``obj`` is a dict holding a ``kind`` (a bool is no int or float here)
    that passes ``test``; otherwise a ValueError ``"<where>: field '<label>' is <value>:
    expected <what>"`` (``is missing`` when absent; ``label`` defaults to ``key``, e.g. a dotted
    path ``alpha.allgather.2``): the one check behind every JSON file tpmpi reads (checkpoint
    manifests, calibration files, result records)."""
    field = f"{where}: field {label or key!r}"
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{field} is missing: expected {what}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))) or (test and not test(value)):
        raise ValueError(f"{field} is {value!r}: expected {what}")
    return value


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
    mro = type(a).__mro__
    if len(mro) == 2:  # a class of its own (np.ndarray itself): nothing to drop
        return
    base = next((k for k in mro[1:] if k.__name__ == "ndarray"), None)
    if base is None:
        return
    why = f"would ignore the mask; pass {name}.filled(value)" if hasattr(a, "mask") else \
        f"would drop what the subclass adds; pass np.asarray({name})"
    raise ValueError(f"{name} is a {type(a).__module__}.{type(a).__name__}: expected a plain "
                     f"{base.__module__}.ndarray (tpmpi {why})")
