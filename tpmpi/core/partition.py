"""Block partition math: sizes, offsets, MPI counts and displacements.

Part ``i`` of ``n`` items over ``p`` parts gets ``n // p + (1 if i < n % p else 0)`` items,
contiguous and in rank order. Zero-size parts are legal (``p > n``). Every split of items over
ranks in tpmpi goes through these functions (layouts map them onto the axes of an array:
:func:`tpmpi.core.layout.block_bounds`).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from .args import check_int


def _check_split(n: int, parts: int) -> None:
    check_int("n", n)
    check_int("parts", parts, 1)


def block_sizes(n: int, parts: int) -> list[int]:
    """Number of items in each of ``parts`` contiguous blocks of ``n`` items."""
    _check_split(n, parts)
    base, extra = divmod(int(n), int(parts))
    return [base + (1 if i < extra else 0) for i in range(int(parts))]


def block_partition(n: int, parts: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block; blocks tile ``range(n)`` in order."""
    sizes = block_sizes(n, parts)
    return list(zip(displacements(sizes), itertools.accumulate(sizes)))


def block_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``index`` without building the whole list."""
    _check_split(n, parts)
    if not 0 <= index < parts:
        raise ValueError(f"index={index!r}: expected 0 <= index < {parts}")
    base, extra = divmod(int(n), int(parts))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def largest_block(n: int, parts: int) -> int:
    """Size of the largest block (block 0's): ``ceil(n / parts)``."""
    _check_split(n, parts)
    return -(-int(n) // int(parts))


def displacements(counts: Sequence[int]) -> list[int]:
    """Start of each of the consecutive ``counts`` (MPI's displacements of a v-collective)."""
    return list(itertools.accumulate(counts[:-1], initial=0)) if len(counts) else []
