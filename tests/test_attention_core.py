"""tpmpi.layers.attention_core against the independent float64 reference: every rank's heads of
every head partition (MHA, GQA with n_kv_head 1 and between, uneven heads, ranks with no head)
give the reference's output for those heads, and their dQ, dK, dV -- dK/dV summed over the
ranks that share a kv head -- assemble the reference's d(qkv); dropout masks from the
layout-invariant source; every dtype within tolerance; the score workspace stays bounded."""
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from problems import HALFS
from tpmpi.core.dropout import Site, attention_keep, keep_mask
from tpmpi.core.dtypes import tolerance
from tpmpi.core.heads import head_partition
from tpmpi.layers import attention_core
from tpmpi.layers.attention_core import causal_attention, causal_attention_backward

KEY = dict(seed=3, call=1, layer=2)


def split(qkv, n_q, n_kv, hd):
    """q (B, T, n_q, hd), k, v (B, T, n_kv, hd) of a local fused product [Q | K | V]."""
    B, T, _ = qkv.shape
    q = qkv[..., :n_q * hd].reshape(B, T, n_q, hd)
    k = qkv[..., n_q * hd:(n_q + n_kv) * hd].reshape(B, T, n_kv, hd)
    v = qkv[..., (n_q + n_kv) * hd:].reshape(B, T, n_kv, hd)
    return q, k, v


def reference(qkv, dy, n_head, n_kv_head, hd, p):
    B, T, _ = qkv.shape
    cfg = SimpleNamespace(n_head=n_head, n_kv_head=n_kv_head, n_embd=n_head * hd, vocab_size=1)
    z = ref.Dims(cfg, B, T)
    mask = 1.0 if p == 0 else keep_mask(p, **KEY, site=Site.ATTENTION,
                                        sample_shape=(n_head, T, T), samples=(0, B)) / (1 - p)
    y, saved = ref.attention(qkv, z, mask)
    return y, ref.attention_backward(dy, z, saved)


def run_rank(qkv, dy, part, rank, hd, p, dtype, fused=False):
    """The kernel on ``rank``'s heads: (y of its heads, d(local fused qkv)) as float64; with
    ``fused`` the backward writes into the column blocks of one (B, T, (Hq + 2 Hkv) hd)
    array (the layer's d(qkv)), prefilled with NaN."""
    s = part.shard(rank)
    B, T, _ = qkv.shape
    local = qkv[..., part.qkv_index(rank, hd)].astype(dtype)
    q, k, v = split(local, s.n_q, s.n_kv, hd)
    keep = attention_keep(p, **KEY, n_head=part.n_head, seq=T, q_head0=s.q_heads[0])
    y, saved = causal_attention(q, k, v, s.kv_of_q, p=p, keep=keep if p else None)
    dyl = dy[..., part.proj_cols(rank, hd)].reshape(B, T, s.n_q, hd).astype(dtype)
    whole = np.full(local.shape, np.nan, dtype=dtype)
    views = split(whole, s.n_q, s.n_kv, hd) if fused else None
    dq, dk, dv = causal_attention_backward(dyl, saved, out=views)
    assert y.dtype == dq.dtype == dk.dtype == dv.dtype == np.dtype(dtype)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    if fused:
        assert all(got is view for got, view in zip((dq, dk, dv), views))
        return y.reshape(B, T, -1).astype(np.float64), whole.astype(np.float64)
    dlocal = np.concatenate([a.reshape(B, T, -1).astype(np.float64) for a in (dq, dk, dv)], -1)
    return y.reshape(B, T, -1).astype(np.float64), dlocal


def check_partition(n_head, n_kv, tp, *, B=2, T=5, hd=3, p=0.0, dtype="float64", tol=1e-12,
                    fused=False):
    rng = np.random.default_rng(n_head * 100 + n_kv * 10 + tp)
    qkv = rng.standard_normal((B, T, (n_head + 2 * n_kv) * hd)).astype(dtype).astype(np.float64)
    dy = rng.standard_normal((B, T, n_head * hd)).astype(dtype).astype(np.float64)
    want_y, want_dqkv = reference(qkv, dy, n_head, n_kv, hd, p)
    part = head_partition(n_head, n_kv, tp)
    y = np.zeros_like(want_y)
    dqkv = np.zeros_like(want_dqkv)
    for r in range(tp):
        y_r, d_r = run_rank(qkv, dy, part, r, hd, p, dtype, fused)
        y[..., part.proj_cols(r, hd)] = y_r
        # Q rows belong to one rank; K/V rows of a shared kv head are summed over its ranks
        dqkv[..., part.qkv_index(r, hd)] += d_r
    assert rel_err(y, want_y) <= tol
    assert rel_err(dqkv, want_dqkv) <= tol


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (4, 1), (6, 3), (3, 3), (8, 2), (1, 1)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_rank_of_every_partition_float64(n_head, n_kv, tp, p):
    check_partition(n_head, n_kv, tp, p=p)


