"""The GPT's embeddings under tensor parallelism: the token embedding split by vocabulary rows
(:class:`VocabParallelEmbedding`, tied to the LM head of :mod:`tpmpi.layers.vocab_loss`) and
the position embedding (:class:`PositionEmbedding`, replicated).

Token embedding: rank ``p`` holds rows ``[v0, v1)`` of ``wte`` (``(V, d)``; the block partition
of :func:`tpmpi.core.heads.vocab_block`, uneven or empty, never padded). Forward looks the
``N`` token ids up in its block (zero rows for ids outside it,
:func:`~tpmpi.layers.functional.embedding_block`) and sums the partial ``(N, d)`` over the
group: ``reduce_x`` is an Allreduce, or with sequence parallelism a Reduce_scatter to the rank's
block of the ``N`` token rows (layout "rows", the tokens in batch-major order). Backward
gathers ``dx``'s rows when they are split (``gather_dx``, the adjoint) and scatter-adds them
into the block's gradient; no other communication.

Position embedding: ``wpe`` (``(block_size, d)``) replicated; the rows a rank holds (all ``N``
tokens, or its block under sequence parallelism) get ``wpe[t]`` added for their position ``t``.
Its gradient is each rank's share: the whole sum without sequence parallelism, a part to be
summed over the group with it (:class:`~tpmpi.layers.leaf.PartialGrads`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from ..core.arrays import Array
from ..core.backend import Backend
from ..core.comm import Staging
from ..core.grid import ProcessGrid
from ..core.heads import vocab_block
from ..core.init import init_weight
from ..core.layout import PARTIAL
from ..core.mappings import Operator, between, mapping_class
from ..core.schedule import Pointwise, Schedule, Step
from .functional import embedding_block, embedding_block_backward
from .leaf import ParameterLeaf, Placement
from .linear_schedule import nbytes

EMBEDDING_STD = 0.02
"""Standard deviation of the initial embeddings (nanoGPT's), drawn uniform."""


def embedding_init(shape: tuple[int, int], seed: int, stream: int, rows: slice) -> Any:
    """Rows ``rows`` of an embedding of ``shape`` drawn from ``(seed, stream)``: uniform with
    standard deviation :data:`EMBEDDING_STD`, the same at any split. No communication."""
    return init_weight(shape, seed, "float64", rows=rows, stream=stream,
                       bound=EMBEDDING_STD * math.sqrt(3.0))


def token_layout(sequence_parallel: bool) -> str:
    """The layout of the ``(N, d)`` activations between the GPT's layers: "rows" (each rank
    its block of the token rows) with sequence parallelism, else "replicated"."""
    return "rows" if sequence_parallel else "replicated"


class VocabParallelEmbedding(ParameterLeaf):
    """``wte`` (``(vocab_size, n_embd)``) split by vocabulary rows over ``grid.comm``:
    :meth:`forward` maps ``N`` token ids (replicated) to ``(N, d)`` replicated, or the rank's
    rows with ``sequence_parallel``. ``weight`` is the rank's ``(V_p, d)`` block, from ``dense``
    (the full ``(V, d)`` array, every rank) or drawn from ``(seed, stream)``
    (:func:`embedding_init`). Collectives: ``reduce_x`` (Allreduce | Reduce_scatter) forward,
    ``gather_dx`` (none | Allgather) backward."""

    def __init__(self, vocab_size: int, n_embd: int, *, grid: ProcessGrid, backend: Backend,
                 dtype: Any, sequence_parallel: bool = False, seed: int = 0, stream: int = 0,
                 dense: Optional[Any] = None) -> None:
        tp, rank = grid.comm.Get_size(), grid.comm.Get_rank()
        self.vocab_size, self.n_embd = int(vocab_size), int(n_embd)
        self.start, self.stop = vocab_block(self.vocab_size, tp, rank)
        rows = slice(self.start, self.stop)
        full = (self.vocab_size, self.n_embd)
        block = dense[rows] if dense is not None else embedding_init(full, seed, stream, rows)
        weight = backend.xp.ascontiguousarray(backend.asarray(block, dtype=dtype))

        def bounds(r: int) -> tuple[tuple[int, int], ...]:
            return (vocab_block(self.vocab_size, tp, r), (0, self.n_embd))

        super().__init__(grid, backend, f"VocabParallelEmbedding {vocab_size}x{n_embd}", weight,
                         None, {"weight": Placement(full, bounds)})
        self.sequence_parallel = bool(sequence_parallel)
        self.staging = Staging(backend)
        layout = token_layout(self.sequence_parallel)
        # Allreduce of the partial lookups, or Reduce_scatter to the rank's token rows
        self.reduce_x: Operator = between(PARTIAL, layout, self.comm, self.staging)
        self.gather_dx = self.reduce_x.adjoint  # Copy, or Allgather of dx's rows
        self._ids: Optional[Array] = None

    def forward(self, ids: Array) -> Array:
        """``ids`` (N,) integer token ids in ``[0, V)``, replicated (checked by the caller) ->
        ``(N, d)`` replicated [Allreduce], or this rank's rows [Reduce_scatter]."""
        self._ids = ids
        partial = embedding_block(ids, self.weight, self.start)
        return self.reduce_x(partial, ids.shape[0])

    def backward(self, dx: Array) -> None:
        """``dx`` in the output's layout [Allgather of its rows under sequence parallelism]:
        accumulates ``grad_weight`` (the rank's vocabulary rows). Returns nothing (the ids have
        no gradient)."""
        assert self._ids is not None, "forward ran"
        full = self.gather_dx(dx, self._ids.shape[0])
        self.grad_weight += embedding_block_backward(full, self._ids, self.start,
                                                     self.stop - self.start)

    @classmethod
    def schedule_for(cls, tokens: int, vocab_size: int, n_embd: int, tp: int, *,
                     sequence_parallel: bool = False, dtype: str = "float32",
                     backward: bool = False) -> Schedule:
        """The lookup, the reduction of the ``(tokens, n_embd)`` partials over ``tp`` ranks and
        (``backward``) the gather of dx and the scatter-add, on the rank with the largest
        vocabulary block. No communication."""
        reduce_x = mapping_class(PARTIAL, token_layout(sequence_parallel))
        act = nbytes((tokens, n_embd), dtype)
        v = -(-vocab_size // tp)
        fwd: list[Step] = [Pointwise("lookup", 2 * act, dtype)]
        step = reduce_x.step("reduce_x", (tokens, n_embd), dtype, "tp", tp)
        fwd += [step] if step is not None else []
        bwd: list[Step] = []
        if backward:
            gather = reduce_x.adjoint_class.step("gather_dx", (tokens, n_embd), dtype, "tp", tp)
            bwd += [gather] if gather is not None else []
            bwd.append(Pointwise("scatter_add", 2 * act, dtype))
        return Schedule(tuple(fwd), tuple(bwd), nbytes((v, n_embd), dtype), 0)


class PositionEmbedding(ParameterLeaf):
    """``wpe`` (``(block_size, n_embd)``) replicated: :meth:`forward` adds ``wpe[t]`` to each
    token row the rank holds; :meth:`backward` accumulates this rank's share of the gradient
    (the caller sums the shares over the group under sequence parallelism). No communication.
    """

    def __init__(self, block_size: int, n_embd: int, *, grid: ProcessGrid, backend: Backend,
                 dtype: Any, seed: int = 0, stream: int = 0,
                 dense: Optional[Any] = None) -> None:
        full = (int(block_size), int(n_embd))
        block = dense if dense is not None else embedding_init(full, seed, stream, slice(None))
        weight = backend.xp.ascontiguousarray(backend.asarray(block, dtype=dtype))
        super().__init__(grid, backend, f"PositionEmbedding {block_size}x{n_embd}", weight,
                         None, {"weight": Placement.replicated(full)})
        self._rows: tuple[int, int, int] = (0, 0, 1)

    def forward(self, x: Array, seq: int, first: int) -> Array:
        """``x`` (n, d): token rows ``first .. first + n - 1`` of the batch-major ``(B T)``
        tokens of sequences of ``seq`` tokens; returns ``x + wpe[positions]`` (in place)."""
        n = x.shape[0]
        self._rows = (first, n, seq)
        if first % seq == 0 and n % seq == 0:
            whole = x.reshape(n // seq, seq, x.shape[1])  # -1 is ambiguous when n is 0
            whole += self.weight[:seq]
        else:
            xp = self.backend.xp
            x += self.weight[xp.arange(first, first + n) % seq]
        return x

    def backward(self, dx: Array) -> None:
        """Accumulate ``grad_weight`` (the rows of the positions held) from ``dx`` (n, d)."""
        first, n, seq = self._rows
        lead = first % seq
        if lead == 0 and n % seq == 0:
            share = dx.reshape(n // seq, seq, dx.shape[1]).sum(axis=0)
        else:
            xp = self.backend.xp
            samples = -(-(lead + n) // seq)
            padded = xp.zeros((samples * seq, dx.shape[1]), dtype=dx.dtype)
            padded[lead:lead + n] = dx
            share = padded.reshape(samples, seq, -1).sum(axis=0)
        target = self.partial_weight if self.partial_weight is not None else self.grad_weight
        target[:seq] += share
