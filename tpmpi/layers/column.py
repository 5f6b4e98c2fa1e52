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
In terms of :mod:`tpmpi.core.mappings`: ``x -> gather_x (Copy | GatherRows) -> GEMM ->
gather_y (GatherCols with gather_output, else Keep)`` and backward the adjoints, ``split_dy``
(SplitCols | Keep) and ``reduce_dx`` (AllReduce | ReduceScatterRows).
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.args import check_int
from ..core.arrays import Array
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

    STEP_NAMES = ("gather_x", "gather_y", "split_dy", "reduce_dx")

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool = True,
                 chunks: int = 1, sequence_parallel: bool = False, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, gather_output=bool(gather_output),
                         chunks=chunks, sequence_parallel=bool(sequence_parallel), **kwargs)
        self.gather_output = bool(gather_output)
        self.chunks = int(chunks)
        self.sequence_parallel = bool(sequence_parallel)
        lay = self.layouts
        # GatherRows of x's row blocks (sequence_parallel), else Copy: x is whole already
        self.gather_x = self._operator(lay.x, lay.x_local)
        # GatherCols of the output's column blocks (gather_output), else Keep; non-blocking
        # chunks of it pipeline the forward whatever ``overlap`` says of backward
        self.gather_y = self._operator(lay.y_local, lay.y, overlap=True)
        self.split_dy = self.gather_y.adjoint  # own columns of dy (SplitCols), or Keep
        self.reduce_dx = self.gather_x.adjoint  # AllReduce, or ReduceScatterRows
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

    @classmethod
    def row_chunks(cls, m: int, grid: tuple[int, int], *, staged: bool = False,
                   gather_output: bool = True, chunks: int = 1, **_: Any
                   ) -> list[tuple[int, int]]:
        """:func:`chunk_bounds` of the forward when its gather is pipelined (``gather_output``,
        more than one rank, no host staging), else one chunk."""
        if gather_output and grid[0] * grid[1] > 1 and not staged:
            return chunk_bounds(m, chunks)
        return [(0, m)]

    def _check_options(self, gather_output: bool = True, chunks: int = 1,
                       sequence_parallel: bool = False) -> None:
        check_int("chunks", chunks, 1)

    def forward(self, x: Array) -> Array:
        """``x`` (M, K) replicated [or (M_p, K) rows: Alltoallw] -> ``y`` (M, N) replicated
        [Alltoallw], or (M, N_p)."""
        m = self._agree_input("x", x, self.in_features, split_rows=self.sequence_parallel)
        # with sequence_parallel this rank's rows only: backward gathers them again
        x = self._x = self._enter(x, keep=True)
        x = self.gather_x(x, m)  # Allgather (Alltoallw) of the row blocks, or x itself
        y_local = self._product_buffer(m)
        rows = self.row_chunks(m, self.grid.shape, staged=self.staging.staged,
                               **self.options) if self.chunks > 1 else []
        if len(rows) > 1:
            return self._forward_chunked(x, y_local, rows)
        self.local.product(x, self.weight, out=y_local, bias=self.bias)
        return self.gather_y(y_local, self.out_features)  # Allgather (Alltoallw), or y_local

    def _product_buffer(self, m: int) -> Array:
        """The local product's (m, N_p) array: reused across calls when it is only the send
        buffer of the output gather, new when it is the output itself."""
        shape, xp = (m, self.weight.shape[1]), self.backend.xp
        if not self.gather_y.allocates or self.comm.Get_size() == 1:
            return xp.empty(shape, dtype=self.dtype)
        if self._ybuf is None or self._ybuf.shape != shape:
            self._ybuf = xp.empty(shape, dtype=self.dtype)
        return self._ybuf

    def _forward_chunked(self, x: Array, y_local: Array, rows: list[tuple[int, int]]) -> Array:
        """Level-2 pipeline: GEMM of row chunk i, then its Ialltoallw into rows of the (M, N)
        output, in flight during the GEMM of chunk i + 1; all waited for at the end."""
        y = self.gather_y.out(y_local, self.out_features)
        pending = []
        for a, b in rows:
            self.local.product(x[a:b], self.weight, out=y_local[a:b], bias=self.bias)
            pending.append(self.gather_y.start(y_local[a:b], out=y[a:b]))  # Ialltoallw
        for chunk in pending:
            chunk.wait()
        return y

    def backward(self, dy: Array) -> Array:
        """``dy`` in the output's layout -> ``dx`` (M, K) replicated [Iallreduce overlapped with
        the dW GEMM, or a blocking Allreduce when ``overlap=False``], or with
        ``sequence_parallel`` (M_p, K) rows [Iallgather of x during the dX GEMM, then
        Ireduce_scatter during the dW GEMM]; accumulates ``grad_weight`` and ``grad_bias``."""
        self._agree_input("dy", dy, self._width(self.layouts.y, self.out_features), backward=True)
        dy = self._enter(dy)
        # own columns: a strided view (one copy on a GPU, for both products)
        dy_p = self.backend.operand(self.split_dy(dy))
        dx = self._partial((dy_p.shape[0], self.in_features))  # float32 for 2-byte floats

        def input_grad() -> None:
            self.local.product(dy_p, self.weight.T, out=dx)  # partial sums over the ranks

        # x's rows gathered again (Ialltoallw, sequence_parallel) during the dX GEMM
        x = self.gather_x.during(self._saved_input, input_grad, self._rows)

        def weight_grads() -> None:
            self.grad_weight += self.local.product(x.T, dy_p)
            if self.grad_bias is not None:
                self.grad_bias += self.local.column_sums(dy_p)

        # Iallreduce (or Ireduce_scatter) of dX, then its one rounding
        return self._rounded(self.reduce_dx.during(dx, weight_grads))
