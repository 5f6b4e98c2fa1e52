import numpy as np
import pytest

from tpmpi.layout import LAYOUTS, block_bounds
from tpmpi.grid import factorisations


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
