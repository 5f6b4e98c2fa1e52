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
In terms of :mod:`tpmpi.core.mappings`: ``x -> SplitCols (unless input_is_parallel) -> GEMM ->
AllReduce | ReduceScatterRows -> + b``, backward the adjoints (``Copy | GatherRows``;
``GatherCols``).
"""
from __future__ import annotations

from typing import Any

from ..core.arrays import Array
from ..core.gemm import column_sums
from ..core.layout import PARTIAL, LinearLayouts
from .base import ParallelLinear


class RowParallelLinear(ParallelLinear):
    """``x`` (M, K) replicated, or layout "cols" (M, K_p) when ``input_is_parallel`` -> ``y``
    (M, N) replicated. ``backward(dy)`` takes ``dy`` (M, N) replicated and returns ``dx`` in
    ``x``'s layout, accumulating ``grad_weight`` (K_p, N) and ``grad_bias`` (N,) (the full
    bias gradient, identical on every rank)."""

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool = False,
                 sequence_parallel: bool = False, **kwargs: Any):
        super().__init__(in_features, out_features, input_is_parallel=bool(input_is_parallel),
                         sequence_parallel=bool(sequence_parallel), **kwargs)
        self.input_is_parallel = bool(input_is_parallel)
        self.sequence_parallel = bool(sequence_parallel)

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
        xp, prof = self.backend.xp, self.profiler
        # own columns: a strided view (one copy on a GPU, kept for the dW product)
        x_p = self.backend.operand(self._apply(self.x_map, x))
        y = xp.empty((x.shape[0], self.out_features), dtype=self.dtype)
        with prof.gemm():
            self._matmul(x_p, self.weight, out=y)
        y = self._apply(self.y_map, y)
        if self.bias is not None:
            y += self.bias
        self._x = x_p
        return y

    def backward(self, dy: Array) -> Array:
        """``dy`` (M, N) replicated [or (M_p, N) rows: Alltoallw] -> ``dx`` (M, K_p) [no
        collective] with ``input_is_parallel``, else (M, K) replicated [Ialltoallw overlapped
        with the dW GEMM, blocking when ``overlap=False``; none on one rank]; accumulates
        ``grad_weight`` and ``grad_bias``."""
        self._agree_input("dy", dy, self.out_features, backward=True,
                          split_rows=self.layouts.y == "rows")
        y_map = self.y_map
        assert y_map is not None  # y_local partial -> y replicated or "rows"
        dy = self._apply(y_map.adjoint, dy, self._rows)  # all rows (sequence_parallel)
        prof, x_p = self.profiler, self._saved_input
        with prof.gemm():
            dx_p = self._matmul(dy, self.weight.T)

        def weight_grads() -> None:
            self.grad_weight += self._matmul(x_p.T, dy)
            if self.grad_bias is not None:
                self.grad_bias += column_sums(dy)

        if self.input_is_parallel or self.comm.Get_size() == 1:  # P=1: dX_p is all of dX
            with prof.gemm():
                weight_grads()
            return dx_p
        x_map = self.x_map
        assert x_map is not None  # x replicated -> x_local "cols" (not input_is_parallel)
        gather = x_map.adjoint  # dX columns follow W's row split
        dx = gather.out(dx_p, self.in_features)
        self._map_during(gather, dx_p, dx, weight_grads)
        return dx
