"""tpmpi.ParallelAttention at world sizes 1-4 against the serial reference's attention
(tests/gpt_reference.py): the output and the gradients of every rank's blocks of c_attn (its
heads' Q, K, V columns, K/V summed over the ranks sharing a kv head) and c_proj, with and
without sequence parallelism, dropout on the probabilities; the schedule's steps."""
import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from tpmpi.core.dropout import attention_keep
from tpmpi.core.partition import block_range
from tpmpi.core.schedule import Collective
from tpmpi.layers.attention import ParallelAttention
from tpmpi.models import GPTConfig

TOL = 1e-12


@pytest.mark.parametrize("heads", [(4, 1), (6, 3), (3, 3), (4, 4)], ids=str)
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_matches_the_serial_attention(grid, xb, heads, sp):
    nh, nkv = heads
    cfg = GPTConfig(7, 8, 1, nh, 2 * nh, n_kv_head=nkv)
    sd = ref.random_state_dict(cfg, seed=1)
    attn_sd = {k.partition(".attn.")[2]: v for k, v in sd.items() if ".attn." in k}
    B, T, d, p = 2, 5, cfg.n_embd, 0.25
    rng = np.random.default_rng(2)
    x, dout = rng.standard_normal((B * T, d)), rng.standard_normal((B * T, d))
    z = ref.Dims(cfg, B, T)
    keep = attention_keep(p, seed=3, call=1, layer=0, n_head=nh, seq=T)
    m_att = np.stack([keep(h, 0, B) for h in range(nh)], axis=1) / (1 - p)
    y_ref, saved = ref.attention(ref._linear(x.reshape(B, T, d), attn_sd, "c_attn"), z, m_att)
    want = ref._linear(y_ref, attn_sd, "c_proj").reshape(B * T, d)
    grads: dict = {}
    dy = ref._linear_back(dout.reshape(B, T, d), y_ref, attn_sd, "c_proj", grads)
    dx_ref = ref._linear_back(ref.attention_backward(dy, z, saved), x.reshape(B, T, d),
                              attn_sd, "c_attn", grads).reshape(B * T, d)
    layer = ParallelAttention(d, nh, nkv, grid=grid, backend=xb, dtype="float64",
                              sequence_parallel=sp, dense=attn_sd)
    rank, size = grid.comm.Get_rank(), grid.size
    rows = slice(*block_range(B * T, size, rank)) if sp else slice(None)
    s = layer.shard
    keep_here = attention_keep(p, seed=3, call=1, layer=0, n_head=nh, seq=T,
                               q_head0=s.q_heads[0], backend=xb)
    y = layer.forward(xb.asarray(x[rows]), B, T, p=p, keep=keep_here)
    assert rel_err(xb.to_host(y), want[rows]) <= TOL
    dx = layer.backward(xb.asarray(dout[rows]))
    assert rel_err(xb.to_host(dx), dx_ref[rows]) <= TOL
    index = layer.heads.qkv_index(rank, cfg.head_size)
    cols = layer.heads.proj_cols(rank, cfg.head_size)
    got = {"c_attn.weight": layer.c_attn.grad_weight, "c_attn.bias": layer.c_attn.grad_bias,
           "c_proj.weight": layer.c_proj.grad_weight, "c_proj.bias": layer.c_proj.grad_bias}
    mine = {"c_attn.weight": grads["c_attn.weight"][index].T,
            "c_attn.bias": grads["c_attn.bias"][index],
            "c_proj.weight": grads["c_proj.weight"][:, cols].T,
            "c_proj.bias": grads["c_proj.bias"]}
    for key, value in mine.items():
        assert rel_err(xb.to_host(got[key]), value) <= TOL, key
    assert (layer.sum_kv is not None) == (len(layer.heads.kv_peers(rank)) > 1)


def test_schedule_lists_the_kv_sum_where_a_kv_head_is_shared():
    shared = ParallelAttention.schedule_for(2, 16, 64, 8, 4, n_kv_head=2, backward=True)
    names = [s.name for s in shared.backward if hasattr(s, "name")]
    assert "sum_kv" in names and names.index("reduce_dx") < names.index("c_attn.dW")
    alone = ParallelAttention.schedule_for(2, 16, 64, 8, 4, n_kv_head=4, backward=True,
                                           sequence_parallel=True)
    colls = {s.name: s.op for s in alone.steps() if isinstance(s, Collective)}
    assert colls == {"gather_x": "allgather", "reduce_y": "reduce_scatter",
                     "gather_dy": "allgather", "reduce_dx": "reduce_scatter"}
    assert not [s for s in ParallelAttention.schedule_for(2, 16, 64, 8, 1).steps()
                if isinstance(s, Collective)]


def test_half_precision_partials_are_summed_in_float32(grid, xb):
    """float16: each of two heads' share of c_proj is +-80000 (beyond float16's 65504) and
    they cancel; summed in float32 and rounded once, y is the bias, as the serial float16
    product (float32 accumulation) gives -- partials rounded to float16 first would be inf."""
    d, nh = 4, 2
    v_rows = slice(2 * d, 3 * d)  # [Q | K | V] rows, hd = 2
    c_attn_b = np.zeros(3 * d)
    c_attn_b[v_rows] = 200.0  # every value vector is 200: the attention output is 200
    c_proj_w = np.zeros((d, d))
    c_proj_w[:, :2], c_proj_w[:, 2:] = 200.0, -200.0  # head 0's columns, head 1's
    dense = {"c_attn.weight": np.zeros((3 * d, d)), "c_attn.bias": c_attn_b,
             "c_proj.weight": c_proj_w, "c_proj.bias": np.full(d, 0.5)}
    layer = ParallelAttention(d, nh, grid=grid, backend=xb, dtype="float16", dense=dense)
    x = xb.asarray(np.ones((6, d), np.float16))
    y = xb.to_host(layer.forward(x, 2, 3))
    assert y.dtype == np.float16 and np.array_equal(y, np.full((6, d), 0.5, np.float16))
    dx = xb.to_host(layer.backward(xb.asarray(np.ones((6, d), np.float16))))
    assert dx.dtype == np.float16 and np.isfinite(dx).all()
