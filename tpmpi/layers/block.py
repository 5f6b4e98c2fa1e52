"""The GPT's transformer block under tensor parallelism (:class:`TransformerBlock`): ``x = x +
drop(attn(ln_1(x))); x = x + drop(mlp(ln_2(x)))``, nanoGPT's pre-LayerNorm block.

The block's input and output (``(N, d)``, the ``N = B T`` tokens in batch-major order) are
replicated over the TP group, or with ``sequence_parallel`` split by token rows (layout "rows":
rank ``p`` holds block ``p`` of the ``N`` rows). LayerNorm (:class:`LayerNorm`), dropout and
the residual adds run on what the rank holds; the attention (:class:`~tpmpi.ParallelAttention`)
and the MLP (:class:`GPTMLP`, the FFN of :class:`~tpmpi.ParallelMLP` in mode "megatron", or
"sequence" under sequence parallelism, with the exact GELU) gather the rows before their first
product and reduce-scatter after their last. Per block and step: without SP 4 Allreduces of
``N d`` (2 forward, 2 backward); with SP 4 Allgathers and 4 Reduce_scatters (plus the MLP's
re-gather of its input in backward).

Dropout (:class:`DropoutCall`): the masks are those of the serial run on the global batch --
keyed by (seed, forward call, layer, site, global token and element,
:mod:`tpmpi.core.dropout`) -- whatever the TP size, sequence split or DP replica; the block
keeps its two residual masks for backward (one byte per element held).

Gradients of the parameters that sequence parallelism leaves replicated but computes from the
rank's rows only (the LayerNorms') are shares to be summed over the group
(:class:`~tpmpi.layers.leaf.PartialGrads`, set up by the model); the MLP's and attention's
output biases see the whole gathered dy and need no sum.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..core.arrays import Array
from ..core.backend import Backend
from ..core.dtypes import HALF
from ..core.dropout import Site, attention_keep, keep_mask
from ..core.grid import ProcessGrid
from ..core.schedule import GradsReady, Pointwise, Schedule, Step, chain
from .activations import gelu_erf_and_cdf, gelu_erf_backward
from .attention import ParallelAttention
from .functional import LayerNormSaved, dropout, layer_norm, layer_norm_backward
from .leaf import ParameterLeaf, Placement
from .linear_schedule import nbytes
from .mlp import ParallelMLP
from .module import Composite


@dataclasses.dataclass(frozen=True)
class DropoutCall:
    """The dropout of one training forward: rate ``p``, ``seed``, the model's forward-call
    counter ``call``, sequences of ``seq`` tokens whose first is global sample ``sample0``
    (``dp_rank * B`` under a mesh), and the rank's token rows ``rows`` (``(first, stop)`` of
    the batch-major ``B T`` rows it holds). No communication."""

    p: float
    seed: int
    call: int
    seq: int
    sample0: int
    rows: tuple[int, int]

    def hidden(self, site: int, layer: int, xp_backend: Any = None) -> Optional[Array]:
        """The ``(rows, n_embd)``-shaped keep mask of a hidden-state site (as the serial run's
        ``(B, T, d)`` mask, by global token), or None when ``p`` is 0."""
        if self.p == 0.0:
            return None
        first = self.sample0 * self.seq + self.rows[0]
        return keep_mask(self.p, seed=self.seed, call=self.call, layer=layer, site=site,
                         sample_shape=(self.width,), samples=(first, first + self.rows[1]
                                                              - self.rows[0]),
                         backend=xp_backend)

    width: int = 0
    """``n_embd`` (the element count of one token row)."""

    def attention(self, layer: int, n_head: int, q_head0: int, xp_backend: Any = None) -> Any:
        """The keep-mask source of the attention probabilities of the rank whose first query
        head is global head ``q_head0``, or None when ``p`` is 0."""
        if self.p == 0.0:
            return None
        return attention_keep(self.p, seed=self.seed, call=self.call, layer=layer,
                              n_head=n_head, seq=self.seq, q_head0=q_head0,
                              sample0=self.sample0, backend=xp_backend)


class LayerNorm(ParameterLeaf):
    """LayerNorm over ``n_embd`` features (eps 1e-5) with ``weight`` (ones) and ``bias``
    (zeros, or None), replicated: applied to whatever rows the rank holds. Its gradients are
    accumulated directly, or as shares (:class:`~tpmpi.layers.leaf.PartialGrads`) when the
    rows are split. No communication."""

    def __init__(self, n_embd: int, *, grid: ProcessGrid, backend: Backend, dtype: Any,
                 bias: bool = True, dense: Optional[tuple[Any, Any]] = None) -> None:
        xp = backend.xp
        if dense is not None:
            w = xp.ascontiguousarray(backend.asarray(dense[0], dtype=dtype))
            b = xp.ascontiguousarray(backend.asarray(dense[1], dtype=dtype)) if bias else None
        else:
            w = xp.ones(n_embd, dtype=dtype)
            b = xp.zeros(n_embd, dtype=dtype) if bias else None
        place = Placement.replicated((int(n_embd),))
        super().__init__(grid, backend, f"LayerNorm {n_embd}", w, b,
                         {"weight": place, "bias": place})
        self._saved: Optional[LayerNormSaved] = None

    def forward(self, x: Array) -> Array:
        """``x`` (n, d) -> normalised (n, d)."""
        y, self._saved = layer_norm(x, self.weight, self.bias)
        return y

    def backward(self, dy: Array) -> Array:
        """``dy`` (n, d) -> ``dx``; accumulates the weight and bias gradients (or shares)."""
        assert self._saved is not None, "forward ran"
        dx, dw, db = layer_norm_backward(dy, self._saved)
        self.accumulate(dw, db)
        return dx


class GPTMLP(ParallelMLP):
    """The block's FFN: :class:`~tpmpi.ParallelMLP` of width ``4 d`` with the exact GELU, in mode
    "megatron" (replicated rows) or "sequence" (token rows), its layers named as nanoGPT's:
    ``c_fc`` (column-parallel) and ``c_proj`` (row-parallel, bias added once). The forward
    keeps ``Phi`` of the pre-activation (one more array of the hidden shard, ``(N, 4d / P)``)
    so that the backward needs no second ``erf``; the activation and ``Phi`` are written into
    the arrays of the previous step (``_kept``, the pair a forward writes and the next backward
    reads), so a step touches no fresh pages for them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.fc1.dtype.name not in HALF:  # half types go through float32 (the parent's)
            self._act, self._act_backward = self._gelu, self._gelu_backward
        # (GELU(pre), Phi(pre)) of the last forward: Phi for the backward, both arrays reused
        self._kept: Optional[tuple[Array, Array]] = None

    def children(self) -> list[tuple[str, Any]]:
        """``[("c_fc", fc1), ("c_proj", fc2)]``."""
        return [("c_fc", self.fc1), ("c_proj", self.fc2)]

    def _gelu(self, pre: Array) -> Array:
        """``pre Phi(pre)``, keeping ``Phi(pre)`` for the backward: the exact GELU's ``erf``
        (the costliest element-wise call of the block) runs once per step, not twice."""
        self._kept = gelu_erf_and_cdf(pre, *(self._kept or (None, None)))
        return self._kept[0]

    def _gelu_backward(self, dh: Array, pre: Array) -> Array:
        """``dh (Phi(pre) + pre phi(pre))`` from the forward's ``Phi``, in place on ``dh`` (fc2's
        fresh input gradient)."""
        assert self._kept is not None, "forward ran"
        return gelu_erf_backward(dh, pre, self._kept[1], out=dh)


