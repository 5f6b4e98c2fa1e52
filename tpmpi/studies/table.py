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


def _sized(texts: Sequence[Sequence[str]], widths: Optional[Sequence[int]] = None) -> list[int]:
    """Each column's width: its widest cell (at least ``widths``, when given)."""
    count = max((len(r) for r in texts), default=0)
    least = list(widths or []) + [0] * count
    return [max([least[i]] + [len(r[i]) for r in texts if i < len(r)]) for i in range(count)]


def columns(rows: Sequence[Sequence[Any]], left: Container[int] = (),
            widths: Optional[Sequence[int]] = None) -> list[str]:
    """The lines of ``rows`` (the first is usually the heads), each column as wide as its
    widest cell (at least ``widths``, when given)."""
    texts = [[cell(c) for c in row] for row in rows]
    sized = _sized(texts, widths)
    return [line(r, sized, left) for r in texts]


def wrapped(rows: Sequence[Sequence[Any]], width: int, keep: int = 0,
            left: Container[int] = ()) -> list[str]:
    """:func:`columns` of ``rows`` in blocks of columns, each at most ``width`` characters wide
    (a column wider than that alone gets a block of its own), the first ``keep`` columns (the
    labels) repeated at the start of every block, blocks one empty line apart: a wide table on
    a terminal of ``width`` columns without wrapped lines. ``width`` 0: one block."""
    texts = [[cell(c) for c in row] for row in rows]
    sized = _sized(texts)
    blocks: list[list[int]] = []
    used = sum(sized[:keep]) + 2 * keep
    for i in range(keep, len(sized)):
        if not blocks or (width and used + sized[i] > width and len(blocks[-1]) > keep):
            blocks.append(list(range(keep)))
            used = sum(sized[:keep]) + 2 * keep
        blocks[-1].append(i)
        used += sized[i] + 2
    out: list[str] = []
    for b, block in enumerate(blocks):
        out += [""] if b else []
        out += [line([r[i] if i < len(r) else "" for i in block], [sized[i] for i in block],
                     {j for j, i in enumerate(block) if i in left}) for r in texts]
    return out
