"""tpmpi.layers.functional against the independent float64 reference (tests/gpt_reference.py):
LayerNorm forward and backward (bias or not, any leading shape, empty), inverted dropout, the
embedding lookup of vocabulary blocks (the blocks' sum is the full lookup, their gradients the
full scatter-add, empty blocks included), in every dtype within tpmpi's tolerance."""
import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from problems import HALFS
from tpmpi.core.dropout import keep_mask, keep_scale
from tpmpi.core.dtypes import tolerance
from tpmpi.core.heads import vocab_block
from tpmpi.layers import functional
from tpmpi.layers.functional import (accumulation_dtype, dropout, embedding_block,
                                     embedding_block_backward, layer_norm, layer_norm_backward)

DTYPES = ["float64", "float32", *HALFS]


def rounded(dtype, *arrays):
    """The arrays rounded to ``dtype`` and their float64 values (the reference's inputs)."""
    low = [a.astype(dtype) for a in arrays]
    return low, [a.astype(np.float64) for a in low]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 12), (1, 1, 3), (0, 8), (4, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_the_reference(dtype, shape, bias):
    rng = np.random.default_rng(0)
    d = shape[-1]
    (x, w, b, dy), (x64, w64, b64, dy64) = rounded(
        dtype, 3 + 2 * rng.standard_normal(shape), 1 + 0.3 * rng.standard_normal(d),
        rng.standard_normal(d), rng.standard_normal(shape))
    y, saved = layer_norm(x, w, b if bias else None)
    dx, dw, db = layer_norm_backward(dy, saved)
    want_y, ln = ref.layer_norm(x64, w64, b64 if bias else None)
    want_dx, want_dw, want_db = ref.layer_norm_backward(dy64, w64, ln)
    assert y.dtype == dx.dtype == dw.dtype == np.dtype(dtype)
    tol = tolerance(dtype, max(d, int(np.prod(shape[:-1]))))
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        assert rel_err(got, want) <= tol
    if bias:
        assert db.dtype == np.dtype(dtype) and rel_err(db, want_db) <= tol
    else:
        assert db is None


@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("block", [1, 20, 33, 10**6])
def test_layer_norm_row_blocks_give_the_whole_array_result(monkeypatch, dtype, block):
    """Rows taken a block at a time (one row, blocks of 1 or 2 rows of 16, a short last
    block, one block for all) give the reference's output and gradients, with a strided
    input."""
    monkeypatch.setattr(functional, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(4)
    (x, w, b, dy), (x64, w64, b64, dy64) = rounded(
        dtype, 1 + 2 * rng.standard_normal((3, 7, 32)), 1 + 0.3 * rng.standard_normal(16),
        rng.standard_normal(16), rng.standard_normal((3, 7, 16)))
    y, saved = layer_norm(x[..., ::2], w, b)
    dx, dw, db = layer_norm_backward(dy, saved)
    want_y, ln = ref.layer_norm(x64[..., ::2], w64, b64)
    tol = tolerance(dtype, 21)
    assert rel_err(y, want_y) <= tol
    for got, want in zip((dx, dw, db), ref.layer_norm_backward(dy64, w64, ln)):
        assert got.dtype == np.dtype(dtype) and rel_err(got, want) <= tol


def test_layer_norm_of_a_constant_row_is_its_bias():
    y, saved = layer_norm(np.full((2, 4), 3.0), np.ones(4), np.arange(4.0))
    assert np.array_equal(y, np.tile(np.arange(4.0), (2, 1)))
    dx, _, _ = layer_norm_backward(np.ones((2, 4)), saved)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_is_inverted_and_rounded_once(dtype):
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(dtype)
    keep = keep_mask(0.3, seed=1, call=0, layer=0, site=0, sample_shape=(5, 8), samples=(0, 3))
    y = dropout(x, keep, 0.3)
    assert y.dtype == np.dtype(dtype)
    assert rel_err(y, x.astype(np.float64) * keep / 0.7) <= tolerance(dtype, 1)
    assert np.all(y[~keep] == 0)
    acc = accumulation_dtype(np.dtype(dtype))
    assert np.array_equal(y, (x.astype(acc) * keep_scale(keep, 0.3, acc)).astype(dtype))
    assert dropout(x, keep, 0.0) is x and dropout(x, None, 0.3) is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,tp", [(11, 1), (11, 3), (5, 4), (3, 4), (2, 8)])
@pytest.mark.parametrize("B,T", [(2, 6), (1, 1)])
def test_embedding_blocks_sum_to_the_lookup(dtype, V, tp, B, T):
    rng = np.random.default_rng(2)
    d = 6
    wte = rng.standard_normal((V, d)).astype(dtype)
    ids = rng.integers(0, V, (B, T))
    ids[0, 0] = V - 1
    dout = rng.standard_normal((B, T, d)).astype(dtype)
    full = np.zeros((B, T, d))
    grads = []
    for r in range(tp):
        v0, v1 = vocab_block(V, tp, r)
        part = embedding_block(ids, wte[v0:v1], v0)
        assert part.shape == (B, T, d) and part.dtype == np.dtype(dtype)
        outside = (ids < v0) | (ids >= v1)
        assert not np.any(part[outside])
        full += part
        g = embedding_block_backward(dout, ids, v0, v1 - v0)
        assert g.shape == (v1 - v0, d) and g.dtype == np.dtype(dtype)
        grads.append(g)
    assert np.array_equal(full, wte.astype(np.float64)[ids])  # exactly one block holds each id
    want = np.zeros((V, d))
    np.add.at(want, ids.reshape(-1), dout.astype(np.float64).reshape(-1, d))
    assert rel_err(np.concatenate(grads), want) <= tolerance(dtype, B * T)


def test_embedding_backward_equals_add_at_bitwise_in_float32():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, 4000)
    dout = rng.standard_normal((4000, 16)).astype(np.float32)
    want = np.zeros((30, 16), np.float32)
    inside = ids >= 20
    np.add.at(want, ids[inside] - 20, dout[inside])
    assert np.array_equal(embedding_block_backward(dout, ids, 20, 30), want)


def test_embedding_edge_cases():
    w = np.ones((0, 4))
    assert embedding_block(np.array([[1, 2]]), w, 5).shape == (1, 2, 4)
    assert embedding_block_backward(np.ones((1, 2, 4)), np.array([[1, 2]]), 5, 0).shape == (0, 4)
    assert not np.any(embedding_block_backward(np.ones((1, 2, 4)), np.array([[0, 1]]), 5, 3))
    with pytest.raises(ValueError, match=r"ids\.dtype=float64: expected an integer dtype"):
        embedding_block(np.array([1.0]), np.ones((3, 2)), 0)


def test_accumulation_dtype():
    assert accumulation_dtype(np.dtype("float64")) == np.float64
    assert accumulation_dtype(np.dtype("float32")) == np.float32
    assert accumulation_dtype(np.dtype("float16")) == np.float32


def test_kernels_on_the_backend(xb):
    """The same results from the backend's arrays (CuPy on a GPU)."""
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((5, 8)), rng.standard_normal(8), rng.standard_normal(8)
    y, saved = layer_norm(xb.asarray(x), xb.asarray(w), xb.asarray(b))
    _, dw, _ = layer_norm_backward(xb.asarray(x), saved)
    want_y, ln = ref.layer_norm(x, w, b)
    assert rel_err(xb.to_host(y), want_y) < 1e-13
    assert rel_err(xb.to_host(dw), ref.layer_norm_backward(x, w, ln)[1]) < 1e-13
    ids = rng.integers(0, 9, (2, 3))
    wte = rng.standard_normal((9, 4))
    e = embedding_block(xb.asarray(ids), xb.asarray(wte[3:7]), 3)
    assert np.array_equal(xb.to_host(e), np.where(((ids >= 3) & (ids < 7))[..., None],
                                                  wte[np.clip(ids, 3, 6)], 0))
    g = embedding_block_backward(xb.asarray(np.ones((2, 3, 4))), xb.asarray(ids), 3, 4)
    assert np.array_equal(xb.to_host(g)[:, 0], np.bincount(ids.reshape(-1), minlength=9)[3:7])
