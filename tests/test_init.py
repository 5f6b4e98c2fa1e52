import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tpmpi import init_weight
from tpmpi.core.partition import block_partition


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.data())
def test_any_block_equals_slice_of_whole(rows, cols, data):
    whole = init_weight((rows, cols), seed=11, dtype="float64")
    r0 = data.draw(st.integers(0, rows))
    r1 = data.draw(st.integers(r0, rows))
    c0 = data.draw(st.integers(0, cols))
    c1 = data.draw(st.integers(c0, cols))
    block = init_weight((rows, cols), 11, "float64", rows=slice(r0, r1), cols=slice(c0, c1))
    assert block.shape == (r1 - r0, c1 - c0)
    assert np.array_equal(block, whole[r0:r1, c0:c1])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_grid_blocks_reassemble_bitwise(dtype):
    shape = (13, 10)
    whole = init_weight(shape, 5, dtype)
    assert whole.dtype == np.dtype(dtype)
    out = np.empty_like(whole)
    for r0, r1 in block_partition(13, 3):
        for c0, c1 in block_partition(10, 4):
            out[r0:r1, c0:c1] = init_weight(shape, 5, dtype, rows=slice(r0, r1), cols=slice(c0, c1))
    assert np.array_equal(out.view(np.uint8), whole.view(np.uint8))


def test_values_deterministic_bounded_and_seed_dependent():
    a = init_weight((64, 32), 1, "float64")
    assert np.array_equal(a, init_weight((64, 32), 1, "float64"))
    assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.9 / 8
    assert abs(a.mean()) < 0.01 and 0.95 * 1 / 8 / np.sqrt(3) < a.std() < 1.05 / 8 / np.sqrt(3)
    assert not np.array_equal(a, init_weight((64, 32), 2, "float64"))
    assert not np.array_equal(init_weight((32,), 1, "float64"),
                              init_weight((32,), 1, "float64", stream=1))
    v = init_weight((40,), 3, "float64", cols=slice(7, 19))
    assert np.array_equal(v, init_weight((40,), 3, "float64")[7:19])


def test_float32_is_rounded_float64():
    assert np.array_equal(init_weight((9, 9), 4, "float32"),
                          init_weight((9, 9), 4, "float64").astype(np.float32))


@pytest.mark.parametrize("kwargs,match", [({"shape": (2, 2, 2)}, "shape="),
                                          ({"dtype": "int32"}, "dtype='int32'"),
                                          ({"rows": slice(0, 4, 2)}, "rows="),
                                          ({"seed": -1}, "seed=-1")])
def test_bad_arguments(kwargs, match):
    args = {"shape": (4, 4), "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        init_weight(**args)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.integers(1, 7), st.data())
def test_block_runs_cover_the_block_in_order(shape, chunk, data):
    """The runs of block_runs, laid end to end, are the block's flat indices in C order."""
    from tpmpi.core.init import block_runs

    block = []
    for n in shape:
        a = data.draw(st.integers(0, n))
        block.append((a, data.draw(st.integers(a, n))))
    index = np.arange(int(np.prod(shape))).reshape(shape)
    want = index[tuple(slice(a, b) for a, b in block)].reshape(-1)
    got, offset = [], 0
    for off, first, count in block_runs(shape, block, chunk):
        assert off == offset and 0 < count <= chunk
        got.extend(range(first, first + count))
        offset += count
    assert got == list(want)


def test_draws_skip_to_any_index_of_any_counter_range():
    from tpmpi.core.init import philox_draws

    key = np.array([3, 4], dtype=np.uint64)
    base = 5 << 128
    run = philox_draws(key, 0, 23, base)
    assert all(np.array_equal(philox_draws(key, a, 23 - a, base), run[a:]) for a in range(23))
    assert not np.array_equal(run, philox_draws(key, 0, 23))
