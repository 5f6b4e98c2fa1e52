"""The calibration file's schema (``python -m tpmpi calibrate --json FILE``), checked field by
field before the cost model trusts it: :func:`check_calibration`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.args import DIGITS, check_field, is_number
from ..core.colltable import OPS

TABLES = (("alpha", "seconds >= 0"), ("beta", "seconds/byte >= 0"),
          ("rates", "a positive rate (flop/s; thin: bytes/s)"))
"""The nested tables of a calibration and what each of their values is."""


def _name_ok(table: str, name: str, collectives: Sequence[str]) -> bool:
    """A key of the outer level: one of ``collectives`` (alpha, beta) or ``backend:dtype``
    (rates)."""
    return name.count(":") == 1 if table == "rates" else name in collectives


def _entry_ok(table: str, key: str, value: Any, classes: Sequence[str]) -> bool:
    """An entry of the inner level: ``P -> value >= 0`` (alpha, beta), ``shape class ->
    value > 0`` (rates)."""
    if table == "rates":
        return key in classes and is_number(value) and value > 0
    return bool(DIGITS.fullmatch(key)) and int(key) > 0 and is_number(value) and value >= 0


def check_calibration(data: Any, where: str, *, classes: Sequence[str],
                      staging: Sequence[str], collectives: Sequence[str] = OPS) -> None:
    """ValueError ``"<where>: field 'alpha.allgather.2' is '0.1x': expected ..."`` for the first
    field of ``data`` the cost model could not use: ``machine`` (an object), ``alpha`` and
    ``beta`` (``{collective: {P: seconds, or seconds per byte, >= 0}}`` for the names in
    ``collectives`` -- default :data:`tpmpi.core.colltable.OPS` -- and positive integers P),
    ``rates`` (``{"backend:dtype": {one of classes: positive rate}}``) and, optionally,
    ``staging`` (``{one of staging: positive bytes/s}``). ``{}``, which lacks ``machine``, is
    no calibration. Local."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}: expected an object with "
                         "machine, alpha, beta and rates (python -m tpmpi calibrate)")
    check_field(where, data, "machine", dict, "an object (where calibrate ran)")
    for table, what in TABLES:
        outer = check_field(where, data, table, dict, f"an object {{name: {{key: {what}}}}}")
        for name in outer:
            label = f"{table}.{name}"
            if not _name_ok(table, name, collectives):
                raise ValueError(f"{where}: field {label!r}: expected " + (
                    "'backend:dtype'" if table == "rates" else
                    f"a collective, one of {', '.join(collectives)}"))
            inner = check_field(where, outer, name, dict, f"an object {{key: {what}}}",
                                label=label)
            for key, value in inner.items():
                if not _entry_ok(table, key, value, classes):
                    keys = f"one of {', '.join(classes)}" if table == "rates" else \
                        "ranks P (a positive integer)"
                    raise ValueError(f"{where}: field {f'{label}.{key}'!r} is {value!r}: "
                                     f"expected {keys} mapped to {what}")
    copies = data.get("staging", {})
    if not isinstance(copies, dict) or set(copies) - set(staging) or not all(
            is_number(v) and v > 0 for v in copies.values()):
        raise ValueError(f"{where}: field 'staging' is {copies!r}: expected an object of "
                         f"{' and '.join(staging)}, positive bandwidths (bytes/s)")
