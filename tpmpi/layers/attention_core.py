"""Causal softmax attention of one rank's heads (the "core attention" between the fused QKV
projection and the output projection), forward and backward. No MPI: under tensor parallelism
each rank holds whole heads (:mod:`tpmpi.core.heads`), so core attention needs no communication.

Layouts are those of the local fused product reshaped without a copy: ``q (B, T, Hq, hd)``,
``k, v (B, T, Hkv, hd)`` (the ``[Q | K | V]`` column blocks of ``(B T, (Hq + 2 Hkv) hd)``), and
``y (B, T, Hq, hd)``, which is the input of the row-parallel output projection as
``(B T, Hq hd)`` -- head-major features, nanoGPT's ``y.transpose(1, 2).view(B, T, C)``.
Local query head ``i`` attends with local kv head ``kv_of_q[i]``
(:attr:`tpmpi.core.heads.HeadShard.kv_of_q`); the scale is ``1/sqrt(hd)`` with ``hd`` the
(global) head size, the mask causal (``-inf`` above the diagonal, so masked probabilities are
exactly 0).

Memory: the ``(T, T)`` score matrices are formed for one head and a block of samples at a time,
bounded by :data:`WORKSPACE_BYTES` (at least one sample), never for all heads at once. The
forward keeps only the log-sum-exp of each row (``(B, Hq, T)``); the backward recomputes the
probabilities from it, and the dropout mask from its counter-based source, so nothing of size
``T x T`` is saved (what flash attention does). Scores, softmax and products run in float32 for
float16/bfloat16 inputs (float64 for float64) and ``dK``, ``dV`` are accumulated over the query
heads that share a kv head in that type, each result rounded once.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.dropout import check_probability, keep_scale
from .functional import accumulation_dtype

WORKSPACE_BYTES = 32 * 2**20
"""Bound on the score-sized temporaries (a few ``(samples, T, T)`` arrays) of one step."""
_TEMPORARIES = 4  # score-sized arrays alive at once in the backward (probs, dP, mask, product)

KeepSource = Callable[[int, int, int], Array]
"""``keep(head, b0, b1)``: the boolean keep mask ``(b1 - b0, T, T)`` of local query head
``head`` for the call's samples ``b0 .. b1 - 1`` (:func:`tpmpi.core.dropout.attention_keep`)."""


@dataclasses.dataclass
class AttentionSaved:
    """What :func:`causal_attention_backward` needs: the inputs, the output (held anyway as
    the output projection's input), the rows' log-sum-exp ``(B, Hq, T)`` in the compute type,
    the head map and the dropout source."""

    q: Array
    k: Array
    v: Array
    y: Array
    lse: Array
    kv_of_q: tuple[int, ...]
    p: float
    keep: Optional[KeepSource]


def _check(q: Array, k: Array, v: Array, kv_of_q: Sequence[int]) -> tuple[int, ...]:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}: expected "
                         "q (B, T, Hq, hd) and k, v of one shape (B, T, Hkv, hd)")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k.shape={k.shape}: expected (B, T, Hkv, hd) with (B, T)="
                         f"{q.shape[:2]} and hd={q.shape[3]} of q")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes {q.dtype.name}, {k.dtype.name}, {v.dtype.name}: "
                         "expected one dtype")
    heads = tuple(int(j) for j in kv_of_q)
    if len(heads) != q.shape[2] or any(not 0 <= j < k.shape[2] for j in heads):
        raise ValueError(f"kv_of_q={heads}: expected {q.shape[2]} kv head indices in "
                         f"[0, {k.shape[2]})")
    return heads


