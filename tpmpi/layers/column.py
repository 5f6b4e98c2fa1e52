"""Column-parallel linear layer (Megatron's ColumnParallelLinear, the book's scheme).

``W = [W_0 ... W_{P-1}]`` split by columns over the ``P`` ranks of ``grid.comm`` (block
partition, uneven and empty shards allowed); rank ``p`` holds ``W_p`` (K, N_p) and ``b_p``.

forward  : ``Y_p = X @ W_p + b_p``; with ``gather_output`` the blocks are all-gathered straight
           into the C-ordered (M, N) result (one Alltoallw with subarray receive types: MPI
           writes every block into its strided final place, so there is neither a transposed
           staging buffer nor a (P, M, N_p) -> (M, N) copy).
backward : ``dX = sum_p dY_p @ W_p^T`` (Iallreduce, in flight while ``dW_p = X^T dY_p`` and
           ``db_p`` are computed locally, Megatron's overlap).
"""
from __future__ import annotations

from typing import Any

from ..comm import allgather_blocks, allreduce, iallreduce
from ..partition import block_partition
from .base import ParallelLinear


class ColumnParallelLinear(ParallelLinear):
    """``x`` (M, K) replicated -> ``y`` (M, N) replicated, or layout "cols" (M, N_p) when
    ``gather_output=False``. ``backward(dy)`` takes ``dy`` in the output's layout and returns
    ``dx`` (M, K) replicated, accumulating ``grad_weight`` (K, N_p) and ``grad_bias`` (N_p,)."""

    weight_layout = "cols"
    bias_layout = "cols"

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool = True,
                 **kwargs: Any):
        super().__init__(in_features, out_features, gather_output=bool(gather_output), **kwargs)
        self.gather_output = bool(gather_output)
        parts = block_partition(self.out_features, self.comm.Get_size())
        self._col_starts = [start for start, _ in parts]
        self._col_sizes = [stop - start for start, stop in parts]
        self._ybuf = None  # reused local product when it is only a send buffer

    def _check_options(self, gather_output: bool = True) -> None:
        pass

    def _blocks(self, m: int) -> list[tuple[tuple, tuple]]:
        return [((0, s), (m, n)) for s, n in zip(self._col_starts, self._col_sizes)]

    def forward(self, x):
        """``x`` (M, K) replicated -> ``y`` (M, N) replicated [Alltoallw], or (M, N_p)."""
        self._agree_input("x", x, self.in_features)
        xp, prof = self.backend.xp, self.profiler
        m, n_p = x.shape[0], self.weight.shape[1]
        if self.gather_output:
            if self._ybuf is None or self._ybuf.shape != (m, n_p):
                self._ybuf = xp.empty((m, n_p), dtype=self.dtype)
            y_local = self._ybuf
        else:
            y_local = xp.empty((m, n_p), dtype=self.dtype)
        with prof.gemm():
            xp.matmul(x, self.weight, out=y_local)
            if self.bias is not None:
                y_local += self.bias
        self._x = x
        if not self.gather_output:
            return y_local
        y = xp.empty((m, self.out_features), dtype=self.dtype)
        with prof.comm("allgather", y.nbytes, self.comm.Get_size()):
            allgather_blocks(y_local, y, self._blocks(m), self.comm, self.staging)
        return y

    def backward(self, dy):
        """``dy`` in the output's layout -> ``dx`` (M, K) replicated [Iallreduce overlapped with
        the dW GEMM, or a blocking Allreduce when ``overlap=False``]; accumulates
        ``grad_weight`` and ``grad_bias``."""
        cols = self.out_features if self.gather_output else self.weight.shape[1]
        self._agree_input("dy", dy, cols, backward=True)
        xp, prof, x = self.backend.xp, self.profiler, self._x
        dy_p = dy[:, self.shard[1]] if self.gather_output else dy  # strided view, no copy
        with prof.gemm():
            dx = xp.matmul(dy_p, self.weight.T)

        def weight_grads() -> None:
            self.grad_weight += xp.matmul(x.T, dy_p)
            if self.grad_bias is not None:
                self.grad_bias += dy_p.sum(axis=0)

        self._collective_during("allreduce", dx.nbytes,
                                lambda: allreduce(dx, self.comm, self.staging),
                                lambda: iallreduce(dx, self.comm), weight_grads)
        return dx