@pytest.mark.parametrize("n_head,n_kv,tp", [(4, 4, 2), (8, 2, 3), (6, 3, 4), (4, 1, 1), (3, 3, 4)])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backward_into_one_fused_array(monkeypatch, n_head, n_kv, tp, dtype, p):
    """dQ, dK, dV written into the column blocks of one d(qkv) (ParallelAttention's): every
    element written (the NaN fill gone), the values those of the reference; tiles that do not
    divide T."""
    monkeypatch.setattr(attention_core, "TILE", 2)
    tol = 1e-12 if dtype == "float64" else tolerance(dtype, 8)
    check_partition(n_head, n_kv, tp, B=3, T=7, p=p, dtype=dtype, tol=tol, fused=True)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 9)])
def test_edge_shapes(B, T):
    check_partition(4, 2, 3, B=B, T=T, p=0.2)


@pytest.mark.parametrize("tile", [1, 2, 3, 4])
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("n_head,n_kv,tp", [(4, 4, 1), (8, 2, 3), (6, 3, 4), (4, 1, 2)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("workspace", [1, None])
def test_tiles_of_any_size(monkeypatch, tile, T, n_head, n_kv, tp, p, workspace):
    """Query tiles narrower than T, not dividing it, or wider; one matrix a chunk or all."""
    monkeypatch.setattr(attention_core, "TILE", tile)
    if workspace:
        monkeypatch.setattr(attention_core, "WORKSPACE_BYTES", workspace)
    check_partition(n_head, n_kv, tp, B=3, T=T, p=p)


@pytest.mark.parametrize("kv_of_q", [(0, 1, 1), (1, 0), (0, 1, 0, 1), (2, 2, 0), (0, 0, 0)])
def test_any_head_map_equals_one_head_at_a_time(monkeypatch, kv_of_q):
    """Head maps no partition makes (runs of unequal length, kv heads out of order) give, per
    query head, the single-head call on its kv head; dK, dV summed over the heads sharing it."""
    monkeypatch.setattr(attention_core, "TILE", 3)
    rng = np.random.default_rng(7)
    B, T, hd, n_kv = 2, 7, 3, 3
    q, dy = (rng.standard_normal((B, T, len(kv_of_q), hd)) for _ in range(2))
    k, v = (rng.standard_normal((B, T, n_kv, hd)) for _ in range(2))
    y, saved = causal_attention(q, k, v, kv_of_q)
    dq, dk, dv = causal_attention_backward(dy, saved)
    want_dk, want_dv = np.zeros_like(k), np.zeros_like(v)
    for h, j in enumerate(kv_of_q):
        one = [a[:, :, i:i + 1] for a, i in ((q, h), (k, j), (v, j))]
        y1, s1 = causal_attention(*one, (0,))
        dq1, dk1, dv1 = causal_attention_backward(dy[:, :, h:h + 1], s1)
        assert rel_err(y[:, :, h:h + 1], y1) < 1e-14 and rel_err(dq[:, :, h:h + 1], dq1) < 1e-14
        want_dk[:, :, j:j + 1] += dk1
        want_dv[:, :, j:j + 1] += dv1
    assert rel_err(dk, want_dk) < 1e-14 and rel_err(dv, want_dv) < 1e-14


@pytest.mark.parametrize("dtype", ["float32", *HALFS])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_low_precision_within_tolerance(dtype, p):
    T, hd = 16, 8
    check_partition(4, 2, 2, B=2, T=T, hd=hd, p=p, dtype=dtype, tol=tolerance(dtype, max(T, hd)))


def test_a_rank_with_no_heads():
    q = np.zeros((2, 4, 0, 3))
    k = np.zeros((2, 4, 0, 3))
    y, saved = causal_attention(q, k, k, ())
    dq, dk, dv = causal_attention_backward(np.zeros_like(y), saved)
    assert y.shape == dq.shape == (2, 4, 0, 3) and dk.shape == dv.shape == (2, 4, 0, 3)


def test_the_first_position_attends_only_to_itself():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 1, 2)) for _ in range(3))
    y, _ = causal_attention(q, k, v, (0,))
    assert np.allclose(y[0, 0, 0], v[0, 0, 0], rtol=0, atol=1e-15)


