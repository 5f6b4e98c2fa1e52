import pytest
from hypothesis import given, strategies as st

from tpmpi.core.partition import block_partition, block_range, block_sizes, displacements, \
    largest_block


@given(st.integers(0, 10_000), st.integers(1, 300))
def test_blocks_tile_range_in_order(n, p):
    parts = block_partition(n, p)
    assert len(parts) == p
    assert parts[0][0] == 0 and parts[-1][1] == n
    for (a, b), (c, _) in zip(parts, parts[1:]):
        assert b == c and a <= b
    sizes = block_sizes(n, p)
    assert max(sizes) - min(sizes) <= 1
    assert largest_block(n, p) == max(sizes) == sizes[0]
    assert displacements(sizes) == [a for a, _ in parts]
    assert sizes == sorted(sizes, reverse=True)  # the larger blocks come first
    for i in range(p):
        assert block_range(n, p, i) == parts[i]


def test_design_formula_and_empty_parts():
    assert block_sizes(10, 4) == [3, 3, 2, 2]
    assert block_partition(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert block_partition(0, 3) == [(0, 0)] * 3


@pytest.mark.parametrize("n,p,i,match", [(-1, 2, 0, "n=-1"), (4, 0, 0, "parts=0"),
                                         (4, 2, 2, "index=2"), (2.5, 2, 0, "n=2.5")])
def test_bad_arguments_name_themselves(n, p, i, match):
    with pytest.raises(ValueError, match=match):
        block_range(n, p, i)


def test_displacements_of_any_counts():
    assert displacements([3, 0, 2, 5]) == [0, 3, 3, 5]
    assert displacements([]) == [] and displacements((4,)) == [0]
    with pytest.raises(ValueError, match="parts=0"):
        largest_block(5, 0)
