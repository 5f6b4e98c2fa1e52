"""Block partition math: sizes, offsets, MPI counts and displacements.

Part ``i`` of ``n`` items over ``p`` parts gets ``n // p + (1 if i < n % p else 0)`` items,
contiguous and in rank order. Zero-size parts are legal (``p > n``).
"""
from __future__ import annotations

from .args import check_int


def _check(n: int, parts: int) -> None:
    check_int("n", n)
    check_int("parts", parts, 1)


def block_sizes(n: int, parts: int) -> list[int]:
    """Number of items in each of ``parts`` contiguous blocks of ``n`` items."""
    _check(n, parts)
    base, extra = divmod(int(n), int(parts))
    return [base + (1 if i < extra else 0) for i in range(int(parts))]


def block_partition(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block; blocks tile ``range(n)`` in order."""
    bounds, start = [], 0
    for size in block_sizes(n, parts):
        bounds.append((start, start + size))
        start += size
    return bounds


def block_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``index`` without building the whole list."""
    _check(n, parts)
    if not 0 <= index < parts:
        raise ValueError(f"index={index!r}: expected 0 <= index < {parts}")
    base, extra = divmod(int(n), int(parts))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)

