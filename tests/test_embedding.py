"""tpmpi.VocabParallelEmbedding and the position embedding at world sizes 1-4: the lookup
(replicated, or each rank's token rows under sequence parallelism, rows that cut sequences)
and the gradients of every rank's vocabulary block against NumPy; the blocks are the vocabulary
partition, never padded; the schedule's collectives."""
import numpy as np
import pytest

from conftest import rel_err
from tpmpi.core.heads import vocab_block
from tpmpi.core.partition import block_range
from tpmpi.core.schedule import Collective
from tpmpi.layers.embedding import PositionEmbedding, VocabParallelEmbedding


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("vocab", [3, 10])
@pytest.mark.parametrize("B, T", [(3, 5), (1, 1)])  # (1, 1): ranks without a token under SP
def test_lookup_and_gradients(grid, xb, sp, vocab, B, T):
    rng = np.random.default_rng(0)
    d = 4
    wte, wpe = rng.standard_normal((vocab, d)), rng.standard_normal((8, d))
    ids = rng.integers(0, vocab, B * T)
    dx = rng.standard_normal((B * T, d))
    common = dict(grid=grid, backend=xb, dtype="float64")
    emb = VocabParallelEmbedding(vocab, d, sequence_parallel=sp, dense=wte, **common)
    pos = PositionEmbedding(8, d, dense=wpe, **common)
    rank, size = grid.comm.Get_rank(), grid.size
    assert (emb.start, emb.stop) == vocab_block(vocab, size, rank)
    a, b = block_range(B * T, size, rank) if sp else (0, B * T)
    x = pos.forward(emb.forward(xb.asarray(ids)), T, a)
    want = wte[ids] + wpe[np.arange(B * T) % T]
    assert rel_err(xb.to_host(x), want[a:b]) <= 1e-15
    emb.backward(xb.asarray(dx[a:b]))
    pos.backward(xb.asarray(dx[a:b]))
    g = np.zeros_like(wte)
    np.add.at(g, ids, dx)
    assert rel_err(xb.to_host(emb.grad_weight), g[emb.start:emb.stop]) <= 1e-14
    share = np.zeros_like(wpe)
    np.add.at(share, np.arange(a, b) % T, dx[a:b])  # this rank's share of wpe's gradient
    assert rel_err(xb.to_host(pos.grad_weight), share) <= 1e-14


def test_schedule():
    sched = VocabParallelEmbedding.schedule_for(64, 1000, 32, 4, sequence_parallel=True,
                                                backward=True)
    colls = [(s.name, s.op) for s in sched.steps() if isinstance(s, Collective)]
    assert colls == [("reduce_x", "reduce_scatter"), ("gather_dx", "allgather")]
    assert sched.param_bytes == 250 * 32 * 4
