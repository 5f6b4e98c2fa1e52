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

In terms of operators (:mod:`tpmpi.core.summa`): ``gather_x`` (GatherPanel over ``row_comm``)
and ``gather_w`` (GatherRows over ``col_comm``) with their adjoints ``reduce_dx``
(ReduceScatterPanel) and ``reduce_dw`` (ReduceScatterRows); ``bcast_x`` / ``bcast_w``
(BroadcastPiece) with their adjoints ``reduce_dx_piece`` / ``reduce_dw_piece``
(ReduceToOwner); ``allreduce_db`` (AllReduce over ``col_comm``).
:meth:`TileParallelLinear.schedule_for` lists their nccl-tests sizes S per rank: gather form
forward ``(m_r*K + K*n_c) b`` (Allgather), backward ``(m_r*K + K*n_c + n_c) b`` (two
Reduce_scatters, one Allreduce); panel form forward ``(m_r + n_c) K b`` (Bcast), backward
``2 (m_r + n_c) K b + n_c b`` (Bcast, Reduce, Allreduce); nothing on a size-1 communicator.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Union

import numpy as np

from ..core.args import check_int
from ..core.arrays import Array
from ..core.grid import ProcessGrid
from ..core.layout import LinearLayouts, blocks, local_shape
from ..core.mappings import AllReduce, GatherRows, Pending
from ..core.partition import block_partition, largest_block
from ..core.tiling import panel_workspace_bytes
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Schedule, Step
from ..core.summa import BroadcastPiece, GatherPanel, ReduceScatterPanel, ReduceToOwner
from .base import ParallelLinear
from .linear_schedule import grid_shape, nbytes, overlapped

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
        row, col, pending = self.grid.row_comm, self.grid.col_comm, self._pending
        self.gather_x = GatherPanel(row, self.staging, overlap=self.overlap, pending=pending)
        # W's K blocks are row blocks
        self.gather_w = GatherRows(col, self.staging, pending=pending)
        reduce_dx = self.gather_x.adjoint
        assert isinstance(reduce_dx, ReduceScatterPanel)  # GatherPanel's adjoint
        self.reduce_dx, self.reduce_dw = reduce_dx, self.gather_w.adjoint
        # the panel form's pipeline is non-blocking whatever ``overlap`` says
        self.bcast_x = BroadcastPiece(row, self.staging, pending=pending)
        self.bcast_w = BroadcastPiece(col, self.staging, pending=pending)
        self.reduce_dx_piece, self.reduce_dw_piece = self.bcast_x.adjoint, self.bcast_w.adjoint
        self.allreduce_db = AllReduce(col, self.staging, pending=pending)

    @classmethod
    def layouts_for(cls, **_: Any) -> LinearLayouts:
        """Everything in tiles (x, y, W, b): chainable layer to layer. The panels the local
        GEMM reads are gathered or broadcast by the SUMMA operators of :mod:`tpmpi.core.summa`
        on the grid's row and column communicators."""
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
        self._pending.settle()  # the Allgather below follows the agreement
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
        x = self._x = self._enter(x, keep=True)
        if self.panel is None:
            xpanel = self.gather_x(x, self.in_features)  # Allgather (Alltoallw), row_comm
            wpanel = self.gather_w(self.weight, self.in_features)  # the same, col_comm
            self._panels = (xpanel, wpanel)
            return self.local.product(xpanel, wpanel, bias=self.bias)
        # the segments' products summed in float32 for 2-byte floats, rounded once
        y = xp.zeros((x.shape[0], self.weight.shape[1]), dtype=self.partial_dtype)
        part = self._partial(y.shape)
        for _, xs, ws in self._broadcast_segments(x):
            y += self.local.product(xs, ws, out=part)
        if self.bias is not None:
            y += self.bias
        return self._rounded(y)

    def _broadcast_segments(self, x: Array) -> Iterator[tuple[Segment, Array, Array]]:
        """Yield ``(segment, Xs (m_r, w), Ws (w, n_c))`` for every K segment; the Ibcasts of
        segment t+1 are posted before those of segment t are waited for (two buffer slots)."""
        xp, grid = self.backend.xp, self.grid
        m_r, n_c = x.shape[0], self.weight.shape[1]
        segs = self._segments
        width = max((b - a for a, b, _, _ in segs), default=0)
        slots = [(xp.empty(m_r * width, dtype=self.dtype), xp.empty(width * n_c, dtype=self.dtype))
                 for _ in range(2)]
        row, col = grid.coords

        def start(t: int) -> tuple[list[Pending], Array, Array]:
            a, b, j, i = segs[t]
            xflat, wflat = slots[t % 2]
            xs = xflat[: m_r * (b - a)].reshape(m_r, b - a)
            ws = wflat[: (b - a) * n_c].reshape(b - a, n_c)
            pending: list[Pending] = []
            if grid.shape[1] == 1:  # this rank owns all of K: its X columns, no broadcast
                xs = self.backend.operand(x[:, a:b])
            else:
                if col == j:  # X columns are strided: the owner packs them into the slot
                    xs[...] = x[:, a - self._k_cols[j][0]: b - self._k_cols[j][0]]
                pending.append(self.bcast_x.start(xs, j))  # Ibcast over row_comm
            if row == i:  # W rows are contiguous: the owner broadcasts its own rows, no copy
                ws = self.weight[a - self._k_rows[i][0]: b - self._k_rows[i][0]]
            pending.append(self.bcast_w.start(ws, i))  # Ibcast over col_comm
            return pending, xs, ws

        posted = [start(0)] if segs else []
        for t, seg in enumerate(segs):
            if t + 1 < len(segs):
                posted.append(start(t + 1))
            pending, xs, ws = posted.pop(0)
            for piece in pending:
                piece.wait()
            yield seg, xs, ws

    # ---------------------------------------------------------------- backward
    def backward(self, dy: Array) -> Array:
        """``dy`` tile (m_r, n_c) -> ``dx`` tile (m_r, k^c); accumulates ``grad_weight`` and
        ``grad_bias``. Gather form: two Ireduce_scatters on the cached panels; panel form:
        Ibcasts and Ireduces per K segment; bias: Allreduce over ``col_comm``."""
        self._agree_dy(dy)
        dy = self._enter(dy)
        dx = self._backward_gather(dy) if self.panel is None else self._backward_panels(dy)
        if self.grad_bias is not None:
            self.grad_bias += self.allreduce_db(  # Allreduce, col_comm
                self.local.column_sums(dy, self.partial_dtype))
        return self._rounded(dx)

    def _backward_gather(self, dy: Array) -> Array:
        """dX and dW from the cached panels; a grid dimension of size 1 has nothing to reduce:
        its product is the result (no collective, no copy)."""
        assert self._panels is not None  # cached by forward (backward's agreement checked it ran)
        xpanel, wpanel = self._panels
        shape = (dy.shape[0], self.in_features)
        packed, views = self.reduce_dx.pack(shape, self.backend.xp, self.partial_dtype)
        for view, (a, b) in zip(views, self._k_cols):  # dY @ Wpanel^T, K block by K block
            self.local.product(dy, wpanel[a:b].T, out=view)

        def weight_grads() -> None:
            # (K, n_c): row blocks contiguous
            partial = self.local.product(xpanel.T, dy, out=self._partial((xpanel.shape[1],
                                                                          dy.shape[1])))
            self.grad_weight += self.reduce_dw(partial)  # Reduce_scatter over col_comm

        return self.reduce_dx.during(packed, weight_grads, shape)  # Ireduce_scatter, row_comm

    def _backward_panels(self, dy: Array) -> Array:
        """Per K segment: the dX and dW pieces, each reduced to its owner (kept as it is on a
        grid dimension of size 1), in flight during the next segment's products."""
        x = self._saved_input
        dx = self.backend.xp.empty(x.shape, dtype=self.dtype)
        inflight: list = []

        def finish() -> None:
            for pending, _, _, _, _ in inflight:
                for piece in pending:
                    piece.wait()
            for _, (a, b, j, i), rx, rw, _ in inflight:
                if rx is not None:
                    dx[:, a - self._k_cols[j][0]: b - self._k_cols[j][0]] = rx
                if rw is not None:
                    self.grad_weight[a - self._k_rows[i][0]: b - self._k_rows[i][0]] += rw
            inflight.clear()

        for seg, xs, ws in self._broadcast_segments(x):
            _, _, j, i = seg
            # (m_r, w) summed over grid columns, (w, n_c) over grid rows: float32 partials for
            # 2-byte floats, rounded when placed
            pdx = self.local.product(dy, ws.T, out=self._partial((dy.shape[0], ws.shape[0])))
            pdw = self.local.product(xs.T, dy, out=self._partial((xs.shape[1], dy.shape[1])))
            rx, rw = self.reduce_dx_piece.out(pdx, j), self.reduce_dw_piece.out(pdw, i)
            pending = [self.reduce_dx_piece.start(pdx, j, out=rx),  # Ireduce, row_comm
                       self.reduce_dw_piece.start(pdw, i, out=rw)]  # Ireduce, col_comm
            finish()  # the previous segment's reductions
            inflight.append((pending, seg, rx, rw, (pdx, pdw)))  # keep send buffers alive
        finish()
        return dx

    # ---------------------------------------------------------------- schedule
    @classmethod
    def workspace_elements(cls, m: int, k: int, n: int, grid: tuple[int, int],
                           panel: Optional[int] = None, **_: Any) -> int:
        """The gather form's panels, cached from forward to backward ((m_r + n_c) K, a size-1
        grid dimension's panel being the tile itself), or the panel form's two buffer slots
        (:func:`tpmpi.core.tiling.panel_workspace_bytes` in elements)."""
        pr, pc = grid
        m_r, n_c = largest_block(m, pr), largest_block(n, pc)
        if panel is None:
            return (m_r * k if pc > 1 else 0) + (k * n_c if pr > 1 else 0)
        width = max((b - a for a, b, _, _ in k_segments(k, panel, block_partition(k, pc),
                                                        block_partition(k, pr))), default=0)
        return panel_workspace_bytes(m_r, n_c, width, 1)

    @classmethod
    def schedule_for(cls, m: int, k: int, n: int, parts: Union[int, tuple[int, int]], *,
                     dtype: str = "float32", backward: bool = False, bias: bool = True,
                     overlap: bool = True, staged: bool = False, panel: Optional[int] = None,
                     **_: Any) -> Schedule:
        """The steps of one forward (and backward) on the ``(pr, pc)`` grid ``parts`` for an
        (m, k) input, on the rank holding the largest tiles: the gather form's panel gathers
        and reduce-scatters, or the panel form's K segments (:func:`k_segments`), each
        segment's broadcasts in flight during the previous segment's products and its
        reductions during the next segment's (not under host staging). No communication."""
        pr, pc = grid_shape(parts)
        m_r, n_c = largest_block(m, pr), largest_block(n, pc)
        k_r, k_c = largest_block(k, pr), largest_block(k, pc)
        item = nbytes((1,), dtype)
        fwd: list[Step] = []
        bwd: list[Step] = []
        if panel is None:
            steps = [GatherPanel.step("gather_x", (m_r, k), dtype, "row", pc),
                     GatherRows.step("gather_w", (k, n_c), dtype, "col", pr)]
            fwd += [s for s in steps if s] + [Product("y", m_r, k, n_c, dtype)]
            saved = (m_r * k_c + cls.workspace_elements(m, k, n, (pr, pc))) * item  # panels
            if backward:
                bwd.append(Product("dX", m_r, n_c, k, dtype))
                work: list[Step] = [Product("dW", k, m_r, n_c, dtype)]
                work += [s for s in [GatherRows.adjoint_class.step(
                    "reduce_dw", (k, n_c), dtype, "col", pr)] if s]
                bwd += overlapped([GatherPanel.adjoint_class.step(
                    "reduce_dx", (m_r, k), dtype, "row", pc)], work, overlap and not staged)
        else:
            segments = k_segments(k, panel, block_partition(k, pc), block_partition(k, pr))
            fwd += cls._segment_steps(segments, m_r, n_c, (pr, pc), dtype, staged, False)
            saved = m_r * k_c * item
            if backward:
                bwd += cls._segment_steps(segments, m_r, n_c, (pr, pc), dtype, staged, True)
        if bias:
            fwd.append(Pointwise("bias", 2 * m_r * n_c * item, dtype))
        if backward and bias:
            bwd.append(Pointwise("db", (m_r + 1) * n_c * item, dtype))
            bwd += [s for s in [AllReduce.step("allreduce_db", (n_c,), dtype, "col", pr)] if s]
            bwd.append(GradsReady(("bias",), n_c * item, dtype))
        if backward:
            bwd.append(GradsReady(("weight",), k_r * n_c * item, dtype))
        return Schedule(tuple(fwd), tuple(bwd), (k_r * n_c + (n_c if bias else 0)) * item,
                        saved)

    @staticmethod
    def _segment_steps(segments: list[Segment], m_r: int, n_c: int, grid: tuple[int, int],
                       dtype: str, staged: bool, backward: bool) -> list[Step]:
        """The panel form's loop over K segments: forward ``y[t]`` (added into y), backward
        ``dX[t]`` and ``dW[t]`` with their reductions to the owners."""
        pr, pc = grid
        out: list[Step] = []
        item = nbytes((1,), dtype)

        def work(t: int) -> list[Step]:
            w = segments[t][1] - segments[t][0]
            if backward:
                return [Product(f"dX[{t}]", m_r, n_c, w, dtype),
                        Product(f"dW[{t}]", w, m_r, n_c, dtype)]
            return [Product(f"y[{t}]", m_r, w, n_c, dtype),
                    Pointwise(f"add[{t}]", 3 * m_r * n_c * item, dtype)]

        def bcasts(t: int) -> list[Optional[Collective]]:
            w = segments[t][1] - segments[t][0]
            return [BroadcastPiece.step(f"bcast_x[{t}]", (m_r, w), dtype, "row", pc),
                    BroadcastPiece.step(f"bcast_w[{t}]", (w, n_c), dtype, "col", pr)]

        def reduces(t: int) -> list[Optional[Collective]]:
            w = segments[t][1] - segments[t][0]
            return [ReduceToOwner.step(f"reduce_dx_piece[{t}]", (m_r, w), dtype, "row", pc),
                    ReduceToOwner.step(f"reduce_dw_piece[{t}]", (w, n_c), dtype, "col", pr)]

        if segments:
            out += overlapped(bcasts(0), [], False)
        for t in range(len(segments)):
            steps = overlapped(bcasts(t + 1) if t + 1 < len(segments) else [], work(t),
                               not staged)
            if backward and t > 0:  # the previous segment's reductions, waited after these
                steps = overlapped(reduces(t - 1), steps, not staged)
            out += steps
        if backward and segments:
            out += overlapped(reduces(len(segments) - 1), [], False)
        return out
