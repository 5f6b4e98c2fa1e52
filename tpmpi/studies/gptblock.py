"""A GPT model's shape, and -- PROVISIONAL -- the schedule of the GPT under tensor parallelism.

:class:`GPTShape` is the model the planner is asked about (nanoGPT's GPT-2 architecture with the
optional grouped-query heads of :class:`tpmpi.models.GPTConfig`). :func:`schedule_for` lists
what one rank of a TP group runs for it, in :mod:`tpmpi.core.schedule` steps only: the token and
position embedding, the ``n_layer`` blocks (block ``i``'s steps named ``transformer.h.<i>.``,
its attention core's ``attn.scores``, ``attn.softmax``, ``attn.dropout``, ``attn.context``
within it, as ``tpmpi.ParallelAttention`` names them), the final LayerNorm with the LM head and
the cross-entropy.

PROVISIONAL: :func:`schedule_for` has the exact signature of ``tpmpi.models.GPT.schedule_for``
(a classmethod that builds nothing and needs no MPI); when the model exists, the training-step
model (:mod:`tpmpi.studies.trainstep`, :data:`tpmpi.studies.trainstep.GPT_SCHEDULE`) takes the
model's instead and this builder is deleted, so that nothing describes the block a second time.
Until then it follows the layers' documented design: Megatron's column/row split (one
all-reduce of the block's output after attention and after the FFN forward, one of the input
gradient after each column GEMM backward, overlapped with that GEMM's weight gradient),
vocabulary-parallel embedding and cross-entropy, and with sequence parallelism all-gather /
reduce-scatter in their place (Korthikanti et al. 2022). Element-wise work is one pass per
operation (LayerNorm, bias add, scale-mask-softmax, dropout, bias-GELU, bias-dropout-residual),
each reading its inputs and writing its output; dropout masks are one byte per element. The
cross-entropy runs in float32 whatever the dtype (convert, max, subtract, exp, sum, divide;
backward: scale and subtract the one-hot, convert back), keeping the float32 probabilities of
the rank's vocabulary shard.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.args import check_int
from ..core.dtypes import resolve_dtype
from ..core.partition import largest_block
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Schedule, Step, chain
from ..models.config import GPTConfig

DROPOUT = 0.1
"""The dropout probability of :meth:`GPTShape.config` when ``dropout`` is set (its value does
not change the schedule: only whether the dropout layers run)."""


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """A GPT model: ``n_layer`` blocks of width ``n_embd`` with ``n_head`` query heads and
    ``n_kv_head`` key/value heads (None: ``n_head``), sequences of ``seq`` tokens, ``vocab``
    tokens; ``dropout``: whether the dropout layers run (masks are kept); ``bias``: biases in
    the linear layers and LayerNorms."""

    n_layer: int
    n_embd: int
    n_head: int
    seq: int
    vocab: int
    n_kv_head: Optional[int] = None
    dropout: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "seq", "vocab"):
            check_int(name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd}: expected a multiple of n_head="
                             f"{self.n_head}")
        kv = check_int("n_kv_head", self.n_kv_head, 1, allow_none=True)
        if kv is not None and self.n_head % kv:
            raise ValueError(f"n_kv_head={kv}: expected a divisor of n_head={self.n_head}")

    def config(self) -> GPTConfig:
        """The model's :class:`~tpmpi.models.GPTConfig` (``block_size`` = ``seq``)."""
        return GPTConfig(self.vocab, self.seq, self.n_layer, self.n_head, self.n_embd,
                         n_kv_head=self.n_kv_head, dropout=DROPOUT if self.dropout else 0.0,
                         bias=self.bias)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def block_params(self) -> int:
        """Parameters of one block (all ranks together)."""
        h, hd, b = self.n_embd, self.head_dim, int(self.bias)
        qkv = (self.n_head + 2 * self.kv_heads) * hd
        return (h * qkv + b * qkv) + (self.n_head * hd * h + b * h) + 2 * (4 * h * h) \
            + b * (4 * h + h) + 2 * (h + b * h)

    @property
    def params(self) -> int:
        """Parameters of the model (the LM head tied to the token embedding)."""
        h = self.n_embd
        return self.n_layer * self.block_params + (self.vocab + self.seq) * h \
            + h + int(self.bias) * h


