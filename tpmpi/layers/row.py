"""Row-parallel linear layer (Megatron's RowParallelLinear, fc2 of the FFN).

``W = [W_0; ...; W_{P-1}]`` split by rows over the ``P`` ranks of ``grid.comm`` (block
partition, uneven and empty shards allowed); rank ``p`` holds ``W_p`` (K_p, N). The bias is
replicated and added once, after the reduction.

forward  : ``Y = sum_p X_p @ W_p + b`` (Allreduce), where ``X_p`` is the input's column block
           ``p``: given (``input_is_parallel``) or a strided view of the replicated ``X``.
backward : ``dX_p = dY @ W_p^T``, ``dW_p = X_p^T @ dY`` and ``db = colsum(dY)`` are local
           (``dY`` is replicated); without ``input_is_parallel`` the ``dX_p`` blocks are
           all-gathered into the replicated (M, K) ``dX`` (Ialltoallw in flight during the dW
           GEMM). On one rank nothing is exchanged: the Allreduce returns at once and ``dX_p``
           is ``dX`` (no gather, no copy, no host staging).
sequence_parallel (Megatron's flag): the partial products are reduce-scattered instead of
           all-reduced, so ``y`` (and ``dy``) are in layout "rows" (rank ``p`` holds block ``p``
           of the M rows); backward first all-gathers ``dy``, after which ``db`` and ``dW_p``
           are those of the whole dY, as without the flag.
In terms of :mod:`tpmpi.core.mappings`: ``x -> split_x (SplitCols, or Keep with
input_is_parallel) -> GEMM -> reduce_y (AllReduce | ReduceScatterRows) -> + b``, backward the
adjoints, ``gather_dy`` (Copy | GatherRows) and ``gather_dx`` (GatherCols | Keep).
"""
from __future__ import annotations

from typing import Any

from ..core.arrays import Array
from ..core.layout import PARTIAL, LinearLayouts
from .base import ParallelLinear


class RowParallelLinear(ParallelLinear):
    """``x`` (M, K) replicated, or layout "cols" (M, K_p) when ``input_is_parallel`` -> ``y``
    (M, N) replicated. ``backward(dy)`` takes ``dy`` (M, N) replicated and returns ``dx`` in
    ``x``'s layout, accumulating ``grad_weight`` (K_p, N) and ``grad_bias`` (N,) (the full
    bias gradient, identical on every rank)."""

    STEP_NAMES = ("split_x", "reduce_y", "gather_dy", "gather_dx")

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool = False,
                 sequence_parallel: bool = False, **kwargs: Any):
        super().__init__(in_features, out_features, input_is_parallel=bool(input_is_parallel),
                         sequence_parallel=bool(sequence_parallel), **kwargs)
        self.input_is_parallel = bool(input_is_parallel)
        self.sequence_parallel = bool(sequence_parallel)
        lay = self.layouts
        self.split_x = self._operator(lay.x, lay.x_local)  # SplitCols (a view), or Keep
        self.reduce_y = self._operator(lay.y_local, lay.y)  # AllReduce, or ReduceScatterRows
        self.gather_dy = self.reduce_y.adjoint  # Copy, or GatherRows (sequence_parallel)
        self.gather_dx = self.split_x.adjoint  # GatherCols, or Keep (input_is_parallel)

    @classmethod
    def layouts_for(cls, input_is_parallel: bool = False, sequence_parallel: bool = False,
                    **_: Any) -> LinearLayouts:
        """x replicated (SplitCols), or "cols" with ``input_is_parallel`` -> the local GEMM's
        partial sums -> y replicated (AllReduce), or "rows" with ``sequence_parallel``
        (ReduceScatterRows); W split by rows, b replicated."""
        return LinearLayouts(x="cols" if input_is_parallel else "replicated",
                             y="rows" if sequence_parallel else "replicated", weight="rows",
                             bias="replicated", x_local="cols", y_local=PARTIAL)

    def _check_options(self, input_is_parallel: bool = False,
                       sequence_parallel: bool = False) -> None:
        pass

    def forward(self, x: Array) -> Array:
        """``x`` (M, K) replicated or (M, K_p) -> ``y`` (M, N) replicated [Allreduce], or
        (M_p, N) rows with ``sequence_parallel`` [Reduce_scatter]."""
        self._agree_input("x", x, self._width(self.layouts.x, self.in_features))
        # own columns (a strided view of a replicated x), kept for the dW product
        x_p = self._x = self._enter(self.split_x(x), keep=True)
        # partial sums over the ranks (float32 for 2-byte floats, rounded once at the end)
        y = self.local.product(x_p, self.weight,
                               out=self._partial((x_p.shape[0], self.weight.shape[1])))
        y = self.reduce_y(y)  # Allreduce in place, or Reduce_scatter into this rank's rows
        if self.bias is not None:
            y += self.bias
        return self._rounded(y)

    def backward(self, dy: Array) -> Array:
        """``dy`` (M, N) replicated [or (M_p, N) rows: Alltoallw] -> ``dx`` (M, K_p) [no
        collective] with ``input_is_parallel``, else (M, K) replicated [Ialltoallw overlapped
        with the dW GEMM, blocking when ``overlap=False``; none on one rank]; accumulates
        ``grad_weight`` and ``grad_bias``."""
        self._agree_input("dy", dy, self.out_features, backward=True,
                          split_rows=self.layouts.y == "rows")
        dy = self._enter(dy)
        dy = self.gather_dy(dy, self._rows)  # Allgather (Alltoallw) of dY's rows, or dy itself
        x_p = self._saved_input
        dx_p = self.local.product(dy, self.weight.T)

        def weight_grads() -> None:
            self.grad_weight += self.local.product(x_p.T, dy)
            if self.grad_bias is not None:
                self.grad_bias += self.local.column_sums(dy)

        # dX's column blocks follow W's row split: Ialltoallw of them during the dW GEMM
        return self.gather_dx.during(dx_p, weight_grads, self.in_features)