def _sample_blocks(batch: int, seq: int, itemsize: int) -> Iterator[tuple[int, int]]:
    step = max(1, WORKSPACE_BYTES // max(1, _TEMPORARIES * seq * seq * itemsize))
    for b0 in range(0, batch, step):
        yield b0, min(batch, b0 + step)


def _causal_bias(xp: Any, seq: int, dtype: Any) -> Array:
    """``(T, T)``: 0 on and below the diagonal, ``-inf`` above."""
    return xp.triu(xp.full((seq, seq), -math.inf, dtype=dtype), 1)


def causal_attention(q: Array, k: Array, v: Array, kv_of_q: Sequence[int], *, p: float = 0.0,
                     keep: Optional[KeepSource] = None) -> tuple[Array, AttentionSaved]:
    """``y = softmax(q k^T / sqrt(hd) + causal) v`` per local query head, with dropout of rate
    ``p`` on the probabilities from ``keep`` (needed when ``p > 0``). Returns ``y (B, T, Hq,
    hd)`` of ``q``'s dtype and what the backward needs. Local: no communication."""
    heads = _check(q, k, v, kv_of_q)
    p = check_probability(p, "p")
    if p > 0.0 and keep is None:
        raise ValueError(f"p={p}: dropout needs a keep-mask source (keep=None)")
    xp = backend_of(q).xp
    B, T, Hq, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    bias = _causal_bias(xp, T, acc)
    y = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((B, Hq, T), dtype=acc)
    for h, j in enumerate(heads):
        for b0, b1 in _sample_blocks(B, T, acc.itemsize):
            # the scale on q (T x hd) and the normalisation on y (T x hd) spare two passes
            # over the (T x T) scores
            s = xp.matmul(_scaled(q[b0:b1, :, h], acc), k[b0:b1, :, j].astype(acc)
                          .transpose(0, 2, 1))
            s += bias
            m = s.max(axis=-1, keepdims=True)
            s -= m
            xp.exp(s, out=s)
            total = s.sum(axis=-1, keepdims=True)
            lse[b0:b1, h] = (m + xp.log(total))[..., 0]
            if p > 0.0:
                assert keep is not None
                s *= keep_scale(keep(h, b0, b1), p, acc)
            yh = xp.matmul(s, v[b0:b1, :, j].astype(acc))
            yh /= total
            y[b0:b1, :, h] = yh
    return y, AttentionSaved(q, k, v, y, lse, heads, p, keep)


def _scaled(a: Array, acc: Any) -> Array:
    """``a / sqrt(hd)`` as a new array of the compute type."""
    out = a.astype(acc)
    out *= 1.0 / math.sqrt(a.shape[-1]) if a.shape[-1] else 1.0
    return out


def causal_attention_backward(dy: Array, saved: AttentionSaved) -> tuple[Array, Array, Array]:
    """``(dq (B, T, Hq, hd), dk, dv (B, T, Hkv, hd))`` from ``dy (B, T, Hq, hd)``; ``dk`` and
    ``dv`` summed over the local query heads sharing each kv head (the sum over ranks that share
    a kv head is the layer's). Local: no communication."""
    q, k, v = saved.q, saved.k, saved.v
    if dy.shape != q.shape:
        raise ValueError(f"dy.shape={dy.shape}: expected {q.shape}")
    xp = backend_of(q).xp
    B, T, _, hd = q.shape
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(hd) if hd else 1.0
    bias = _causal_bias(xp, T, acc)
    dq = xp.empty(q.shape, dtype=q.dtype)
    dk = xp.zeros(k.shape, dtype=acc)
    dv = xp.zeros(v.shape, dtype=acc)
    for h, j in enumerate(saved.kv_of_q):
        for b0, b1 in _sample_blocks(B, T, acc.itemsize):
            qs = _scaled(q[b0:b1, :, h], acc)
            kh = k[b0:b1, :, j].astype(acc)
            vh = v[b0:b1, :, j].astype(acc)
            dyh = dy[b0:b1, :, h].astype(acc)
            # rowsum(dP * P) = rowsum(dy * y): a (T x hd) product instead of a (T x T) one
            rowdot = (dyh * saved.y[b0:b1, :, h].astype(acc)).sum(axis=-1, keepdims=True)
            prob = xp.matmul(qs, kh.transpose(0, 2, 1))
            prob += bias
            prob -= saved.lse[b0:b1, h][..., None]
            xp.exp(prob, out=prob)
            dprob = xp.matmul(dyh, vh.transpose(0, 2, 1))
            if saved.p > 0.0:
                assert saved.keep is not None
                ks = keep_scale(saved.keep(h, b0, b1), saved.p, acc)
                dv[b0:b1, :, j] += xp.matmul((prob * ks).transpose(0, 2, 1), dyh)
                dprob *= ks
            else:
                dv[b0:b1, :, j] += xp.matmul(prob.transpose(0, 2, 1), dyh)
            # dS = P * (dP - rowsum(dP * P)) in dprob; d(scores) = dS / sqrt(hd)
            dprob -= rowdot
            dprob *= prob
            dqh = xp.matmul(dprob, kh)
            dqh *= scale
            dq[b0:b1, :, h] = dqh
            dk[b0:b1, :, j] += xp.matmul(dprob.transpose(0, 2, 1), qs)
    return dq, dk.astype(k.dtype, copy=False), dv.astype(v.dtype, copy=False)
