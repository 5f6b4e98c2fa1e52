"""tpmpi.core.layout: the blocks of each layout on every grid, scatter/gather round trips at world
sizes 1-4, and the layouts layers declare."""
from functools import partial

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise
from tpmpi.core.layout import LAYOUTS, PARTIAL, Layouts, LinearLayouts, block_bounds, blocks
from tpmpi.core.grid import factorisations


@pytest.mark.parametrize("shape", [(7, 5), (0, 3), (3, 0), (1, 1), (2, 9)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_cover_global_array_once(shape, size, layout):
    for grid in factorisations(size):
        hits = np.zeros(shape, dtype=int)
        for r in range(grid[0]):
            for c in range(grid[1]):
                (a, b), (d, e) = block_bounds(shape, grid, (r, c), layout)
                hits[a:b, d:e] += 1
        want = size if layout == "replicated" else 1
        assert (hits == want).all(), (grid, layout)


def test_tiles_block_of_rank_rc():
    assert block_bounds((10, 8), (2, 3), (1, 2), "tiles") == ((5, 10), (6, 8))
    assert block_bounds((10, 8), (2, 3), (1, 2), "cols") == ((0, 10), (7, 8))
    assert block_bounds((10, 8), (2, 3), (0, 1), "rows") == ((2, 4), (0, 8))
    assert block_bounds((8,), (2, 3), (1, 2), "tiles") == ((6, 8),)


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout='diag'"):
        block_bounds((2, 2), (1, 1), (0, 0), "diag")


def test_blocks_list_every_rank_in_grid_order():
    for shape in [(7, 5), (3,), (0, 4)]:
        for grid in [(1, 4), (2, 3), (3, 1)]:
            for layout in LAYOUTS:
                got = blocks(shape, grid, layout)
                assert len(got) == grid[0] * grid[1]
                for rank, (starts, size) in enumerate(got):
                    bounds = block_bounds(shape, grid, divmod(rank, grid[1]), layout)
                    assert starts == tuple(a for a, _ in bounds)
                    assert size == tuple(b - a for a, b in bounds)
    assert blocks((2, 5), (1, 2), "cols") == [((0, 0), (2, 3)), ((0, 3), (2, 2))]


@pytest.mark.mpi
def test_scatter_gather_roundtrip_all_layouts(world, grids):
    A = np.arange(7 * 5, dtype=np.float64).reshape(7, 5)
    v = np.arange(5, dtype=np.float32)
    for grid in grids():
        for layout in LAYOUTS:
            local = tpmpi.scatter(A, grid, layout)
            assert local.flags.c_contiguous
            assert np.array_equal(tpmpi.gather(local, grid, layout, A.shape), A)
            if layout != "rows":
                assert np.array_equal(tpmpi.gather(tpmpi.scatter(v, grid, layout), grid, layout,
                                                   v.shape), v)
        all_ranks_raise(world.comm, partial(tpmpi.gather, A, grid, "cols",
                                            (7, 5 * world.size + 1)), "a_local.shape=")


def test_partial_sizes_like_replicated_but_is_no_storage_layout():
    assert block_bounds((4, 3), (2, 2), (1, 1), PARTIAL) == ((0, 4), (0, 3))
    from mpi4py import MPI

    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid, \
            pytest.raises(ValueError, match="layout='partial': expected one of replicated"):
        tpmpi.scatter(np.zeros((2, 2)), grid, PARTIAL)


@pytest.mark.parametrize("cls,options,want", [
    ("ColumnParallelLinear", {}, ("replicated", "replicated", "cols", "cols", "replicated",
                                  "cols")),
    ("ColumnParallelLinear", {"gather_output": False}, ("replicated", "cols", "cols", "cols",
                                                        "replicated", "cols")),
    ("ColumnParallelLinear", {"gather_output": False, "sequence_parallel": True},
     ("rows", "cols", "cols", "cols", "replicated", "cols")),
    ("RowParallelLinear", {}, ("replicated", "replicated", "rows", "replicated", "cols",
                               PARTIAL)),
    ("RowParallelLinear", {"input_is_parallel": True, "sequence_parallel": True},
     ("cols", "rows", "rows", "replicated", "cols", PARTIAL)),
    ("TileParallelLinear", {"panel": 4}, ("tiles",) * 6)])
def test_layers_declare_their_layouts(cls, options, want):
    """(x, y, weight, bias, x_local, y_local), from the flags in one place (layouts_for) and on
    the layer built with them."""
    from mpi4py import MPI

    klass = getattr(tpmpi, cls)
    assert klass.layouts_for(**options) == LinearLayouts(*want)
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        layer = klass(4, 6, grid=grid, **options)
        assert layer.layouts == LinearLayouts(*want)
        assert {name: layout for name, (_, layout) in layer.parameter_layouts().items()} == \
            {"weight": want[2], "bias": want[3]}


@pytest.mark.parametrize("mode,io", [("megatron", "replicated"), ("book", "replicated"),
                                     ("sequence", "rows"), ("tile2d", "tiles")])
def test_mlp_layouts_are_its_childrens(mode, io):
    """x is fc1's input layout, y fc2's output layout."""
    assert tpmpi.ParallelMLP.layouts_for(mode) == Layouts(io, io)
    (c1, o1), (c2, o2) = tpmpi.ParallelMLP.sublayers(mode)
    assert c1.layouts_for(**o1).y == c2.layouts_for(**o2).x  # fc1's output is fc2's input