class TransformerBlock(Composite):
    """Block ``layer`` of a GPT (see the module docstring): children ``ln_1``, ``attn``,
    ``ln_2``, ``mlp``. ``dense``: the torch-shaped arrays of the block's state-dict keys
    without the ``transformer.h.<i>.`` prefix (whole, every rank), else parameters drawn from
    ``seed`` and streams from ``stream``. Construction is collective."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None, *,
                 layer: int, grid: ProcessGrid, backend: Backend, dtype: Any,
                 sequence_parallel: bool = False, bias: bool = True, seed: int = 0,
                 stream: int = 0, dense: Optional[dict[str, Any]] = None) -> None:
        self.layer, self.grid = int(layer), grid
        self.sequence_parallel = bool(sequence_parallel)
        self.n_head = int(n_head)

        def norm(name: str) -> LayerNorm:
            pair = (dense[f"{name}.weight"], dense.get(f"{name}.bias")) if dense else None
            return LayerNorm(n_embd, grid=grid, backend=backend, dtype=dtype, bias=bias,
                             dense=pair)

        self.ln_1 = norm("ln_1")
        attn = {k[len("attn."):]: v for k, v in dense.items() if k.startswith("attn.")} \
            if dense else None
        self.attn = ParallelAttention(n_embd, n_head, n_kv_head, grid=grid, backend=backend,
                                      dtype=dtype, sequence_parallel=sequence_parallel,
                                      bias=bias, seed=seed, stream=stream, dense=attn)
        self.ln_2 = norm("ln_2")
        mlp_dense = None
        if dense:
            def wb(name: str) -> tuple[Any, Any]:
                return dense[f"mlp.{name}.weight"].T, dense.get(f"mlp.{name}.bias")
            mlp_dense = (wb("c_fc"), wb("c_proj"))
        self.mlp = GPTMLP(n_embd, 4 * n_embd, grid=grid, activation="gelu_erf",
                          mode="sequence" if sequence_parallel else "megatron", bias=bias,
                          dtype=dtype, seed=seed + stream + 4, backend=backend,
                          _dense=mlp_dense)
        # c_fc's input is ln_2's output, a new array each forward that nothing changes: kept
        # for the backward as it is, not copied
        self.mlp.fc1.copy_input = False
        self._keep: tuple[Optional[Array], Optional[Array]] = (None, None)
        self._p = 0.0

    def children(self) -> list[tuple[str, Any]]:
        """``ln_1``, ``attn``, ``ln_2``, ``mlp`` (nanoGPT's names)."""
        return [("ln_1", self.ln_1), ("attn", self.attn), ("ln_2", self.ln_2),
                ("mlp", self.mlp)]

    def layer_norms(self) -> list[LayerNorm]:
        """The block's LayerNorms (whose gradients are shares under sequence parallelism)."""
        return [self.ln_1, self.ln_2]

    def forward(self, x: Array, batch: int, drop: DropoutCall) -> Array:
        """``x`` (N, d) replicated, or the rank's token rows -> the block's output, same
        layout [attention's and MLP's collectives]."""
        backend = self.attn.backend
        p = drop.p
        keep_attn = drop.attention(self.layer, self.n_head, self.attn.shard.q_heads[0],
                                   backend)
        a = self.attn.forward(self.ln_1.forward(x), batch, drop.seq, p=p, keep=keep_attn)
        keep_a = drop.hidden(Site.ATTENTION_OUTPUT, self.layer, backend)
        x = x + dropout(a, keep_a, p)
        m = self.mlp.forward(self.ln_2.forward(x))
        keep_m = drop.hidden(Site.MLP_OUTPUT, self.layer, backend)
        x = x + dropout(m, keep_m, p)
        self._keep, self._p = (keep_a, keep_m), p
        return x

    def backward(self, dx: Array) -> Array:
        """``dx`` (the output's gradient, its layout) -> the input's gradient; accumulates every
        parameter gradient of the block."""
        keep_a, keep_m = self._keep
        dh = self.mlp.backward(dropout(dx, keep_m, self._p))
        dx = dx + self.ln_2.backward(dh)
        dh = self.attn.backward(dropout(dx, keep_a, self._p))
        return dx + self.ln_1.backward(dh)

    @classmethod
    def schedule_for(cls, batch: int, seq: int, n_embd: int, n_head: int, tp: int, *,
                     n_kv_head: Optional[int] = None, sequence_parallel: bool = False,
                     bias: bool = True, dropout: bool = False, dtype: str = "float32",
                     backward: bool = False) -> Schedule:
        """ln_1, the attention (:meth:`ParallelAttention.schedule_for`), its dropout and
        residual, ln_2, the MLP (:meth:`tpmpi.ParallelMLP.schedule_for`), its dropout and
        residual; backward reversed. Steps prefixed ``ln_1.``, ``attn.``, ``mlp.``. No
        communication."""
        m = batch * seq
        rows = -(-m // tp) if sequence_parallel else m
        act = nbytes((rows, n_embd), dtype)
        ln = nbytes((n_embd * (1 + int(bias)),), dtype)

        def norm(name: str) -> Schedule:
            back: tuple[Step, ...] = ((Pointwise("backward", 6 * act, dtype),
                                       GradsReady(("weight", "bias"), ln, dtype))
                                      if backward else ())
            return Schedule((Pointwise("forward", 2 * act, dtype),), back, ln,
                            act).prefixed(name)

        def residual(name: str) -> Schedule:
            cost = (3 + (1 if dropout else 0)) * act
            return Schedule((Pointwise(name, cost, dtype),),
                            (Pointwise(f"{name}.backward", cost, dtype),) if backward else (),
                            0, act // nbytes((1,), dtype) if dropout else 0)

        attn = ParallelAttention.schedule_for(batch, seq, n_embd, n_head, tp,
                                              n_kv_head=n_kv_head,
                                              sequence_parallel=sequence_parallel, bias=bias,
                                              dropout=dropout, dtype=dtype,
                                              backward=backward).prefixed("attn")
        mlp = ParallelMLP.schedule_for(m, n_embd, n_embd, tp,
                                       mode="sequence" if sequence_parallel else "megatron",
                                       dtype=dtype, backward=backward, bias=bias
                                       ).prefixed("mlp")
        return chain([norm("ln_1"), attn, residual("attn.residual"), norm("ln_2"), mlp,
                      residual("mlp.residual")])

