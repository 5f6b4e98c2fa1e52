"""The one text-table formatter of tpmpi: columns of cells two spaces apart, right-aligned
(numbers) unless named left (labels), None shown as ``-``. Used by the run and sweep tables
(:mod:`tpmpi.studies.bench`), the nccl-tests-like lines of the collective benchmark (fixed
widths, printed as they come: :mod:`tpmpi.studies.collbench`) and ``python -m tpmpi info``.
"""
from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any, Optional


def cell(value: Any) -> str:
    """A value as a table cell: ``-`` for None, else ``str``."""
    return "-" if value is None else str(value)


def line(cells: Sequence[Any], widths: Sequence[int], left: Container[int] = ()) -> str:
    """One row: each cell padded to its column's width (right-aligned; left-aligned for the
    column indices in ``left``), two spaces apart, without trailing spaces."""
    return "  ".join(cell(c).ljust(w) if i in left else cell(c).rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def columns(rows: Sequence[Sequence[Any]], left: Container[int] = (),
            widths: Optional[Sequence[int]] = None) -> list[str]:
    """The lines of ``rows`` (the first is usually the heads), each column as wide as its
    widest cell (at least ``widths``, when given)."""
    texts = [[cell(c) for c in row] for row in rows]
    count = max((len(r) for r in texts), default=0)
    least = list(widths or []) + [0] * count
    sized = [max([least[i]] + [len(r[i]) for r in texts if i < len(r)]) for i in range(count)]
    return [line(r, sized, left) for r in texts]
