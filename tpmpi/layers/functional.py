"""Local kernels of the transformer's element-wise and lookup layers: LayerNorm, inverted dropout
and the embedding lookup of a vocabulary block, each with its backward. No MPI: the parallel
layers call them on their local blocks and add the collectives.

One code path for NumPy and CuPy (the arrays' own namespace). float16 and bfloat16 inputs are
computed in float32 (the statistics of LayerNorm, the scaled dropout, the gradient sums) and
rounded once to the input's dtype; float32 and float64 in their own type
(:data:`tpmpi.core.dtypes.ACCUMULATION`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Optional

import numpy as np

from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.dropout import check_probability
from ..core.dtypes import ACCUMULATION

LN_EPS = 1e-5
"""LayerNorm's epsilon (nanoGPT's and torch's default)."""


def accumulation_dtype(dtype: np.dtype) -> np.dtype:
    """The type a kernel computes ``dtype`` arrays in: float32 for the 2-byte floats, else
    ``dtype`` itself."""
    return np.dtype(ACCUMULATION.get(np.dtype(dtype).name, np.dtype(dtype).name))


@dataclasses.dataclass
class LayerNormSaved:
    """What :func:`layer_norm_backward` needs: the input, the weight, and per row the mean and
    ``1 / sqrt(var + eps)`` (``(..., 1)``, in the accumulation type)."""

    x: Array
    weight: Array
    mean: Array
    rstd: Array
    has_bias: bool


_BLOCK_ELEMENTS = 1 << 17
"""Elements of one row block of LayerNorm: its passes over the block (and the block's scratch)
stay in a core's L2 cache (512 KiB of float32), where the same passes over whole (N, d)
arrays each stream through memory."""


