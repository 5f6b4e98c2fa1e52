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

Work: block-causal tiling. The queries are cut into tiles of :data:`TILE` rows; tile ``[i0,
i1)`` meets only the keys ``[0, i1)`` -- the fully masked tiles right of the diagonal are never
computed: at ``T = 4 TILE`` 62.5 % of the ``T x T`` scores are, a share that tends to one half
as ``T / TILE`` grows -- and only its diagonal ``(i1 - i0)`` square carries the mask. Every
product is a batched BLAS GEMM over ``(samples, heads)`` matrices: the query heads that share
a kv head read it through a broadcast view (no copy), and the softmax runs in place on the
tile (max, subtract, ``exp``, sum).

Memory: the tiles of scores are formed for a chunk of (sample, head) matrices at a time, bounded
by :data:`WORKSPACE_BYTES` (at least one matrix), never for all heads at once. The forward keeps
only the log-sum-exp of each row (``(B, Hq, T)``); the backward recomputes the probabilities
from it, and the dropout mask from its counter-based source, so nothing of size ``T x T`` is
saved (what flash attention does). Scores, softmax and products run in float32 for
float16/bfloat16 inputs (float64 for float64) and ``dK``, ``dV`` are accumulated over the query
tiles and the query heads that share a kv head in that type, each result rounded once.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.dropout import check_probability
from .functional import accumulation_dtype

WORKSPACE_BYTES = 2 * 2**20
"""Bound on the tile-sized temporaries (scores, their gradient, the dropout masks) of a chunk:
about a core's L2 cache keeps them there between the passes over a tile (at T = 512, hd = 64
on a 2 MiB-L2 CPU: 0.5-4 MiB within noise of each other, 10-20 % faster than 32 MiB)."""
TILE = 128
"""Query rows per tile: the masked work skipped grows as the tile shrinks, the GEMMs' efficiency
and the Python overhead per tile argue the other way (128 measured best at T = 512, hd = 64)."""
_TEMPORARIES = 3  # tile-sized arrays alive at once in the backward (probabilities, dP, P * mask)

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


@dataclasses.dataclass(frozen=True)
class _Group:
    """Local query heads ``h0 .. h0 + runs * size - 1``, in ``runs`` runs of ``size`` heads,
    run ``r`` attending with kv head ``j0 + r``: one batch of ``(B, runs, size)`` matrices."""

    h0: int
    j0: int
    runs: int
    size: int

    def queries(self, a: Array) -> Array:
        """``(B, runs, size, T, x)`` view of the group's heads of ``a (B, T, Hq, x)``."""
        B, T = a.shape[:2]
        return a[:, :, self.h0:self.h0 + self.runs * self.size].reshape(
            B, T, self.runs, self.size, *a.shape[3:]).transpose(0, 2, 3, 1, *range(4, a.ndim + 1))

    def keys(self, a: Array) -> Array:
        """``(B, runs, 1, T, hd)`` view of the group's kv heads of ``a (B, T, Hkv, hd)``."""
        return a[:, :, self.j0:self.j0 + self.runs].swapaxes(1, 2)[:, :, None]


def _groups(heads: tuple[int, ...]) -> list[_Group]:
    """The fewest groups covering the head map: runs of consecutive query heads sharing a kv
    head, runs of one length on consecutive kv heads joined (MHA and even GQA: one group)."""
    runs: list[list[int]] = []  # [first query head, kv head, length]
    for h, j in enumerate(heads):
        if runs and runs[-1][1] == j:
            runs[-1][2] += 1
        else:
            runs.append([h, j, 1])
    groups: list[_Group] = []
    for h0, j, n in runs:
        if groups and groups[-1].size == n and groups[-1].j0 + groups[-1].runs == j:
            groups[-1] = dataclasses.replace(groups[-1], runs=groups[-1].runs + 1)
        else:
            groups.append(_Group(h0, j, 1, n))
    return groups


