"""tpmpi.core.tiling: panel and chunk sizes rounded to the GEMM tile (nearest multiple, never
beyond the dimension), the tile of each device kind, and the workspace of a panel loop."""
import pytest
from hypothesis import given, strategies as st

from tpmpi.core.tiling import TILE, multiple_for, panel_workspace_bytes, round_size


@given(st.integers(1, 5000), st.integers(0, 5000), st.sampled_from([64, 128]))
def test_round_size(requested, total, multiple):
    size = round_size(requested, total, multiple)
    if size == total:  # one panel covers the dimension
        assert requested + multiple // 2 >= total or total <= multiple
    else:
        assert 0 < size < total and size % multiple == 0
        assert abs(size - requested) <= multiple // 2 or size == multiple


def test_round_size_and_workspace():
    assert round_size(1000, 4096) == 1024 and round_size(100, 4096) == 128
    assert round_size(5000, 4096) == 4096 and round_size(64, 50) == 50
    assert panel_workspace_bytes(1024, 2048, 256, 2) == 2 * (1024 + 2048) * 256 * 2
    with pytest.raises(ValueError, match="requested=0"):
        round_size(0, 10)

def test_tile_of_each_device_kind_and_bad_arguments():
    assert multiple_for(True) == TILE["gpu"] == 128 and multiple_for(False) == TILE["cpu"] == 64
    assert round_size(100, 4096, multiple_for(False)) == 128  # 1.56 tiles of 64 -> 2
    assert round_size(90, 4096, 64) == 64 and round_size(5, 0) == 0
    assert panel_workspace_bytes(10, 20, 4, 8, buffers=1) == (10 + 20) * 4 * 8
    with pytest.raises(ValueError, match="total=-1: expected an integer >= 0"):
        round_size(64, -1)
    with pytest.raises(ValueError, match="multiple=0: expected a positive integer"):
        round_size(64, 100, 0)
    with pytest.raises(ValueError, match=r"requested=2\.5: expected a positive integer"):
        round_size(2.5, 100)
