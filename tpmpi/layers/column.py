"""Column-parallel linear layer (Megatron's ColumnParallelLinear, the book's scheme).

``W = [W_0 ... W_{P-1}]`` split by columns over the ``P`` ranks of ``grid.comm`` (block
partition, uneven and empty shards allowed); rank ``p`` holds ``W_p`` (K, N_p) and ``b_p``.

forward  : ``Y_p = X @ W_p + b_p``; with ``gather_output`` the blocks are all-gathered straight
           into the C-ordered (M, N) result (one Alltoallw with subarray receive types: MPI
           writes every block into its strided final place, so there is neither a transposed
           staging buffer nor a (P, M, N_p) -> (M, N) copy).
           With ``chunks=c`` (level-2 tiling) the local product is split along M into up to
           ``c`` row chunks and each chunk's Ialltoallw gather (straight into its rows of the
           final output) is in flight while the next chunk's GEMM runs. Chunk boundaries are
           multiples of :data:`CHUNK_ROWS` rows (so at most M // CHUNK_ROWS chunks; one when
           M < 2 * CHUNK_ROWS): every row is computed by the same BLAS register-block path as
           in the whole product, and with one BLAS thread per rank the output is bitwise
           identical to ``chunks=1`` (a multi-threaded BLAS or cuBLAS may split the whole
           product differently, a last-bit difference).
backward : ``dX = sum_p dY_p @ W_p^T`` (Iallreduce, in flight while ``dW_p = X^T dY_p`` and
           ``db_p`` are computed locally, Megatron's overlap).
sequence_parallel (Megatron's flag): ``x`` arrives in layout "rows" (rank ``p`` holds block
           ``p`` of the M rows) and is all-gathered before the GEMM; backward gathers it again
           (Iallgather in flight during the ``dY_p W_p^T`` GEMM, so the gathered X is not kept
           between forward and backward) and reduce-scatters ``dX`` to row blocks instead of
           all-reducing it (in flight during the dW GEMM).
In terms of :mod:`tpmpi.core.mappings`: ``x -> Copy | GatherRows -> GEMM -> GatherCols
(gather_output)`` and backward the adjoints (``SplitCols``; ``AllReduce | ReduceScatterRows``).
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.args import check_int
from ..core.arrays import Array
from ..core.comm import wait_all
from ..core.gemm import column_sums
from ..core.layout import LinearLayouts
from .base import ParallelLinear

CHUNK_ROWS = 48
"""Row granule of the chunked gather: a multiple of the row blocking of common BLAS GEMM
kernels (OpenBLAS Haswell sgemm 24 / dgemm 8, SkylakeX 4-16), so chunked and whole products
take identical kernel paths for every row."""


def chunk_bounds(m: int, chunks: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of up to ``chunks`` balanced row chunks of ``m`` rows whose inner
    boundaries are multiples of :data:`CHUNK_ROWS`; the last chunk takes the remainder."""
    granules = m // CHUNK_ROWS
    c = max(1, min(chunks, granules))
    cuts = [i * granules // c * CHUNK_ROWS for i in range(c)] + [m]
    return list(zip(cuts[:-1], cuts[1:]))


class ColumnParallelLinear(ParallelLinear):
    """``x`` (M, K) replicated -> ``y`` (M, N) replicated, or layout "cols" (M, N_p) when
    ``gather_output=False``. ``backward(dy)`` takes ``dy`` in the output's layout and returns
    ``dx`` (M, K) replicated, accumulating ``grad_weight`` (K, N_p) and ``grad_bias`` (N_p,).
    ``chunks`` (positive int, same on every rank): pipeline the output gather with the local
    GEMM in up to that many row chunks (see the module docstring); only with ``gather_output``.
    ``sequence_parallel``: ``x`` and ``dx`` in layout "rows" (M_p, K) instead.
    """

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool = True,
                 chunks: int = 1, sequence_parallel: bool = False, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, gather_output=bool(gather_output),
                         chunks=chunks, sequence_parallel=bool(sequence_parallel), **kwargs)
        self.gather_output = bool(gather_output)
        self.chunks = int(chunks)
        self.sequence_parallel = bool(sequence_parallel)
        self._ybuf: Optional[Array] = None  # reused local product when only a send buffer

    @classmethod
    def layouts_for(cls, gather_output: bool = True, sequence_parallel: bool = False,
                    **_: Any) -> LinearLayouts:
        """x replicated ("rows" with ``sequence_parallel``: GatherRows, else Copy) -> the local
        product's "cols" block -> y "cols", or replicated with ``gather_output``
        (GatherCols); W and b split by columns."""
        return LinearLayouts(x="rows" if sequence_parallel else "replicated",
                             y="replicated" if gather_output else "cols", weight="cols",
                             bias="cols", x_local="replicated", y_local="cols")

    def _check_options(self, gather_output: bool = True, chunks: int = 1,
                       sequence_parallel: bool = False) -> None:
        check_int("chunks", chunks, 1)

    def forward(self, x: Array) -> Array:
        """``x`` (M, K) replicated [or (M_p, K) rows: Alltoallw] -> ``y`` (M, N) replicated
        [Alltoallw], or (M, N_p)."""
        m = self._agree_input("x", x, self.in_features, split_rows=self.layouts.x == "rows")
        self._x = x  # with sequence_parallel this rank's rows only: backward gathers them again
        x = self._apply(self.x_map, x, m)
        xp, prof = self.backend.xp, self.profiler
        n_p = self.weight.shape[1]
        nranks = self.comm.Get_size()
        if nranks == 1:  # the local product is the whole output: no gather, no copy
            y = xp.empty((m, n_p), dtype=self.dtype)
            with prof.gemm():
                self._matmul(x, self.weight, out=y)
                if self.bias is not None:
                    y += self.bias
            return y
        if self.gather_output:
            if self._ybuf is None or self._ybuf.shape != (m, n_p):
                self._ybuf = xp.empty((m, n_p), dtype=self.dtype)
            y_local = self._ybuf
        else:
            y_local = xp.empty((m, n_p), dtype=self.dtype)
        rows = chunk_bounds(m, self.chunks)
        if self.gather_output and len(rows) > 1 and nranks > 1 and not self.staging.staged:
            return self._forward_chunked(x, y_local, rows)
        with prof.gemm():
            self._matmul(x, self.weight, out=y_local)
            if self.bias is not None:
                y_local += self.bias
        return self._apply(self.y_map, y_local, self.out_features)

    def _forward_chunked(self, x: Array, y_local: Array, rows: list[tuple[int, int]]) -> Array:
        """Level-2 pipeline: GEMM of row chunk i, then its Ialltoallw into rows of the (M, N)
        output, in flight during the GEMM of chunk i + 1; one Waitall at the end."""
        xp, prof, nranks = self.backend.xp, self.profiler, self.comm.Get_size()
        y = xp.empty((x.shape[0], self.out_features), dtype=self.dtype)
        requests, gather = [], self.y_map
        assert gather is not None  # gather_output: y_local "cols" -> y replicated
        for a, b in rows:
            with prof.gemm():
                self._matmul(x[a:b], self.weight, out=y_local[a:b])
                if self.bias is not None:
                    y_local[a:b] += self.bias
            self.backend.synchronize()
            requests.append(self._collective(gather.start, y_local[a:b], y[a:b]))
            prof.count("allgather", y[a:b].nbytes, nranks)
        with prof.comm("allgather", 0, 1):  # waiting only, bytes counted above
            wait_all(requests)
        return y

    def backward(self, dy: Array) -> Array:
        """``dy`` in the output's layout -> ``dx`` (M, K) replicated [Iallreduce overlapped with
        the dW GEMM, or a blocking Allreduce when ``overlap=False``], or with
        ``sequence_parallel`` (M_p, K) rows [Iallgather of x during the dX GEMM, then
        Ireduce_scatter during the dW GEMM]; accumulates ``grad_weight`` and ``grad_bias``."""
        self._agree_input("dy", dy, self._width(self.layouts.y, self.out_features), backward=True)
        x_map, y_map, x_saved = self.x_map, self.y_map, self._saved_input
        assert x_map is not None  # x "replicated" or "rows" -> x_local replicated
        # own columns: a strided view (one copy on a GPU, for both products)
        dy_p = self.backend.operand(y_map.adjoint.out(dy)) if y_map else dy
        x = x_map.out(x_saved, self._rows)  # the gathered rows (sequence_parallel)
        dx = None

        def input_grad() -> None:
            nonlocal dx
            dx = self._matmul(dy_p, self.weight.T)  # partial sums over the ranks

        def weight_grads() -> None:
            self.grad_weight += self._matmul(x.T, dy_p)
            if self.grad_bias is not None:
                self.grad_bias += column_sums(dy_p)

        self._map_during(x_map, x_saved, x, input_grad)
        reduce = x_map.adjoint
        dx_out = reduce.out(dx)
        self._map_during(reduce, dx, dx_out, weight_grads)
        return dx_out
