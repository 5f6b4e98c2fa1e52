"""Head-parallel causal self-attention (:class:`ParallelAttention`): the fused QKV projection
column-parallel by whole heads, the attention of the rank's heads local, the output projection
row-parallel along the same head boundaries.

Heads are placed by :mod:`tpmpi.core.heads` (in units of kv groups, remainder to low ranks;
any ``n_head`` on any TP size, ranks without a head allowed; with fewer kv heads than ranks a
kv head lives on several ranks). Rank ``p`` holds

* ``c_attn``: the columns of its heads' Q, K and V (``(d, (Hq + 2 Hkv) hd)``, in that order,
  from the three blocks of nanoGPT's fused ``[Q | K | V]`` weight: never a plain column split,
  which would scramble them) and the same entries of the bias;
* ``c_proj``: the rows of its query heads' features (``(Hq hd, d)``) and the whole bias,
  added once after the reduction.

Weights are stored ``(in, out)`` like :class:`~tpmpi.ParallelLinear` (torch's transposed).

forward  : ``x`` replicated (``gather_x`` is Copy), or the rank's token rows with sequence
           parallelism (``gather_x``: Allgather); ``qkv = x W_qkv + b`` (N, (Hq + 2 Hkv) hd)
           local; :func:`~tpmpi.layers.attention_core.causal_attention` on its views, no
           communication; ``y W_proj`` partial sums -> ``reduce_y`` (Allreduce, or
           Reduce_scatter to the token rows) -> ``+ b_proj``.
backward : ``gather_dy`` (the adjoint of ``reduce_y``: none, or Allgather of dy's rows), the
           projection's gradients (the bias's whole: dy is whole), the core's backward, then
           ``dx`` partial sums reduced by ``reduce_dx`` (Allreduce, or Reduce_scatter) while the
           QKV weight gradient is computed. A kv head held by several ranks (``n_kv_head < tp``)
           has its K and V gradient rows summed over exactly those ranks (``sum_kv``, an
           Allreduce on their sub-communicator, ``2 hd (d + 1)`` elements) -- each holds a
           partial one, from its own query heads; without that sum training is silently wrong.
           The dx reduction needs nothing more: each rank's dK is its own share.
The gathered input (sequence parallel) is kept for backward rather than gathered again.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from mpi4py import MPI

from ..core.arrays import Array
from ..core.backend import Backend
from ..core.comm import Staging
from ..core.gemm import LocalWork
from ..core.grid import ProcessGrid
from ..core.heads import HeadPartition, head_partition
from ..core.init import init_weight
from ..core.layout import PARTIAL
from ..core.mappings import AllReduce, Operator, between, mapping_class
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Schedule, Step
from .attention_core import KeepSource, causal_attention, causal_attention_backward
from .embedding import token_layout
from .leaf import Bounds, ParameterLeaf, Placement
from .linear_schedule import nbytes
from .module import Composite


def _linear_init(shape: tuple[int, int], seed: int, stream: int, rows: slice = slice(None),
                 cols: slice = slice(None)) -> Any:
    """Block of a ``(in, out)`` weight drawn as :func:`~tpmpi.core.init.init_weight` does for
    the linear layers (uniform, bound ``1/sqrt(in)``), in float64."""
    return init_weight(shape, seed, "float64", rows=rows, cols=cols, stream=stream)


def _bias_init(n: int, fan_in: int, seed: int, stream: int, cols: slice = slice(None)) -> Any:
    return init_weight((n,), seed, "float64", cols=cols, stream=stream,
                       bound=1.0 / math.sqrt(max(1, fan_in)))


class ParallelAttention(Composite):
    """Causal self-attention of ``n_head`` query and ``n_kv_head`` kv heads of size ``n_embd //
    n_head`` on ``grid.comm`` (see the module docstring). Children ``c_attn`` and ``c_proj``
    (:class:`~tpmpi.layers.leaf.ParameterLeaf`: the rank's blocks, ``(in, out)``). ``dense``:
    the torch-shaped ``{"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}``
    arrays (whole, every rank; biases only with ``bias``), else drawn from ``(seed, stream)``
    and ``stream + 1 .. + 3``. Construction is collective (the kv sub-communicator)."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 grid: ProcessGrid, backend: Backend, dtype: Any,
                 sequence_parallel: bool = False, bias: bool = True, seed: int = 0,
                 stream: int = 0, dense: Optional[dict[str, Any]] = None) -> None:
        self.grid, self.comm, self.backend = grid, grid.comm, backend
        tp, rank = self.comm.Get_size(), self.comm.Get_rank()
        self.n_embd, self.n_head = int(n_embd), int(n_head)
        self.n_kv_head = int(n_kv_head if n_kv_head is not None else n_head)
        self.hd = self.n_embd // self.n_head
        self.heads: HeadPartition = head_partition(self.n_head, self.n_kv_head, tp)
        self.shard = self.heads.shard(rank)
        self.sequence_parallel = bool(sequence_parallel)
        self.c_attn = self._qkv_leaf(bias, seed, stream, dense, dtype)
        self.c_proj = self._proj_leaf(bias, seed, stream + 2, dense, dtype)
        self.staging = Staging(backend)
        self.local = LocalWork(backend.xp)
        layout = token_layout(self.sequence_parallel)
        self.gather_x: Operator = between(layout, "replicated", self.comm, self.staging)
        self.reduce_y: Operator = between(PARTIAL, layout, self.comm, self.staging)
        self.gather_dy = self.reduce_y.adjoint  # Copy, or Allgather of dy's rows
        self.reduce_dx = self.gather_x.adjoint  # Allreduce, or Reduce_scatter
        peers = self.heads.kv_peers(rank)
        shared = tp > self.n_kv_head
        # the ranks holding one kv head; collective on every rank of the group alike
        self.kv_comm: Optional[MPI.Comm] = self.comm.Split(
            self.shard.kv_heads[0] if len(peers) > 1 else self.n_kv_head + rank, rank) \
            if shared else None
        self.sum_kv: Optional[AllReduce] = AllReduce(self.kv_comm, self.staging) \
            if self.kv_comm is not None and self.kv_comm.Get_size() > 1 else None
        self._saved: Optional[tuple[Any, ...]] = None

    # ---- parameters
    def _qkv_leaf(self, bias: bool, seed: int, stream: int, dense: Optional[dict[str, Any]],
                  dtype: Any) -> ParameterLeaf:
        d, hd = self.n_embd, self.hd
        rows = self.heads.qkv_rows(self.shard.rank, hd)  # Q, K, V slices of the fused rows
        total = (self.n_head + 2 * self.n_kv_head) * hd
        xp = self.backend.xp
        if dense is not None:
            index = self.heads.qkv_index(self.shard.rank, hd)
            w = dense["c_attn.weight"][index].T
            b = dense["c_attn.bias"][index] if bias else None
        else:
            w = xp.concatenate([self.backend.asarray(_linear_init((d, total), seed, stream,
                                                                  cols=r)) for r in rows], 1)
            b = xp.concatenate([self.backend.asarray(_bias_init(total, d, seed, stream + 1, r))
                                for r in rows]) if bias else None
        weight = xp.ascontiguousarray(self.backend.asarray(w, dtype=dtype))
        b = xp.ascontiguousarray(self.backend.asarray(b, dtype=dtype)) if b is not None else None
        sizes = [(self.n_head * hd, 0), (self.n_kv_head * hd, 1), (self.n_kv_head * hd, 2)]
        pieces, at = [], 0
        for (n, which), mine in zip(sizes, rows):
            width = mine.stop - mine.start
            start = (0, self.n_head * hd, (self.n_head + self.n_kv_head) * hd)[which]

            def cols_of(r: int, which: int = which, start: int = start) -> tuple[int, int]:
                s = self.heads.qkv_rows(r, hd)[which]
                return s.start - start, s.stop - start

            def weight_at(r: int, c: Callable[[int], tuple[int, int]] = cols_of) -> Bounds:
                return ((0, d), c(r))

            def bias_at(r: int, c: Callable[[int], tuple[int, int]] = cols_of) -> Bounds:
                return (c(r),)

            part = "qkv"[which]
            pieces.append((f"weight.{part}", "weight", slice(at, at + width),
                           Placement((d, n), weight_at)))
            if bias:
                pieces.append((f"bias.{part}", "bias", slice(at, at + width),
                               Placement((n,), bias_at)))
            at += width
        return ParameterLeaf(self.grid, self.backend,
                             f"ParallelAttention.c_attn {d}x{total}", weight, b, {}, pieces)

    def _proj_leaf(self, bias: bool, seed: int, stream: int, dense: Optional[dict[str, Any]],
                   dtype: Any) -> ParameterLeaf:
        d, hd = self.n_embd, self.hd
        inner = self.n_head * hd
        mine = self.heads.proj_cols(self.shard.rank, hd)
        if dense is not None:
            w = dense["c_proj.weight"][:, mine].T
            b = dense["c_proj.bias"] if bias else None
        else:
            w = _linear_init((inner, d), seed, stream, rows=mine)
            b = _bias_init(d, inner, seed, stream + 1) if bias else None
        xp = self.backend.xp
        weight = xp.ascontiguousarray(self.backend.asarray(w, dtype=dtype))
        b = xp.ascontiguousarray(self.backend.asarray(b, dtype=dtype)) if b is not None else None

        def rows_of(r: int) -> tuple[tuple[int, int], ...]:
            s = self.heads.proj_cols(r, hd)
            return ((s.start, s.stop), (0, d))

        return ParameterLeaf(self.grid, self.backend, f"ParallelAttention.c_proj {inner}x{d}",
                             weight, b, {"weight": Placement((inner, d), rows_of),
                                         "bias": Placement.replicated((d,))})

    def children(self) -> list[tuple[str, ParameterLeaf]]:
        """``[("c_attn", ...), ("c_proj", ...)]``."""
        return [("c_attn", self.c_attn), ("c_proj", self.c_proj)]

    def operators(self) -> dict[str, Operator]:
        """The attention's operators by attribute name (``sum_kv`` only where a kv head is
        shared)."""
        return {name: op for name, op in vars(self).items() if isinstance(op, Operator)}

    # ---- passes
    def forward(self, x: Array, batch: int, seq: int, *, p: float = 0.0,
                keep: Optional[KeepSource] = None) -> Array:
        """``x`` (N, d) replicated, or (N_p, d) token rows with sequence parallelism (``N =
        batch * T``, batch-major) -> the attention output in the same layout [Allgather of x
        under SP; Allreduce or Reduce_scatter of the output]. ``p`` and ``keep``: dropout on
        the probabilities (:func:`tpmpi.core.dropout.attention_keep` of the rank's first
        query head)."""
        s, hd, n = self.shard, self.hd, batch * seq
        h = self.gather_x(x, n)
        qkv = self.local.product(h, self.c_attn.weight, bias=self.c_attn.bias)
        nq, nkv = s.n_q * hd, s.n_kv * hd
        q = qkv[:, :nq].reshape(batch, seq, s.n_q, hd)
        k = qkv[:, nq:nq + nkv].reshape(batch, seq, s.n_kv, hd)
        v = qkv[:, nq + nkv:].reshape(batch, seq, s.n_kv, hd)
        y, core = causal_attention(q, k, v, s.kv_of_q, p=p, keep=keep)
        y2 = y.reshape(n, nq)
        out = self.reduce_y(self.local.partial(y2, self.c_proj.weight), n).astype(y2.dtype,
                                                                                  copy=False)
        if self.c_proj.bias is not None:
            out += self.c_proj.bias
        self._saved = (h, y2, core, batch)
        return out

    def backward(self, dout: Array) -> Array:
        """``dout`` in the output's layout -> ``dx`` in the input's [Allgather of dout's rows
        under SP; Allreduce or Reduce_scatter of dx during the QKV weight gradient; the kv
        heads' gradient Allreduce on their sub-communicator]; accumulates the gradients of
        ``c_attn`` and ``c_proj``."""
        assert self._saved is not None, "forward ran"
        h, y2, core, batch = self._saved
        s, hd = self.shard, self.hd
        n = h.shape[0]
        dy = self.gather_dy(dout, n)
        proj = self.c_proj
        if proj.grad_bias is not None:
            proj.grad_bias += self.local.column_sums(dy)
        dy2 = self.local.product(dy, proj.weight.T)
        proj.grad_weight += self.local.product(y2.T, dy)
        seq = n // batch
        nq, nkv = s.n_q * hd, s.n_kv * hd
        # dQ, dK, dV written straight into the column blocks of one d(qkv): one dX product
        dqkv = self.backend.xp.empty((n, nq + 2 * nkv), dtype=h.dtype)
        causal_attention_backward(dy2.reshape(batch, seq, s.n_q, hd), core, out=(
            dqkv[:, :nq].reshape(batch, seq, s.n_q, hd),
            dqkv[:, nq:nq + nkv].reshape(batch, seq, s.n_kv, hd),
            dqkv[:, nq + nkv:].reshape(batch, seq, s.n_kv, hd)))
        # partial sums over the ranks (float32 for 2-byte floats)
        dx = self.local.partial(dqkv, self.c_attn.weight.T)

        def weight_grads() -> None:
            self._qkv_grads(h, dqkv, nq)

        return self.reduce_dx.during(dx, weight_grads).astype(h.dtype, copy=False)

    def _qkv_grads(self, h: Array, dqkv: Array, nq: int) -> None:
        """Accumulate c_attn's gradients from ``d(qkv)`` (N, (Hq + 2 Hkv) hd): in one product
        where no kv head is shared, else the Q columns directly and the K and V columns after
        their sum over the ranks sharing the kv head (``sum_kv``, blocking, on its
        sub-communicator)."""
        leaf, xp = self.c_attn, self.backend.xp
        if self.sum_kv is None:
            leaf.grad_weight += self.local.product(h.T, dqkv)
            if leaf.grad_bias is not None:
                leaf.grad_bias += self.local.column_sums(dqkv)
            return
        dq, dkv = dqkv[:, :nq], dqkv[:, nq:]
        leaf.grad_weight[:, :nq] += self.local.product(h.T, dq)
        if leaf.grad_bias is not None:
            leaf.grad_bias[:nq] += self.local.column_sums(dq)
        d = h.shape[1]
        fresh = xp.empty((d + (1 if leaf.grad_bias is not None else 0), dkv.shape[1]),
                         dtype=leaf.grad_weight.dtype)
        self.local.product(h.T, dkv, out=fresh[:d])
        if leaf.grad_bias is not None:
            fresh[-1] = self.local.column_sums(dkv)
        self.sum_kv(fresh)
        leaf.grad_weight[:, nq:] += fresh[:d]
        if leaf.grad_bias is not None:
            leaf.grad_bias[nq:] += fresh[-1]

    # ---- schedule
    @classmethod
    def schedule_for(cls, batch: int, seq: int, n_embd: int, n_head: int, tp: int, *,
                     n_kv_head: Optional[int] = None, sequence_parallel: bool = False,
                     bias: bool = True, dropout: bool = False, dtype: str = "float32",
                     backward: bool = False) -> Schedule:
        """The steps of the attention on the rank holding the most heads of a ``tp``-rank
        group: input gather (SP), the QKV product, the core's batched products and softmax,
        the output projection and its reduction; backward the adjoints (dx's reduction during
        the QKV weight gradient, the kv heads' sum where shared). No communication."""
        kv = n_head if n_kv_head is None else n_kv_head
        heads = head_partition(n_head, kv, tp)
        big = max(heads.shards, key=lambda s: (s.n_q, s.n_kv))
        hd, m, item = n_embd // n_head, batch * seq, dtype
        nq, nkv = big.n_q * hd, big.n_kv * hd
        cols = nq + 2 * nkv
        layout = token_layout(sequence_parallel)
        gather, reduce = mapping_class(layout, "replicated"), mapping_class(PARTIAL, layout)
        act = (m, n_embd)
        scores = batch * big.n_q * seq * seq

        def coll(op: type[Operator], name: str, during: tuple[str, ...] = ()
                 ) -> list[Step]:
            step = op.step(name, act, dtype, "tp", tp, during)
            return [step] if step is not None else []

        fwd: list[Step] = coll(gather, "gather_x") + [
            Product("c_attn", m, n_embd, cols, item),
            Product("scores", seq, hd, seq, item, batch * big.n_q),
            Pointwise("softmax", 3 * nbytes((scores,), item), item),
            *([Pointwise("dropout", 3 * nbytes((scores,), item), item)] if dropout else []),
            Product("context", seq, seq, hd, item, batch * big.n_q),
            Product("c_proj", m, nq, n_embd, item)] + coll(reduce, "reduce_y")
        if bias:
            fwd.append(Pointwise("c_proj.bias", 2 * nbytes(act, item), item))
        rows = m if not sequence_parallel else -(-m // tp)
        saved = nbytes((m, n_embd), item) if gather.allocates else nbytes((rows, n_embd), item)
        saved += nbytes((m, cols + nq), item) + nbytes((batch, big.n_q, seq), "float32")
        param = nbytes((n_embd + int(bias), cols), item) + nbytes((nq + int(bias), n_embd), item)
        if not backward:
            return Schedule(tuple(fwd), (), param, saved)
        bwd: list[Step] = coll(reduce.adjoint_class, "gather_dy") + [
            Product("c_proj.dX", m, n_embd, nq, item), Product("c_proj.dW", nq, m, n_embd, item),
            GradsReady(("c_proj.weight", "c_proj.bias"), nbytes((nq + int(bias), n_embd), item),
                       item),
            Product("scores.recompute", seq, hd, seq, item, batch * big.n_q),
            Product("context.dP", seq, hd, seq, item, batch * big.n_q),
            Product("context.dV", seq, seq, hd, item, batch * big.n_q),
            Pointwise("softmax.backward", 4 * nbytes((scores,), item), item),
            Product("scores.dQ", seq, seq, hd, item, batch * big.n_q),
            Product("scores.dK", seq, seq, hd, item, batch * big.n_q),
            Product("c_attn.dX", m, cols, n_embd, item)]
        bwd += coll(gather.adjoint_class, "reduce_dx", ("c_attn.dW",))
        bwd.append(Product("c_attn.dW", n_embd, m, cols, item))
        if kv < tp and len(heads.kv_peers(big.rank)) > 1:
            bwd.append(Collective("sum_kv", "allreduce", "kv", len(heads.kv_peers(big.rank)),
                                  nbytes((n_embd + int(bias), 2 * nkv), item), item))
        bwd.append(GradsReady(("c_attn.weight", "c_attn.bias"),
                              nbytes((n_embd + int(bias), cols), item), item))
        return Schedule(tuple(fwd), tuple(bwd), param, saved)
