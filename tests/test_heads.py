"""tpmpi.core.heads, exhaustively over small sizes: every query head on exactly one rank, in
rank order; kv groups block-partitioned (remainder to low ranks) when n_kv_head >= tp, else
each group on a block of ranks with its query heads split among them and its kv head on exactly
those ranks; the fused c_attn rows each rank holds against a labelled weight; c_proj columns;
vocab blocks."""
import numpy as np
import pytest

from tpmpi.core.heads import HeadPartition, head_partition, vocab_block
from tpmpi.core.partition import block_sizes

SIZES = [(n_head, n_kv, tp) for n_head in range(1, 13) for n_kv in range(1, n_head + 1)
         if n_head % n_kv == 0 for tp in range(1, 9)]


@pytest.mark.parametrize("n_head,n_kv,tp", SIZES)
def test_partition_rule(n_head, n_kv, tp):
    part = head_partition(n_head, n_kv, tp)
    g = n_head // n_kv
    shards = part.shards
    assert [s.rank for s in shards] == list(range(tp))
    # query heads: contiguous, in rank order, each exactly once
    assert shards[0].q_heads[0] == 0 and shards[-1].q_heads[1] == n_head
    for a, b in zip(shards, shards[1:]):
        assert a.q_heads[1] == b.q_heads[0]
    for s in shards:
        # a rank holds exactly the kv heads its query heads attend with
        assert set(range(*s.kv_heads)) == {h // g for h in range(*s.q_heads)}
        assert s.kv_of_q == tuple(h // g - s.kv_heads[0] for h in range(*s.q_heads))
        assert all(0 <= j < s.n_kv for j in s.kv_of_q)
    if n_kv >= tp:  # whole groups, block-partitioned
        assert [s.n_kv for s in shards] == block_sizes(n_kv, tp)
        assert all(s.n_q == g * s.n_kv for s in shards)
        assert all(len(r) == 1 for r in part.kv_ranks)
    else:
        used = min(tp, n_head)
        assert [s.n_kv for s in shards] == [1] * used + [0] * (tp - used)
        assert [len(r) for r in part.kv_ranks] == block_sizes(used, n_kv)
        for ranks in part.kv_ranks:
            assert list(ranks) == list(range(ranks[0], ranks[0] + len(ranks)))
            assert [shards[r].n_q for r in ranks] == block_sizes(g, len(ranks))
            assert all(part.kv_peers(r) == ranks for r in ranks)
        assert all(s.n_q == 0 and s.n_kv == 0 for s in shards[used:])
    # every kv head is held by the ranks kv_ranks lists, and only there
    for j, ranks in enumerate(part.kv_ranks):
        assert ranks == tuple(s.rank for s in shards if s.kv_heads[0] <= j < s.kv_heads[1])
    # the query heads are balanced to within one group (or one head below a group)
    loads = [s.n_q for s in shards]
    assert max(loads) - min(loads) <= (g if n_kv >= tp else max(1, g))


@pytest.mark.parametrize("n_head,n_kv,tp", [s for s in SIZES if s[0] <= 8 and s[2] <= 5])
def test_fused_qkv_rows_hold_the_ranks_heads(n_head, n_kv, tp):
    """Label every row of c_attn.weight with (block, head, row in head); each rank's rows must
    be [its Q heads | its kv heads' K | its kv heads' V], head by head."""
    hd = 3
    part = head_partition(n_head, n_kv, tp)
    labels = [(kind, h, j) for kind, n in (("q", n_head), ("k", n_kv), ("v", n_kv))
              for h in range(n) for j in range(hd)]
    for r, s in enumerate(part.shards):
        rows = [labels[i] for i in part.qkv_index(r, hd)]
        want = [(kind, h, j) for kind, heads in (("q", s.q_heads), ("k", s.kv_heads),
                                                 ("v", s.kv_heads))
                for h in range(*heads) for j in range(hd)]
        assert rows == want
        assert [labels[i] for sl in part.qkv_rows(r, hd) for i in range(sl.start, sl.stop)] \
            == want
        cols = part.proj_cols(r, hd)
        assert (cols.start, cols.stop) == (s.q_heads[0] * hd, s.q_heads[1] * hd)
    # the Q rows tile the Q block; K and V rows cover their blocks (shared kv rows repeated)
    q = np.concatenate([part.qkv_index(r, hd)[:part.shards[r].n_q * hd] for r in range(tp)])
    assert np.array_equal(q, np.arange(n_head * hd))


def test_a_plain_row_split_would_scramble_qkv():
    """What the head partition prevents: for MHA on 2 ranks a contiguous half of the rows holds
    only query heads."""
    part = head_partition(4, 4, 2)
    assert set(part.qkv_index(0, 2)) != set(range(12))
    assert list(part.qkv_index(0, 2)) == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]


def test_examples():
    # 6 heads, 3 kv heads (groups of 2) over 4 ranks: groups on ranks [0, 1], [2], [3]
    p = head_partition(6, 3, 4)
    assert [s.q_heads for s in p.shards] == [(0, 1), (1, 2), (2, 4), (4, 6)]
    assert p.kv_ranks == ((0, 1), (2,), (3,))
    # MQA, 2 query heads on 4 ranks: ranks 2 and 3 hold nothing
    p = head_partition(2, 1, 4)
    assert [s.q_heads for s in p.shards] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert p.kv_ranks == ((0, 1),) and p.kv_peers(3) == (3,)
    # MHA, 3 heads on 4 ranks: remainder to low ranks, the last rank idle
    assert [s.n_q for s in head_partition(3, 3, 4).shards] == [1, 1, 1, 0]
    assert [s.n_q for s in head_partition(5, 5, 3).shards] == [2, 2, 1]
    assert head_partition(8, 2, 4).shards[3].kv_of_q == (0, 0)


@pytest.mark.parametrize("args,match", [
    ((6, 4, 2), r"n_kv_head=4: expected a divisor of n_head=6"),
    ((0, 1, 2), r"n_head=0: expected a positive integer"),
    ((4, 0, 2), r"n_kv_head=0"), ((4, 2, 0), r"tp=0"), ((4.0, 2, 1), r"n_head=4.0")])
def test_bad_partitions(args, match):
    with pytest.raises(ValueError, match=match):
        HeadPartition(*args)


def test_bad_ranks_and_head_sizes():
    p = head_partition(4, 2, 2)
    with pytest.raises(ValueError, match=r"rank=2: expected 0 <= rank < tp=2"):
        p.shard(2)
    with pytest.raises(ValueError, match="head_size=0"):
        p.qkv_rows(0, 0)


@pytest.mark.parametrize("V", [1, 2, 5, 7, 103, 1000])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_vocab_blocks_tile_the_vocabulary_unpadded(V, tp):
    blocks = [vocab_block(V, tp, r) for r in range(tp)]
    assert blocks[0][0] == 0 and blocks[-1][1] == V
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert [b - a for a, b in blocks] == block_sizes(V, tp)
    with pytest.raises(ValueError, match=f"rank={tp}: expected 0 <= rank < tp={tp}"):
        vocab_block(V, tp, tp)
    with pytest.raises(ValueError, match="vocab_size=0"):
        vocab_block(0, tp, 0)