def _block_rows(d: int) -> int:
    """Rows of ``d`` features in one row block."""
    return max(1, _BLOCK_ELEMENTS // max(1, d))


def _row_blocks(rows: int, d: int) -> Iterator[tuple[int, int]]:
    step = _block_rows(d)
    for i in range(0, rows, step):
        yield i, min(rows, i + step)


def _row_dots(a: Array, b: Array) -> Array:
    """``(a * b).mean(axis=-1)`` of 2D blocks without the product's temporary."""
    return backend_of(a).xp.einsum("nd,nd->n", a, b) / a.shape[-1]


def layer_norm(x: Array, weight: Array, bias: Optional[Array] = None,
               eps: float = LN_EPS) -> tuple[Array, LayerNormSaved]:
    """LayerNorm over the last axis: ``x (..., d)`` -> ``y (..., d)`` of ``x``'s dtype, with
    ``weight`` and ``bias`` (``(d,)``, bias optional), a cache-sized block of rows at a time.
    Local: no communication."""
    xp = backend_of(x).xp
    acc = accumulation_dtype(x.dtype)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    rows = x2.shape[0]
    y = xp.empty((rows, d), dtype=acc)
    mean, rstd = xp.empty((rows, 1), dtype=acc), xp.empty((rows, 1), dtype=acc)
    w = weight.astype(acc, copy=False)
    b = bias.astype(acc, copy=False) if bias is not None else None
    ones = xp.ones(d, dtype=acc)
    for i, j in _row_blocks(rows, d):
        xb, yb, mb, rb = x2[i:j].astype(acc, copy=False), y[i:j], mean[i:j], rstd[i:j]
        mb[:, 0] = xp.matmul(xb, ones) / d  # a matrix-vector product: one read, BLAS-fast
        xp.subtract(xb, mb, out=yb)
        rb[:, 0] = 1.0 / xp.sqrt(_row_dots(yb, yb) + eps)
        yb *= rb
        yb *= w
        if b is not None:
            yb += b
    stats = x.shape[:-1] + (1,)
    return (y.reshape(x.shape).astype(x.dtype, copy=False),
            LayerNormSaved(x, weight, mean.reshape(stats), rstd.reshape(stats), b is not None))


def layer_norm_backward(dy: Array, saved: LayerNormSaved
                        ) -> tuple[Array, Array, Optional[Array]]:
    """``(dx (..., d), dweight (d,), dbias (d,) or None)`` from ``dy (..., d)``, a cache-sized
    block of rows at a time. The parameter gradients are sums over this rank's rows only: when
    the rows are sharded (sequence parallelism) the layer sums them over the group."""
    xp = backend_of(dy).xp
    acc = accumulation_dtype(saved.x.dtype)
    d = saved.x.shape[-1]
    x2, dy2 = saved.x.reshape(-1, d), dy.reshape(-1, d)
    mean, rstd = saved.mean.reshape(-1, 1), saved.rstd.reshape(-1, 1)
    rows = x2.shape[0]
    w = saved.weight.astype(acc, copy=False)
    dx = xp.empty((rows, d), dtype=acc)
    dweight = xp.zeros(d, dtype=acc)
    dbias = xp.zeros(d, dtype=acc) if saved.has_bias else None
    ones = xp.ones(d, dtype=acc)
    scratch = xp.empty((min(rows, _block_rows(d)), d), dtype=acc)
    for i, j in _row_blocks(rows, d):
        dyb, g, xhat = dy2[i:j].astype(acc, copy=False), dx[i:j], scratch[:j - i]
        xp.subtract(x2[i:j].astype(acc, copy=False), mean[i:j], out=xhat)
        xhat *= rstd[i:j]
        dweight += xp.einsum("nd,nd->d", dyb, xhat)
        if dbias is not None:
            dbias += dyb.sum(axis=0)
        # dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * weight, in place on g
        xp.multiply(dyb, w, out=g)
        g_mean, gx_mean = xp.matmul(g, ones) / d, _row_dots(g, xhat)
        g -= g_mean[:, None]
        xhat *= gx_mean[:, None]
        g -= xhat
        g *= rstd[i:j]
    wdt = saved.weight.dtype
    return (dx.reshape(dy.shape).astype(saved.x.dtype, copy=False),
            dweight.astype(wdt, copy=False),
            None if dbias is None else dbias.astype(wdt, copy=False))


def dropout(x: Array, keep: Optional[Array], p: float) -> Array:
    """Inverted dropout: ``x * keep / (1 - p)`` (``keep`` a boolean mask of ``x``'s shape from
    :func:`tpmpi.core.dropout.keep_mask`; None or ``p == 0`` returns ``x``). The backward is the
    same call on the incoming gradient."""
    if keep is None or p == 0.0:
        return x
    check_probability(p, "p")
    acc = accumulation_dtype(x.dtype)
    y = backend_of(x).xp.multiply(x, keep, dtype=acc)
    y *= acc.type(1.0 / (1.0 - p))  # the scale of keep_scale, rounded as there
    return y.astype(x.dtype, copy=False)


def _check_ids(ids: Array) -> None:
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids.dtype={ids.dtype.name}: expected an integer dtype")


def embedding_block(ids: Array, weight: Array, start: int) -> Array:
    """Rows of the vocabulary block ``weight`` (``(V_p, d)``, global rows ``[start, start +
    V_p)``) for the token ``ids`` (any shape): ``(*ids.shape, d)`` of ``weight``'s dtype, zero
    where an id falls outside the block, so the sum of every rank's result (one reduction over
    the group) is the full embedding. Local: no communication."""
    xp = backend_of(weight).xp
    ids = xp.asarray(ids)
    _check_ids(ids)
    out = xp.zeros(ids.shape + (weight.shape[1],), dtype=weight.dtype)
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    out[inside] = weight[local[inside]]
    return out


def embedding_block_backward(dout: Array, ids: Array, start: int, rows: int) -> Array:
    """Gradient of the vocabulary block of :func:`embedding_block` (``(rows, d)``, dtype of
    ``dout``): each token's ``dout`` row added into its id's row when the id is in the block.

    The scatter-add is one sparse-dense product (an ``(rows, tokens)`` 0/1 CSR matrix times
    ``dout``; SciPy or CuPy's cuSPARSE), summed in token order, so the result is deterministic
    -- ``np.add.at`` gives the same bits 3 to 25 times slower. Local: no communication.
    """
    backend = backend_of(dout)
    xp = backend.xp
    if backend.is_gpu:
        from cupyx.scipy import sparse
    else:
        from scipy import sparse
    ids = xp.asarray(ids)
    _check_ids(ids)
    d = dout.shape[-1]
    acc = accumulation_dtype(dout.dtype)
    local = (ids - start).reshape(-1)
    tokens = xp.flatnonzero((local >= 0) & (local < rows))
    if rows == 0 or d == 0 or tokens.size == 0:
        return xp.zeros((rows, d), dtype=dout.dtype)
    onehot = sparse.csr_matrix((xp.ones(tokens.size, dtype=acc), (local[tokens], tokens)),
                               shape=(rows, local.size))
    grad = onehot @ dout.reshape(-1, d).astype(acc, copy=False)
    return xp.asarray(grad).astype(dout.dtype, copy=False)
