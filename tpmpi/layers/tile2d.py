"""Two-level tile scheme: SUMMA stationary-C on a ``pr x pc`` grid (Optimus / Colossal-AI 2D).

Level 1, layout "tiles" for every operand; rank ``(r, c)`` holds

* ``X[r, c]`` (m_r, k^c): rows of X (M) split over grid rows, K split over grid **columns**;
* ``W[r, c]`` (k_r, n_c): K split over grid **rows**, N split over grid columns;
* ``Y[r, c]`` (m_r, n_c) and ``b[c]`` (n_c,), the bias split over grid columns.

Y's N is split over grid columns like the next layer's K in X, so layers chain with no
redistribution. Tile ``Y[r, c]`` needs the X row panel ``r`` (m_r, K) and the W column panel
``c`` (K, n_c); the K pieces of the first live on the ranks of ``row_comm`` (grid columns), those
of the second on the ranks of ``col_comm`` (grid rows).

Gather form (``panel=None``)
  forward  : Allgather of the X row panel over ``row_comm`` and of the W column panel over
             ``col_comm`` (Alltoallw into place), one local GEMM, ``+ b[c]``. Both panels are
             cached until backward (m_r*K + K*n_c elements), saving the two Allgathers there.
  backward : ``dX``: ``dY @ Wpanel^T`` written block by block (one GEMM per grid column's K
             block) into a packed buffer, Ireduce_scatter over ``row_comm`` -> dX tile, in flight
             during ``dW``: ``Xpanel^T @ dY`` (K, n_c), Ireduce_scatter over ``col_comm`` -> the
             (k_r, n_c) rows added to ``grad_weight``; ``db``: column sums of dY, Allreduce over
             ``col_comm``.
Panel form (``panel=kb``, level 2)
  K is cut at multiples of kb and at the owner boundaries of both K splits, so each segment
  (width <= kb) has one owning grid column (X piece) and one owning grid row (W piece).
  forward  : per segment, Ibcast of the X piece (m_r, w) over ``row_comm`` and of the W piece
             (w, n_c) over ``col_comm``, double-buffered: segment t+1 travels while ``Y += Xs @
             Ws`` of segment t runs. Workspace 2 * (m_r + n_c) * kb elements; nothing cached.
  backward : the same broadcasts again (not cached: that is the memory bound); per segment the
             ``dX`` piece ``dY @ Ws^T`` is Ireduce'd over ``row_comm`` to the X owner and the
             ``dW`` piece ``Xs^T @ dY`` over ``col_comm`` to the W owner, in flight during the
             next segment's GEMMs; ``db`` as above.
A grid dimension of size 1 exchanges nothing: its gathers, broadcasts and reductions are
skipped, not run on a one-rank communicator (no MPI call, no host staging, no packing); on a
1 x 1 grid the layer is the local GEMMs alone (dX = dY @ W^T written once, dW added once).

Bytes per rank (b = itemsize), the nccl-tests size S each rank takes part in:
gather form forward ``(m_r*K + K*n_c) b`` (Allgather), backward ``(m_r*K + K*n_c + n_c) b``
(two Reduce_scatters, one Allreduce); panel form forward ``(m_r + n_c) K b`` (Bcast), backward
``2 (m_r + n_c) K b + n_c b`` (Bcast, Reduce, Allreduce). Received per rank in the gather
forward: ``(m_r (K - k^c) + (K - k_r) n_c) b``. Terms on a size-1 communicator are 0 (no
collective runs); :meth:`TileParallelLinear.comm_bytes` evaluates these formulas.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from ..core.args import check_int
from ..core.arrays import Array
from ..core.comm import Request, allgather_blocks, allreduce, ibcast, ireduce, ireduce_scatter, \
    wait_all
from ..core.gemm import column_sums
from ..core.layout import LinearLayouts, blocks, local_shape
from ..core.grid import ProcessGrid
from ..core.partition import block_partition
from .base import ParallelLinear

Segment = tuple[int, int, int, int]  # (k0, k1, owning grid column, owning grid row)


def _owner(parts: list[tuple[int, int]], k: int) -> int:
    return next(i for i, (a, b) in enumerate(parts) if a <= k < b)


def k_segments(k: int, panel: int, x_parts: list[tuple[int, int]],
               w_parts: list[tuple[int, int]]) -> list[Segment]:
    """The K segments of the panel form: cut at multiples of ``panel`` and at the block
    boundaries of ``x_parts`` (K over grid columns) and ``w_parts`` (K over grid rows)."""
    cuts = sorted({*range(0, k, panel), *(a for a, _ in x_parts), *(a for a, _ in w_parts), k})
    return [(a, b, _owner(x_parts, a), _owner(w_parts, a))
            for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class TileParallelLinear(ParallelLinear):
    """``x`` tile (m_r, k^c) -> ``y`` tile (m_r, n_c), layout "tiles" on a 2D ``grid``;
    ``backward(dy)`` takes the (m_r, n_c) tile of dY, returns the dX tile and accumulates
    ``grad_weight`` (k_r, n_c) and ``grad_bias`` (n_c,). ``panel``: None (gather form) or the
    K panel width of the level-2 broadcast loop (positive int, same on every rank)."""

    def __init__(self, in_features: int, out_features: int, *, grid: Optional[ProcessGrid],
                 panel: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, grid=grid, panel=panel, **kwargs)
        self.panel = panel
        pr, pc = self.grid.shape
        self._k_cols = block_partition(self.in_features, pc)  # X's K blocks, by grid column
        self._k_rows = block_partition(self.in_features, pr)  # W's K blocks, by grid row
        self._segments = k_segments(self.in_features, panel, self._k_cols, self._k_rows) \
            if panel is not None else []
        # gather form: (X row panel, W column panel) cached for backward
        self._panels: Optional[tuple[Array, Array]] = None
        self._m = 0

    @classmethod
    def layouts_for(cls, **_: Any) -> LinearLayouts:
        """Everything in tiles (x, y, W, b): chainable layer to layer. The panels the local
        GEMM reads are gathered or broadcast inside the layer (SUMMA), not by a mapping."""
        return LinearLayouts(x="tiles", y="tiles", weight="tiles", bias="tiles",
                             x_local="tiles", y_local="tiles")

    def _check_options(self, panel: Optional[int] = None) -> None:
        check_int("panel", panel, 1, allow_none=True)

    # ---------------------------------------------------------------- validation
    def _agree_tile(self, x: Array) -> None:
        """Collectively check that ``x`` is this rank's tile of a global (M, in_features) X,
        M being the rows held by grid column 0: one agreement (call, array, dtype, columns),
        then one Allgather of the row counts, judged alike on every rank."""
        grid, pc = self.grid, self.grid.shape[1]
        k_c = local_shape((0, self.in_features), grid, "tiles")[1]

        def local_checks() -> None:
            self._check_array("x", x)
            if x.shape[1] != k_c:
                raise ValueError(f"x.shape={tuple(x.shape)}: expected {k_c} columns, tile "
                                 f"{grid.coords} of a global (M, {self.in_features}) x in "
                                 f"layout 'tiles' on grid {grid.label}")

        self._agree_call(local_checks, "x", x, False)
        every = np.array([x.shape[0]], dtype=np.int64)
        if grid.size > 1:  # one rank: nothing to gather
            every = np.empty(grid.size, dtype=np.int64)
            self.comm.Allgather(np.array([x.shape[0]], dtype=np.int64), every)
        m = int(every[::pc].sum())  # ranks (r, 0), row-major
        errors = []
        for q, (_, want) in enumerate(blocks((m, self.in_features), grid.shape, "tiles")):
            if every[q] != want[0]:
                errors.append(f"x.shape={(int(every[q]), want[1])}: expected {want}, tile "
                              f"{divmod(q, pc)} of the global ({m}, {self.in_features}) x in "
                              f"layout 'tiles' on grid {grid.label} (rank {q})")
        if errors:
            raise ValueError("; ".join(errors))
        self._m = m

    def _agree_dy(self, dy: Array) -> None:
        def local_checks() -> None:
            self._check_array("dy", dy, backward=True)
            want = (self._saved_input.shape[0], self.weight.shape[1])
            if tuple(dy.shape) != want:
                raise ValueError(f"dy.shape={tuple(dy.shape)}: expected {want}, tile "
                                 f"{self.grid.coords} of the global ({self._m}, "
                                 f"{self.out_features}) dy on grid {self.grid.label}")

        self._agree_call(local_checks, "dy", dy, True)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Array) -> Array:
        """``x`` tile (m_r, k^c) -> ``y`` tile (m_r, n_c). Gather form: two Allgathers; panel
        form: double-buffered Ibcasts on ``row_comm`` / ``col_comm``."""
        self._agree_tile(x)
        xp = self.backend.xp
        x = xp.ascontiguousarray(x)
        self._x = x
        if self.panel is None:
            xpanel, wpanel = self._gather_panels(x)
            self._panels = (xpanel, wpanel)
            with self.profiler.gemm():
                y = self._matmul(xpanel, wpanel)
        else:
            y = xp.zeros((x.shape[0], self.weight.shape[1]), dtype=self.dtype)
            for _, xs, ws in self._broadcast_segments(x):
                with self.profiler.gemm():
                    y += self._matmul(xs, ws)
        if self.bias is not None:
            y += self.bias
        return y

    def _gather_panels(self, x: Array) -> tuple[Array, Array]:
        """X row panel (m_r, K) over ``row_comm`` and W column panel (K, n_c) over
        ``col_comm``, each an Alltoallw into place (skipped on a size-1 communicator)."""
        xp, m_r, n_c = self.backend.xp, x.shape[0], self.weight.shape[1]
        k = self.in_features
        out = []
        # the X row panel's K blocks are "cols" over row_comm, the W column panel's "rows"
        # over col_comm
        for local, comm, shape, layout in ((x, self.grid.row_comm, (m_r, k), "cols"),
                                           (self.weight, self.grid.col_comm, (k, n_c), "rows")):
            size = comm.Get_size()
            if size == 1:
                out.append(local)
                continue
            panel = xp.empty(shape, dtype=self.dtype)
            with self.profiler.comm("allgather", panel.nbytes, size):
                self._collective(allgather_blocks, local, panel, blocks(shape, (1, size), layout),
                                 comm, self.staging)
            out.append(panel)
        return out[0], out[1]

    def _broadcast_segments(self, x: Array) -> Iterator[tuple[Segment, Array, Array]]:
        """Yield ``(segment, Xs (m_r, w), Ws (w, n_c))`` for every K segment; the Ibcasts of
        segment t+1 are posted before those of segment t are waited for (two buffer slots)."""
        xp, prof, grid = self.backend.xp, self.profiler, self.grid
        m_r, n_c = x.shape[0], self.weight.shape[1]
        segs = self._segments
        width = max((b - a for a, b, _, _ in segs), default=0)
        slots = [(xp.empty(m_r * width, dtype=self.dtype), xp.empty(width * n_c, dtype=self.dtype))
                 for _ in range(2)]
        row, col = grid.coords
        pr, pc = grid.shape

        def start(t: int) -> tuple[list[Request], Array, Array]:
            a, b, j, i = segs[t]
            xflat, wflat = slots[t % 2]
            xs = xflat[: m_r * (b - a)].reshape(m_r, b - a)
            ws = wflat[: (b - a) * n_c].reshape(b - a, n_c)
            requests: list[Request] = []
            if pc == 1:  # this rank owns all of K: its X columns, no broadcast
                xs = self.backend.operand(x[:, a:b])
            else:
                if col == j:  # X columns are strided: the owner packs them into the slot
                    xs[...] = x[:, a - self._k_cols[j][0]: b - self._k_cols[j][0]]
                requests.append(self._collective(ibcast, xs, j, grid.row_comm, self.staging))
                prof.count("bcast", xs.nbytes, pc)
            if row == i:  # W rows are contiguous: the owner broadcasts its own rows, no copy
                ws = self.weight[a - self._k_rows[i][0]: b - self._k_rows[i][0]]
            if pr > 1:
                requests.append(self._collective(ibcast, ws, i, grid.col_comm, self.staging))
                prof.count("bcast", ws.nbytes, pr)
            return requests, xs, ws

        posted = [start(0)] if segs else []
        for t, seg in enumerate(segs):
            if t + 1 < len(segs):
                posted.append(start(t + 1))
            requests, xs, ws = posted.pop(0)
            with prof.comm("bcast", 0, 1):  # waiting only, bytes counted at start()
                wait_all(requests)
            yield seg, xs, ws

    # ---------------------------------------------------------------- backward
    def backward(self, dy: Array) -> Array:
        """``dy`` tile (m_r, n_c) -> ``dx`` tile (m_r, k^c); accumulates ``grad_weight`` and
        ``grad_bias``. Gather form: two Ireduce_scatters on the cached panels; panel form:
        Ibcasts and Ireduces per K segment; bias: Allreduce over ``col_comm``."""
        self._agree_dy(dy)
        dy = self.backend.xp.ascontiguousarray(dy)
        dx = self._backward_gather(dy) if self.panel is None else self._backward_panels(dy)
        if self.grad_bias is not None:
            db = column_sums(dy)
            with self.profiler.comm("allreduce", db.nbytes, self.grid.shape[0]):
                self._collective(allreduce, db, self.grid.col_comm, self.staging)
            self.grad_bias += db
        return dx

    def _backward_gather(self, dy: Array) -> Array:
        """dX and dW from the cached panels; a grid dimension of size 1 has nothing to reduce:
        its product is the result (no collective, no copy)."""
        xp, prof, grid = self.backend.xp, self.profiler, self.grid
        assert self._panels is not None  # cached by forward (backward's agreement checked it ran)
        xpanel, wpanel = self._panels
        m_r, n_c = dy.shape
        pr, pc = grid.shape
        dx_request: Request = MPI.REQUEST_NULL
        if pc == 1:
            with prof.gemm():
                dx = self._matmul(dy, wpanel.T)
        else:
            packed = xp.empty(m_r * self.in_features, dtype=self.dtype)  # K blocks packed
            with prof.gemm():
                for a, b in self._k_cols:
                    self._matmul(dy, wpanel[a:b].T,
                                 out=packed[m_r * a: m_r * b].reshape(m_r, b - a))
            dx = xp.empty(self._saved_input.shape, dtype=self.dtype)
            dx_request = self._collective(ireduce_scatter, packed, dx,
                                          [m_r * (b - a) for a, b in self._k_cols],
                                          grid.row_comm, self.staging)
            prof.count("reduce_scatter", packed.nbytes, pc)
        with prof.gemm():
            partial = self._matmul(xpanel.T, dy)  # (K, n_c): row blocks contiguous
        if pr == 1:
            gw = partial
        else:
            gw = xp.empty(self.weight.shape, dtype=self.dtype)
            with prof.comm("reduce_scatter", partial.nbytes, pr):
                self._collective(ireduce_scatter, partial, gw,
                                 [(b - a) * n_c for a, b in self._k_rows], grid.col_comm,
                                 self.staging).Wait()
        self.grad_weight += gw
        with prof.comm("reduce_scatter", 0, 1):  # waiting only, bytes counted above
            dx_request.Wait()
        return dx

    def _backward_panels(self, dy: Array) -> Array:
        """Per K segment: the dX and dW pieces, each reduced to its owner (kept as it is on a
        grid dimension of size 1)."""
        xp, prof, grid = self.backend.xp, self.profiler, self.grid
        x = self._saved_input
        dx = xp.empty(x.shape, dtype=self.dtype)
        inflight: list = []

        def finish() -> None:
            with prof.comm("reduce", 0, 1):  # waiting only, bytes counted when posted
                wait_all([req for reqs, *_ in inflight for req in reqs])
            for _, (a, b, j, i), rx, rw, _ in inflight:
                if rx is not None:
                    dx[:, a - self._k_cols[j][0]: b - self._k_cols[j][0]] = rx
                if rw is not None:
                    self.grad_weight[a - self._k_rows[i][0]: b - self._k_rows[i][0]] += rw
            inflight.clear()

        for seg, xs, ws in self._broadcast_segments(x):
            _, _, j, i = seg
            with prof.gemm():
                pdx = self._matmul(dy, ws.T)  # (m_r, w), summed over grid columns
                pdw = self._matmul(xs.T, dy)  # (w, n_c), summed over grid rows
            requests: list = []
            rx = self._reduce_to_owner(pdx, j, grid.row_comm, requests)
            rw = self._reduce_to_owner(pdw, i, grid.col_comm, requests)
            finish()  # the previous segment's reductions
            inflight.append((requests, seg, rx, rw, (pdx, pdw)))  # keep send buffers alive
        finish()
        return dx

    def _reduce_to_owner(self, part: Array, owner: int, comm: MPI.Comm,
                         requests: list[Request]) -> Optional[Array]:
        """The sum of ``part`` over ``comm`` on rank ``owner`` (Ireduce appended to
        ``requests``): a new buffer there, None elsewhere; ``part`` itself on one rank."""
        size = comm.Get_size()
        if size == 1:
            return part
        out = self.backend.xp.empty_like(part) if comm.Get_rank() == owner else None
        requests.append(self._collective(ireduce, part, out, owner, comm, self.staging))
        self.profiler.count("reduce", part.nbytes, size)
        return out

    # ---------------------------------------------------------------- accounting
    def comm_bytes(self, m: int, *, backward: bool = False) -> int:
        """Bytes this rank's collectives carry (sum of the nccl-tests sizes S) for one forward
        (or backward) with a global X of ``m`` rows; see the module docstring."""
        pr, pc = self.grid.shape
        m_r = local_shape((m, self.in_features), self.grid, "tiles")[0]
        n_c = self.weight.shape[1]
        k, item = self.in_features, self.dtype.itemsize
        moved = (m_r * k if pc > 1 else 0) + (k * n_c if pr > 1 else 0)
        if backward and self.panel is not None:
            moved *= 2  # broadcasts again, then reductions of the same sizes
        bias = n_c if backward and self.bias is not None and pr > 1 else 0
        return item * (moved + bias)
