"""Which attention heads each tensor-parallel rank holds, as data.

Query head ``h`` attends with kv head ``h // group`` (``group = n_head // n_kv_head``); a kv
group is one kv head and its ``group`` query heads. The rule (:func:`head_partition`):

* ``n_kv_head >= tp``: the kv groups are block-partitioned over the ranks (``n_kv_head // tp``
  each, one more on the first ``n_kv_head % tp`` ranks): every rank holds whole groups, no kv
  head lives on two ranks.
* ``n_kv_head < tp``: each group gets a block of ranks -- the first ``min(tp, n_head)`` ranks
  block-partitioned over the groups, remainder to the low groups -- and the group's query heads
  are block-partitioned over its ranks. Every rank of the block holds the group's kv head (its
  K/V weight rows are replicated there, and their gradients must be summed over exactly those
  ranks: :attr:`HeadPartition.kv_ranks`). When ``tp > n_head`` the ranks from ``n_head`` on
  hold no head.

Any ``n_head`` on any ``tp`` works (uneven blocks, ranks with no head); nothing is padded.

The fused ``c_attn.weight`` is ``((n_head + 2 n_kv_head) hd, d)`` with rows blocked
``[Q heads | K heads | V heads]`` (nanoGPT's layout). A rank's rows are three slices, one per
block (:meth:`HeadPartition.qkv_rows`), concatenated in that order: its local fused product is
``[Q local | K local | V local]``. A plain contiguous split of the rows would hand rank 0 only
query rows and scramble Q, K and V silently. The attention's ``c_proj.weight`` ``(d, n_head
hd)`` is split by columns along the same head boundaries (:meth:`HeadPartition.proj_cols`).
"""
from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from .args import check_int
from .partition import block_partition, block_range


def _check_rank(rank: int, tp: int) -> int:
    check_int("tp", tp, 1)
    if check_int("rank", rank) >= tp:
        raise ValueError(f"rank={rank}: expected 0 <= rank < tp={tp}")
    return int(rank)


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The heads of one rank: global query heads ``[q_heads[0], q_heads[1])`` and global kv
    heads ``[kv_heads[0], kv_heads[1])`` (both empty on a rank with no head)."""

    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    group: int
    """Query heads per kv head (``n_head // n_kv_head``)."""

    @property
    def n_q(self) -> int:
        """Number of query heads held."""
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        """Number of kv heads held."""
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def kv_of_q(self) -> tuple[int, ...]:
        """For each local query head, the local index of the kv head it attends with."""
        return tuple(h // self.group - self.kv_heads[0] for h in range(*self.q_heads))


@dataclasses.dataclass(frozen=True)
class HeadPartition:
    """The heads of every rank of a ``tp``-rank group for ``n_head`` query and ``n_kv_head``
    kv heads (``n_kv_head`` divides ``n_head``); see the module docstring for the rule."""

    n_head: int
    n_kv_head: int
    tp: int

    def __post_init__(self) -> None:
        check_int("n_head", self.n_head, 1)
        check_int("n_kv_head", self.n_kv_head, 1)
        check_int("tp", self.tp, 1)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head}: expected a divisor of "
                             f"n_head={self.n_head}")

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.n_head // self.n_kv_head

    @cached_property
    def shards(self) -> tuple[HeadShard, ...]:
        """One :class:`HeadShard` per rank, in rank order."""
        g, tp = self.group, self.tp
        if self.n_kv_head >= tp:
            kv = block_partition(self.n_kv_head, tp)
            return tuple(HeadShard(r, (a * g, b * g), (a, b), g) for r, (a, b) in enumerate(kv))
        shards = []
        for j, (r0, r1) in enumerate(block_partition(min(tp, self.n_head), self.n_kv_head)):
            for i, (a, b) in enumerate(block_partition(g, r1 - r0)):
                shards.append(HeadShard(r0 + i, (j * g + a, j * g + b), (j, j + 1), g))
        end = self.n_head  # the idle ranks hold empty ranges at the end of the heads
        shards += [HeadShard(r, (end, end), (self.n_kv_head, self.n_kv_head), g)
                   for r in range(len(shards), tp)]
        return tuple(shards)

    def shard(self, rank: int) -> HeadShard:
        """The heads of ``rank``."""
        return self.shards[_check_rank(rank, self.tp)]

    @cached_property
    def kv_ranks(self) -> tuple[tuple[int, ...], ...]:
        """For each kv head, the ranks holding it (one rank unless ``n_kv_head < tp``): the
        gradients of its K and V weight rows and biases are summed over exactly these ranks."""
        holders: list[list[int]] = [[] for _ in range(self.n_kv_head)]
        for s in self.shards:
            for j in range(*s.kv_heads):
                holders[j].append(s.rank)
        return tuple(tuple(h) for h in holders)

    def kv_peers(self, rank: int) -> tuple[int, ...]:
        """The ranks (``rank`` included) that hold the same kv head as ``rank``; just
        ``(rank,)`` when its kv heads are its own or it holds none."""
        s = self.shard(rank)
        if s.n_kv != 1:
            return (rank,)
        return self.kv_ranks[s.kv_heads[0]]

    def qkv_rows(self, rank: int, head_size: int) -> tuple[slice, slice, slice]:
        """The rows of the fused ``c_attn`` weight (and bias) ``rank`` holds: one slice in each
        of the Q, K and V blocks, in that order."""
        check_int("head_size", head_size, 1)
        s, hd = self.shard(rank), head_size
        k0, v0 = self.n_head * hd, (self.n_head + self.n_kv_head) * hd
        return (slice(s.q_heads[0] * hd, s.q_heads[1] * hd),
                slice(k0 + s.kv_heads[0] * hd, k0 + s.kv_heads[1] * hd),
                slice(v0 + s.kv_heads[0] * hd, v0 + s.kv_heads[1] * hd))

    def qkv_index(self, rank: int, head_size: int) -> np.ndarray:
        """:meth:`qkv_rows` as one int64 index array (``W[index]`` is the local block)."""
        return np.concatenate([np.arange(r.start, r.stop, dtype=np.int64)
                               for r in self.qkv_rows(rank, head_size)])

    def proj_cols(self, rank: int, head_size: int) -> slice:
        """The columns of the attention's ``c_proj.weight`` ``(d, n_head hd)`` ``rank``
        holds: its query heads' features."""
        check_int("head_size", head_size, 1)
        q0, q1 = self.shard(rank).q_heads
        return slice(q0 * head_size, q1 * head_size)


def head_partition(n_head: int, n_kv_head: int, tp: int) -> HeadPartition:
    """The :class:`HeadPartition` of ``n_head`` query and ``n_kv_head`` kv heads over ``tp``
    ranks; ValueError naming the argument when ``n_kv_head`` does not divide ``n_head`` or a
    size is not positive."""
    return HeadPartition(n_head, n_kv_head, tp)


def vocab_block(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of the vocabulary rows (of ``wte``/``lm_head``) ``rank`` holds: the
    block partition, uneven and possibly empty, never padded, so every TP size trains the same
    model."""
    check_int("vocab_size", vocab_size, 1)
    return block_range(vocab_size, tp, _check_rank(rank, tp))