def schedule_for(cfg: GPTConfig, *, batch: int, seq: int, tp: int,
                 sequence_parallel: bool = False, dtype: str = "float32",
                 backward: bool = True) -> Schedule:
    """PROVISIONAL (see the module docstring): the schedule of one forward (and with
    ``backward`` one backward) of the GPT ``cfg`` on ``batch`` sequences of ``seq`` tokens, on
    the rank holding the largest shards of a TP group of ``tp`` ranks, in ``dtype``: the
    signature of ``tpmpi.models.GPT.schedule_for``, which replaces it. No communication."""
    check_int("batch", batch, 1)
    check_int("seq", seq, 1)
    check_int("tp", tp, 1)
    if seq > cfg.block_size:
        raise ValueError(f"seq={seq}: expected at most block_size={cfg.block_size}")
    embedding, block, head = _parts(cfg, batch, seq, tp, sequence_parallel, dtype)
    whole = chain([embedding, *(block.prefixed(f"transformer.h.{i}")
                                for i in range(cfg.n_layer)), head])
    return whole if backward else dataclasses.replace(whole, backward=())


def _parts(cfg: GPTConfig, batch: int, seq: int, tp: int, sequence_parallel: bool,
           dtype: str) -> tuple[Schedule, Schedule, Schedule]:
    """The schedules of the embedding, one block (names relative to the block) and the head
    with the loss."""
    e, b, s, h, t, sp = resolve_dtype(dtype).itemsize, batch, seq, cfg.n_embd, tp, \
        sequence_parallel
    m = b * s                                   # tokens of the micro-batch
    mr = largest_block(m, t) if sp else m       # rows of the block's input and output
    hd, heads = cfg.head_size, b * largest_block(cfg.n_head, t)  # attention products
    nq, nkv = largest_block(cfg.n_head, t) * hd, largest_block(cfg.n_kv_head, t) * hd
    nqkv, f, v = nq + 2 * nkv, largest_block(4 * h, t), largest_block(cfg.vocab_size, t)
    drop, bias, scores = int(cfg.dropout > 0), int(cfg.bias), heads * s * s
    reduce_op, x_bytes = ("reduce_scatter" if sp else "allreduce"), m * h * e

    def coll(name: str, op: str, during: tuple[str, ...] = ()) -> Collective:
        """``op`` of the block's full activation over the TP group."""
        return Collective(name, op, "tp", t, x_bytes, dtype, during)

    def pw(name: str, nbytes: int) -> Pointwise:
        return Pointwise(name, nbytes, dtype)

    def given(condition: int, *steps: Step) -> list[Step]:
        return list(steps) if condition else []

    def linear(name: str, k: int, n: int, grads: int, column: bool) -> tuple[list[Step], ...]:
        """A linear layer's forward product and its backward: input and weight gradient
        products, for a column layer the input gradient's all-reduce during the weight gradient
        (sequence parallel: the input gathered again during dX and the gradient
        reduce-scattered), then its gradients ready."""
        y, dx, dw = (Product(name, m, k, n, dtype), Product(f"{name}.dX", m, n, k, dtype),
                     Product(f"{name}.dW", k, m, n, dtype))
        back = given(column and sp, coll(f"{name}.gather_x_again", "allgather", (dx.name,))) \
            + [dx] + given(column, coll(f"{name}.reduce_dx", reduce_op, (dw.name,))) \
            + [dw, GradsReady((f"{name}.weight", f"{name}.bias"), grads, dtype)]
        return [y], back

    qkv, qkv_back = linear("attn.c_attn", h, nqkv, (h + bias) * nqkv * e, True)
    proj, proj_back = linear("attn.c_proj", nq, h, (nq + bias) * h * e, False)
    fc, fc_back = linear("mlp.c_fc", h, f, (h + bias) * f * e, True)
    out, out_back = linear("mlp.c_proj", f, h, (f + bias) * h * e, False)
    core = Schedule(
        (Product("attn.scores", s, hd, s, dtype, heads),
         pw("attn.softmax", 2 * scores * e),
         *given(drop, pw("attn.dropout", scores * (2 * e + 1))),
         Product("attn.context", s, s, hd, dtype, heads)),
        (Product("attn.context.dP", s, hd, s, dtype, heads),
         Product("attn.context.dV", s, s, hd, dtype, heads),
         *given(drop, pw("attn.dropout.backward", scores * (2 * e + 1))),
         pw("attn.softmax.backward", 3 * scores * e),
         Product("attn.scores.dQ", s, s, hd, dtype, heads),
         Product("attn.scores.dK", hd, s, s, dtype, heads)),
        0, scores * (e + drop * (1 + e)))      # probabilities, mask, dropped probabilities
    residual = mr * h * (3 * e + drop)          # bias + dropout + residual add (+ mask)
    ln = (h + bias * h) * e                     # one LayerNorm's weight and bias
    forward = [pw("ln_1", 2 * mr * h * e), *given(sp, coll("attn.gather_x", "allgather")),
               *qkv, *given(bias, pw("attn.c_attn.bias", 2 * m * nqkv * e)), *core.forward,
               pw("attn.merge_heads", 2 * m * nq * e), *proj, coll("attn.reduce_y", reduce_op),
               pw("attn.residual", residual), pw("ln_2", 2 * mr * h * e),
               *given(sp, coll("mlp.gather_x", "allgather")), *fc,
               pw("mlp.gelu", 2 * m * f * e), *out, coll("mlp.reduce_y", reduce_op),
               pw("mlp.residual", residual)]
    backward = [pw("mlp.residual.backward", residual),
                *given(sp, coll("mlp.gather_dy", "allgather")), *out_back,
                pw("mlp.gelu.backward", (3 + bias) * m * f * e), *fc_back,
                pw("ln_2.backward", 6 * mr * h * e),
                GradsReady(("ln_2.weight", "ln_2.bias"), ln, dtype),
                pw("attn.residual.backward", residual),
                *given(sp, coll("attn.gather_dy", "allgather")), *proj_back,
                pw("attn.merge_heads.backward", 2 * m * nq * e), *core.backward,
                *given(bias, pw("attn.c_attn.bias.backward", m * nqkv * e)), *qkv_back,
                pw("ln_1.backward", 6 * mr * h * e),
                GradsReady(("ln_1.weight", "ln_1.bias"), ln, dtype)]
    saved = (2 * mr * h * e + 2 * (mr if sp else m) * h * e  # LayerNorm, c_attn, c_fc inputs
             + m * (nq + 2 * nkv) * e + m * nq * e  # q, k, v and c_proj's input
             + 2 * drop * mr * h                # residual dropout masks
             + 2 * m * f * e) + core.saved_bytes  # GELU input and output
    params = sum(g.nbytes for g in backward if isinstance(g, GradsReady))
    embedding = Schedule(
        (pw("transformer.wte", 2 * m * h * e), coll("transformer.wte.reduce_x", reduce_op),
         pw("transformer.wpe_dropout", mr * h * (3 * e + drop))),
        (pw("transformer.wpe_dropout.backward", mr * h * (2 * e + drop)),
         pw("transformer.wte.backward", 3 * m * h * e),
         GradsReady(("transformer.wte.weight", "transformer.wpe.weight"), (v + s) * h * e,
                    dtype)),
        (v + s) * h * e, drop * mr * h)
    head = Schedule(
        (pw("transformer.ln_f", 2 * mr * h * e),
         *given(sp, coll("lm_head.gather_x", "allgather")),
         Product("lm_head", m, h, v, dtype),
         pw("loss.softmax", m * v * (e + 36)),  # float32: convert, max, -, exp, sum, /
         *(Collective(f"loss.reduce_{what}", "allreduce", "tp", t, m * 4, "float32")
           for what in ("max", "sum", "target"))),
        (pw("loss.dlogits", m * v * (12 + e)),  # x dloss, - one-hot, convert back
         Product("lm_head.dX", m, v, h, dtype), Product("lm_head.dW", h, m, v, dtype),
         coll("lm_head.reduce_dx", reduce_op, ("lm_head.dW",)),
         pw("transformer.ln_f.backward", 3 * mr * h * e),
         GradsReady(("transformer.ln_f.weight", "transformer.ln_f.bias"), ln, dtype)),
        ln, mr * h * e + m * v * 4)
    return embedding, Schedule(tuple(forward), tuple(backward), params, saved), head