def _chunk_size(seq: int, itemsize: int, dropout: bool) -> int:
    """Matrices a chunk holds: their tiles fit :data:`WORKSPACE_BYTES` (at least one)."""
    per_matrix = _TEMPORARIES * min(TILE, seq) * seq * itemsize + (seq * seq if dropout else 0)
    return max(1, WORKSPACE_BYTES // max(1, per_matrix))


def _chunks(batch: int, group: _Group, n: int) -> Iterator[tuple[slice, slice, slice]]:
    """(samples, runs, heads in a run) of each chunk of at most ``n`` of the group's matrices."""
    nb = max(1, n // (group.runs * group.size))
    nr = min(group.runs, max(1, n // group.size))
    ns = min(group.size, n)
    for b0 in range(0, batch, nb):
        for r0 in range(0, group.runs, nr):
            for s0 in range(0, group.size, ns):
                yield (slice(b0, min(batch, b0 + nb)), slice(r0, min(group.runs, r0 + nr)),
                       slice(s0, min(group.size, s0 + ns)))


class _Scratch:
    """Flat buffers that every tile of a call reuses (a tile's array is a reshaped prefix), so
    the tiles' temporaries are allocated -- and their pages touched first -- once a call."""

    def __init__(self, xp: Any, dtype: Any, sizes: Sequence[int]) -> None:
        self.buffers = [xp.empty(n, dtype=dtype) for n in sizes]

    def take(self, i: int, shape: tuple[int, ...]) -> Array:
        return self.buffers[i][:math.prod(shape)].reshape(shape)


def _tiles(seq: int) -> Iterator[tuple[int, int]]:
    for i0 in range(0, seq, TILE):
        yield i0, min(seq, i0 + TILE)


def _causal_mask(xp: Any, seq: int) -> Array:
    """``(T, T)`` boolean: True above the diagonal, the future keys (its leading squares are
    the smaller tiles' masks)."""
    return xp.triu(xp.ones((seq, seq), dtype=bool), 1)


def _keep_block(keep: KeepSource, group: _Group, chunk: tuple[slice, slice, slice]) -> Array:
    """The chunk's keep masks ``(samples, runs, size, T, T)``, one head at a time."""
    b, r, s = chunk
    masks = [keep(group.h0 + run * group.size + i, b.start, b.stop)
             for run in range(r.start, r.stop) for i in range(s.start, s.stop)]
    xp = backend_of(masks[0]).xp
    stacked = xp.stack(masks, axis=1)
    return stacked.reshape(stacked.shape[0], r.stop - r.start, s.stop - s.start,
                           *stacked.shape[2:])


def _scaled(q: Array, acc: Any) -> Array:
    """``q / sqrt(hd)`` as a new array of the compute type (one pass, ``q``'s layout)."""
    out = backend_of(q).xp.empty(q.shape, dtype=acc)
    out[...] = q
    out *= 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    return out


def _add_heads(acc: Array, part: Array) -> None:
    """``acc (b, runs, T', hd) += part (b, runs, size, T', hd)`` summed over the run's query
    heads (no sum for one head a run: MHA)."""
    if part.shape[2] == 1:
        acc += part[:, :, 0]
    else:
        acc += part.sum(axis=2)


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
    B, T, Hq, hd = q.shape
    acc = accumulation_dtype(q.dtype)
    future = _causal_mask(xp, min(TILE, T))
    qs = _scaled(q, acc)
    ka, va = k.astype(acc, copy=False), v.astype(acc, copy=False)
    y = xp.empty(q.shape, dtype=q.dtype)
    lse = xp.empty((B, Hq, T), dtype=acc)
    n = _chunk_size(T, acc.itemsize, p > 0.0)
    scratch = _Scratch(xp, acc, [min(n, B * Hq) * min(TILE, T) * T,
                                 min(n, B * Hq) * min(TILE, T) * hd])
    for g in _groups(heads):
        qg, kg, vg, yg = g.queries(qs), g.keys(ka), g.keys(va), g.queries(y)
        lg = g.queries(lse.swapaxes(1, 2))
        for chunk in _chunks(B, g, n):
            mask = None if keep is None or p == 0.0 else _keep_block(keep, g, chunk)
            qc, kc, vc, yc, lc = (a[chunk[0], chunk[1]] for a in (qg, kg, vg, yg, lg))
            qc, yc, lc = qc[:, :, chunk[2]], yc[:, :, chunk[2]], lc[:, :, chunk[2]]
            for i0, i1 in _tiles(T):
                s = xp.matmul(qc[..., i0:i1, :], kc[..., :i1, :].swapaxes(-1, -2),
                              out=scratch.take(0, qc.shape[:3] + (i1 - i0, i1)))
                xp.copyto(s[..., i0:i1], -math.inf, where=future[:i1 - i0, :i1 - i0])
                m = s.max(axis=-1, keepdims=True)
                s -= m
                xp.exp(s, out=s)
                total = s.sum(axis=-1, keepdims=True)
                lc[..., i0:i1] = (m + xp.log(total))[..., 0]
                if mask is not None:
                    # inverted dropout's 1 / (1 - p) on the (rows x 1) sums, not the tile
                    s *= mask[..., i0:i1, :i1]
                    total *= 1.0 - p
                out = xp.matmul(s, vc[..., :i1, :], out=scratch.take(1, qc.shape[:3] +
                                                                     (i1 - i0, hd)))
                xp.divide(out, total, out=yc[..., i0:i1, :])  # rounded once to y's dtype
    return y, AttentionSaved(q, k, v, y, lse, heads, p, keep)


def causal_attention_backward(dy: Array, saved: AttentionSaved,
                              out: Optional[tuple[Array, Array, Array]] = None
                              ) -> tuple[Array, Array, Array]:
    """``(dq (B, T, Hq, hd), dk, dv (B, T, Hkv, hd))`` from ``dy (B, T, Hq, hd)``; ``dk`` and
    ``dv`` summed over the local query heads sharing each kv head (the sum over ranks that share
    a kv head is the layer's). ``out``: three arrays of those shapes and ``q``'s dtype to write
    them into (views of one fused array allowed), else new arrays. Local: no communication."""
    q, k, v = saved.q, saved.k, saved.v
    if dy.shape != q.shape:
        raise ValueError(f"dy.shape={dy.shape}: expected {q.shape}")
    xp = backend_of(q).xp
    B, T, _, hd = q.shape
    acc = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(hd) if hd else 1.0
    future = _causal_mask(xp, min(TILE, T))
    qs = _scaled(q, acc)
    ka, va = k.astype(acc, copy=False), v.astype(acc, copy=False)
    dya = dy.astype(acc, copy=False)
    # rowsum(dP * P) = rowsum(dy * y): a (T x hd) product instead of a (T x T) one
    rowdot = xp.einsum("...d,...d->...", dya, saved.y.astype(acc, copy=False))
    dropout = saved.p > 0.0 and saved.keep is not None
    if dropout:  # dy / (1 - p) once: the kept probabilities' scale, in both products with dy
        dya = dya * (1.0 / (1.0 - saved.p))
    dq, dk, dv = out if out is not None else (xp.empty(q.shape, dtype=q.dtype),
                                              xp.empty(k.shape, dtype=k.dtype),
                                              xp.empty(v.shape, dtype=v.dtype))
    # dK and dV accumulated head-major ((B, Hkv, T, hd), contiguous rows) in the compute type
    dk_acc = xp.zeros((B, k.shape[2], T, hd), dtype=acc)
    dv_acc = xp.zeros((B, k.shape[2], T, hd), dtype=acc)
    lse = saved.lse.swapaxes(1, 2)
    n = _chunk_size(T, acc.itemsize, dropout)
    rows = min(n, B * q.shape[2]) * min(TILE, T)
    tile = rows * T
    scratch = _Scratch(xp, acc, [tile, tile, tile if dropout else 0, rows * hd, T * hd * rows
                                 // min(TILE, T) if T else 0])
    for g in _groups(saved.kv_of_q):
        qg, kg, vg, dyg, dqg = (g.queries(qs), g.keys(ka), g.keys(va), g.queries(dya),
                                g.queries(dq))
        lg, rg = g.queries(lse), g.queries(rowdot)
        dkg = dk_acc[:, g.j0:g.j0 + g.runs]
        dvg = dv_acc[:, g.j0:g.j0 + g.runs]
        for chunk in _chunks(B, g, n):
            b, r, s = chunk
            mask = _keep_block(saved.keep, g, chunk) if dropout else None  # type: ignore[arg-type]
            kc, vc, dkc, dvc = kg[b, r], vg[b, r], dkg[b, r], dvg[b, r]
            qc, dyc, dqc, lc, rc = (a[b, r, s] for a in (qg, dyg, dqg, lg, rg))
            for i0, i1 in _tiles(T):
                shape = qc.shape[:3] + (i1 - i0, i1)
                prob = xp.matmul(qc[..., i0:i1, :], kc[..., :i1, :].swapaxes(-1, -2),
                                 out=scratch.take(0, shape))
                xp.copyto(prob[..., i0:i1], -math.inf, where=future[:i1 - i0, :i1 - i0])
                prob -= lc[..., i0:i1, None]
                xp.exp(prob, out=prob)
                kept = prob if mask is None else xp.multiply(prob, mask[..., i0:i1, :i1],
                                                             out=scratch.take(2, shape))
                part = scratch.take(4, qc.shape[:3] + (i1, hd))
                _add_heads(dvc[..., :i1, :], xp.matmul(kept.swapaxes(-1, -2),
                                                       dyc[..., i0:i1, :], out=part))
                dprob = xp.matmul(dyc[..., i0:i1, :], vc[..., :i1, :].swapaxes(-1, -2),
                                  out=scratch.take(1, shape))
                if mask is not None:
                    dprob *= mask[..., i0:i1, :i1]
                # dS = P * (dP - rowsum(dP * P)) in dprob; d(scores) = dS / sqrt(hd)
                dprob -= rc[..., i0:i1, None]
                dprob *= prob
                dqt = xp.matmul(dprob, kc[..., :i1, :],
                                out=scratch.take(3, qc.shape[:3] + (i1 - i0, hd)))
                xp.multiply(dqt, scale, out=dqc[..., i0:i1, :])  # rounded once to dq's dtype
                _add_heads(dkc[..., :i1, :], xp.matmul(dprob.swapaxes(-1, -2),
                                                       qc[..., i0:i1, :], out=part))
    dk[...] = dk_acc.swapaxes(1, 2)
    dv[...] = dv_acc.swapaxes(1, 2)
    return dq, dk, dv
