"""tpmpi.core.summa: a packed panel's K blocks (what the backward writes its products into), the
tile layer's operators held by name on its grid's row and column communicators, each with its
adjoint. The SUMMA pairs' values and dot-product tests are with the 1D ones in
tests/test_mappings.py."""
import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from tpmpi.core.mappings import AllReduce, GatherRows, ReduceScatterRows
from tpmpi.core.summa import BroadcastPiece, GatherPanel, ReduceScatterPanel, ReduceToOwner


def test_a_packed_panel_holds_each_k_block_contiguously():
    """(rows, K) = (3, 7) over 3 ranks: K blocks 3, 2, 2, stored one after another, each a
    C-contiguous (3, k_j) view of the one buffer; the counts of the reduce-scatter follow."""
    op = ReduceScatterPanel(MPI.COMM_SELF)
    op.size = 3  # the layout of a 3-rank group (nothing communicated here)
    packed, views = op.pack((3, 7), np, np.float64)
    assert packed.shape == (21,) and [v.shape for v in views] == [(3, 3), (3, 2), (3, 2)]
    assert all(v.flags.c_contiguous and np.shares_memory(v, packed) for v in views)
    for j, v in enumerate(views):
        v[...] = j
    assert packed.tolist() == [0] * 9 + [1] * 6 + [2] * 6
    assert op.counts(packed, (3, 7)) == [9, 6, 6]


def test_one_rank_reduce_scatter_is_the_packed_panel_itself():
    op = ReduceScatterPanel(MPI.COMM_SELF)
    packed, (view,) = op.pack((2, 4), np, np.float32)
    view[...] = np.arange(8).reshape(2, 4)
    out = op(packed, (2, 4))
    assert np.shares_memory(out, packed) and out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.mpi
@pytest.mark.world_sizes(4)
def test_the_tile_layer_holds_its_operators_by_name(world):
    with tpmpi.ProcessGrid(world.comm, shape=(2, 2)) as grid:
        layer = tpmpi.TileParallelLinear(6, 5, grid=grid)
        ops = layer.operators()
        assert {name: type(op) for name, op in ops.items()} == {
            "gather_x": GatherPanel, "gather_w": GatherRows, "reduce_dx": ReduceScatterPanel,
            "reduce_dw": ReduceScatterRows, "bcast_x": BroadcastPiece,
            "bcast_w": BroadcastPiece, "reduce_dx_piece": ReduceToOwner,
            "reduce_dw_piece": ReduceToOwner, "allreduce_db": AllReduce}
        for fwd, adj in (("gather_x", "reduce_dx"), ("gather_w", "reduce_dw"),
                         ("bcast_x", "reduce_dx_piece"), ("bcast_w", "reduce_dw_piece")):
            assert ops[adj] is ops[fwd].adjoint
        row, col = grid.row_comm, grid.col_comm
        on = {name: op.comm for name, op in ops.items()}
        assert on["gather_x"] is row and on["bcast_x"] is row and on["gather_w"] is col
        assert on["bcast_w"] is col and on["allreduce_db"] is col