def test_sample_blocks_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(1)
    B, T = 5, 6
    q, k, v, dy = (rng.standard_normal((B, T, 2, 4)) for _ in range(4))
    keep = attention_keep(0.3, **KEY, n_head=2, seq=T)
    y, saved = causal_attention(q, k, v, (0, 1), p=0.3, keep=keep)
    grads = causal_attention_backward(dy, saved)
    monkeypatch.setattr(attention_core, "WORKSPACE_BYTES", 1)  # one sample at a time
    y1, saved1 = causal_attention(q, k, v, (0, 1), p=0.3, keep=keep)
    assert np.array_equal(y, y1)
    for a, b in zip(grads, causal_attention_backward(dy, saved1)):
        assert np.array_equal(a, b)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_scores_are_never_formed_for_all_heads_at_once(monkeypatch):
    """Peak memory of forward + backward over 64 heads stays within the workspace bound plus a
    few input-sized arrays, far below the (B, H, T, T) scores of all heads, and falls with the
    bound."""
    B, T, H, hd = 2, 256, 64, 4
    rng = np.random.default_rng(2)
    q, k, v, dy = (rng.standard_normal((B, T, H, hd)).astype(np.float32) for _ in range(4))
    inputs, all_heads = q.nbytes, B * H * T * T * 4

    def step():
        causal_attention_backward(dy, causal_attention(q, k, v, range(H))[1])
    monkeypatch.setattr(attention_core, "WORKSPACE_BYTES", 2 * 2**20)
    peak = peak_bytes(step)
    assert peak < 2 * 2**20 + 10 * inputs <= all_heads / 4, (peak, inputs, all_heads)
    monkeypatch.setattr(attention_core, "WORKSPACE_BYTES", 1)  # one matrix per chunk
    assert peak_bytes(step) < peak - 2**20


@pytest.mark.parametrize("args,match", [
    (((2, 3, 2, 4), (2, 3, 1, 4), (2, 3, 1, 5), (0, 0)), r"k, v of one shape"),
    (((2, 3, 2, 4), (2, 4, 1, 4), (2, 4, 1, 4), (0, 0)), r"k.shape=\(2, 4, 1, 4\)"),
    (((2, 3, 2, 4), (2, 3, 1, 4), (2, 3, 1, 4), (0, 1)), r"kv_of_q=\(0, 1\): expected 2 kv"),
    (((2, 3, 2, 4), (2, 3, 1, 4), (2, 3, 1, 4), (0,)), r"kv_of_q=\(0,\)"),
    (((2, 3, 4), (2, 3, 4), (2, 3, 4), ()), r"q \(B, T, Hq, hd\)")])
def test_bad_shapes(args, match):
    q, k, v, heads = args
    with pytest.raises(ValueError, match=match):
        causal_attention(np.zeros(q), np.zeros(k), np.zeros(v), heads)


def test_bad_dropout_and_dy():
    q = np.zeros((1, 2, 1, 2))
    with pytest.raises(ValueError, match=r"p=0\.5: dropout needs a keep-mask source"):
        causal_attention(q, q, q, (0,), p=0.5)
    with pytest.raises(ValueError, match=r"p=1\.0"):
        causal_attention(q, q, q, (0,), p=1.0, keep=lambda h, a, b: None)
    with pytest.raises(ValueError, match="dtypes float64, float32"):
        causal_attention(q, q.astype(np.float32), q, (0,))
    _, saved = causal_attention(q, q, q, (0,))
    with pytest.raises(ValueError, match=r"dy.shape=\(1, 2, 1, 3\): expected \(1, 2, 1, 2\)"):
        causal_attention_backward(np.zeros((1, 2, 1, 3)), saved)


def test_on_the_backend(xb):
    rng = np.random.default_rng(5)
    q, k, v, dy = (rng.standard_normal((2, 4, 2, 3)) for _ in range(4))
    keep = attention_keep(0.2, **KEY, n_head=2, seq=4, backend=xb)
    y, saved = causal_attention(*(xb.asarray(a) for a in (q, k, v)), (0, 1), p=0.2, keep=keep)
    grads = causal_attention_backward(xb.asarray(dy), saved)
    y0, saved0 = causal_attention(q, k, v, (0, 1), p=0.2,
                                  keep=attention_keep(0.2, **KEY, n_head=2, seq=4))
    assert rel_err(xb.to_host(y), y0) < 1e-13
    for a, b in zip(grads, causal_attention_backward(dy, saved0)):
        assert rel_err(xb.to_host(a), b) < 1e-13
