"""The vocabulary-parallel cross-entropy on the LM head tied to the token embedding
(:class:`VocabParallelLoss`): no rank ever holds the full ``(N, V)`` logits.

Forward: the final hidden states ``x`` (``(N, d)`` replicated, or the rank's token rows with
sequence parallelism: ``gather_x``, an Allgather) times the rank's ``wte`` block transposed
give the ``(N, V_p)`` logits of its vocabulary block; then the kernels of
:mod:`tpmpi.layers.cross_entropy` with two collectives of ``N`` floats: ``max_logits`` (an
Allreduce(MAX) of the row maxima) and ``sum_stats`` (one Allreduce(SUM) of the ``(2, N)``
sums, ``(3, N)`` with label smoothing), computed in float32 (float64 for float64) whatever the
dtype. Backward is local up to the input gradient: the logits' gradient, the ``wte`` block's
gradient (added to the embedding's, the weight being tied) and ``dx``, partial sums over the
vocabulary blocks reduced by ``reduce_dx`` (Allreduce, or Reduce_scatter to the token rows),
in flight while the weight gradient is computed.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.arrays import Array
from ..core.dtypes import resolve_dtype
from ..core.gemm import LocalWork
from ..core.mappings import AllReduce, AllReduceMax, GatherCols, between, mapping_class
from ..core.schedule import Collective, Pointwise, Product, Schedule, Step
from .cross_entropy import IGNORE_INDEX, Sums, finish_loss, local_max, local_sums, logits_grad
from .embedding import VocabParallelEmbedding, token_layout
from .functional import accumulation_dtype
from .linear_schedule import nbytes


class VocabParallelLoss:
    """Mean cross-entropy of the logits ``x @ wte^T`` over the targets other than
    ``ignore_index`` (PyTorch's ``cross_entropy`` with ``label_smoothing``), the head's weight
    being ``embedding``'s (tied). ``forward(x, targets)`` returns the loss (a float, the same
    on every rank; NaN when every target is ignored), ``backward(scale)`` the gradient of
    ``scale x`` the loss with respect to ``x`` (in ``x``'s layout), adding the head's gradient
    to ``embedding.grad_weight``. ``logits(x)`` gathers the full logits (checks, sampling).
    """

    def __init__(self, embedding: VocabParallelEmbedding, *, sequence_parallel: bool = False,
                 label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> None:
        self.embedding = embedding
        self.comm, self.backend = embedding.comm, embedding.backend
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self.local = LocalWork(self.backend.xp)
        staging = embedding.staging
        # x's token rows gathered (sequence parallel), else x itself; the adjoint sums dX
        self.gather_x = between(token_layout(sequence_parallel), "replicated", self.comm,
                                staging)
        self.reduce_dx = self.gather_x.adjoint
        self.max_logits = AllReduceMax(self.comm, staging)  # row maxima over the blocks
        self.sum_stats = AllReduce(self.comm, staging)  # sum exp, target logit (, sum logits)
        self.gather_logits = GatherCols(self.comm, staging)  # logits() only
        self._saved: Optional[tuple[Any, ...]] = None

    def operators(self) -> dict[str, Any]:
        """The loss's communication operators by attribute name."""
        return {name: op for name, op in vars(self).items()
                if name in ("gather_x", "reduce_dx", "max_logits", "sum_stats", "gather_logits")}

    def _logits(self, x: Array, tokens: int) -> tuple[Array, Array]:
        """``(x gathered (N, d), the (N, V_p) logits of the rank's block)``."""
        full = self.gather_x(x, tokens)
        return full, self.local.product(full, self.embedding.weight.T)

    def forward(self, x: Array, targets: Array) -> float:
        """``x`` (N, d) in the token layout, ``targets`` (N,) integers (checked by the caller)
        -> the mean loss [Allgather of x's rows under sequence parallelism; Allreduce(MAX) and
        Allreduce(SUM) of N and 2N (3N) floats]."""
        full, z = self._logits(x, targets.shape[0])
        row_max = self.max_logits(local_max(z))
        start = self.embedding.start
        stats = self.sum_stats(local_sums(z, start, targets, row_max,
                                          label_smoothing=self.label_smoothing,
                                          ignore_index=self.ignore_index))
        sums = Sums.from_rows(stats)
        loss, count = finish_loss(sums, targets, self.embedding.vocab_size,
                                  label_smoothing=self.label_smoothing,
                                  ignore_index=self.ignore_index)
        self._saved = (full, z, targets, row_max, sums, count)
        return loss

    def backward(self, scale: float = 1.0) -> Array:
        """The gradient of ``scale x`` the last loss with respect to ``x`` [Allreduce, or
        Reduce_scatter to the token rows, overlapped with the head's weight gradient];
        accumulates the tied ``wte`` block's gradient."""
        assert self._saved is not None, "forward ran"
        full, z, targets, row_max, sums, count = self._saved
        emb = self.embedding
        dz = logits_grad(z, emb.start, targets, row_max, sums, emb.vocab_size,
                         scale=scale / count if count else 0.0,
                         label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)
        dx = self.local.partial(dz, emb.weight)  # partial sums over the vocabulary blocks

        def weight_grad() -> None:
            emb.grad_weight += self.local.product(dz.T, full)

        return self.reduce_dx.during(dx, weight_grad).astype(full.dtype, copy=False)

    def logits(self, x: Array, tokens: int) -> Array:
        """The full ``(tokens, V)`` logits on every rank [Allgather of the vocabulary blocks; of
        x's rows first under sequence parallelism]. Nothing saved."""
        _, z = self._logits(x, tokens)
        return self.gather_logits(z, self.embedding.vocab_size)

    @classmethod
    def schedule_for(cls, tokens: int, vocab_size: int, n_embd: int, tp: int, *,
                     sequence_parallel: bool = False, label_smoothing: float = 0.0,
                     dtype: str = "float32", backward: bool = False) -> Schedule:
        """The head's product, the loss's element-wise work and its two small Allreduces and
        (``backward``) the logits' gradient, dX (its reduction during dW) and dW, on the rank
        with the largest vocabulary block. No communication."""
        gather = mapping_class(token_layout(sequence_parallel), "replicated")
        acc = accumulation_dtype(resolve_dtype(dtype)).name
        v = -(-vocab_size // tp)
        rows = 3 if label_smoothing > 0 else 2
        logits = tokens * v
        fwd: list[Step] = [s for s in [gather.step("gather_x", (tokens, n_embd), dtype, "tp", tp)]
                           if s is not None]
        fwd.append(Product("logits", tokens, n_embd, v, dtype))
        fwd.append(Pointwise("local_max", nbytes((logits,), dtype), dtype))
        if tp > 1:
            fwd.append(Collective("max_logits", "allreduce", "tp", tp,
                                  nbytes((tokens,), acc), acc))
        fwd.append(Pointwise("local_sums", 2 * nbytes((logits,), acc), acc))
        if tp > 1:
            fwd.append(Collective("sum_stats", "allreduce", "tp", tp,
                                  nbytes((rows, tokens), acc), acc))
        saved = nbytes((tokens, n_embd), dtype) + nbytes((logits,), dtype)
        if not backward:
            return Schedule(tuple(fwd), (), 0, saved)
        bwd: list[Step] = [Pointwise("logits_grad", 3 * nbytes((logits,), acc), acc),
                           Product("dX", tokens, v, n_embd, dtype)]
        reduce = gather.adjoint_class.step("reduce_dx", (tokens, n_embd), dtype, "tp", tp,
                                           ("dW",))
        bwd += [reduce] if reduce is not None else []
        bwd.append(Product("dW", v, tokens, n_embd, dtype))
        return Schedule(tuple(fwd), tuple(bwd), 0, saved)

