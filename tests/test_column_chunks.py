"""ColumnParallelLinear(chunks=c): pipelined gather, bitwise equal to chunks=1; overlap formula."""
import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise
from tpmpi.layers.column import CHUNK_ROWS, chunk_bounds
from tpmpi.studies.overlap import OverlapTimes, overlap_percent


def test_chunk_bounds_tile_rows_at_granule_boundaries():
    assert chunk_bounds(0, 3) == [(0, 0)]
    assert chunk_bounds(CHUNK_ROWS - 1, 4) == [(0, CHUNK_ROWS - 1)]
    assert chunk_bounds(2 * CHUNK_ROWS + 5, 1) == [(0, 2 * CHUNK_ROWS + 5)]
    assert chunk_bounds(2 * CHUNK_ROWS + 5, 2) == [(0, CHUNK_ROWS), (CHUNK_ROWS, 2 * CHUNK_ROWS + 5)]
    for m in (1, 47, 48, 95, 96, 200, 1000):
        for c in (1, 2, 3, 7, 10**6):
            rows = chunk_bounds(m, c)
            assert rows[0][0] == 0 and rows[-1][1] == m and len(rows) <= c
            assert all(a < b for a, b in rows) and all(b == a2 for (_, b), (a2, _) in
                                                       zip(rows, rows[1:]))
            assert all(b % CHUNK_ROWS == 0 for _, b in rows[:-1])


@pytest.mark.parametrize("overall,compute,comm,expected", [
    (1.0, 1.0, 0.5, 100.0),   # communication fully hidden
    (1.5, 1.0, 0.5, 0.0),     # fully exposed
    (1.25, 1.0, 0.5, 50.0),   # half hidden
    (2.0, 1.0, 0.5, 0.0),     # slower than serial: clamped at 0
    (0.9, 1.0, 0.5, 100.0),   # timing noise: clamped at 100
    (1.0, 1.0, 0.0, 0.0),     # nothing to overlap
])
def test_overlap_percent_osu_formula(overall, compute, comm, expected):
    assert overlap_percent(overall, compute, comm) == pytest.approx(expected)
    assert OverlapTimes(overall, compute, comm).overlap_pct == pytest.approx(expected)


def test_profiler_only_switches_phases():
    from tpmpi.core.profiler import Profiler

    prof = Profiler()
    assert prof.runs("gemm") and prof.runs("comm")
    with prof.only("comm"):
        assert prof.runs("comm") and not prof.runs("gemm")
    assert prof.runs("gemm")
    with pytest.raises(ValueError, match="phase='x'"):
        with prof.only("x"):
            pass


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", [(150, 7, 9), (101, 16, 5), (0, 4, 6), (30, 5, 3),
                                   (2 * CHUNK_ROWS, 3, 1)])
@pytest.mark.parametrize("chunks", [2, 3, 10**4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunked_equals_unchunked_bitwise(world, m, k, n, chunks, dtype):
    if not world.member:
        return
    rng = np.random.default_rng(m + k + n)
    X, W, b, dY = (rng.standard_normal(s).astype(dtype) for s in [(m, k), (k, n), (n,), (m, n)])
    grid = tpmpi.ProcessGrid(world.comm)
    plain = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    chunked = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, chunks=chunks)
    for _ in range(2):  # reused local buffer
        y = chunked(X)
        assert y.flags.c_contiguous and np.array_equal(y, plain(X))
    assert np.array_equal(chunked.backward(dY), plain.backward(dY))
    assert np.array_equal(chunked.grad_weight, plain.grad_weight)
    if world.size > 1 and m > 0:  # one gather per chunk, the same bytes in all
        assert chunked.profiler.calls["allgather"] == 2 * len(chunk_bounds(m, chunks))
        assert chunked.profiler.bytes == plain.profiler.bytes
    grid.free()


@pytest.mark.mpi
def test_chunks_validated_on_every_rank(world):
    if not world.member:
        return
    comm, rank = world.comm, world.comm.Get_rank()
    grid = tpmpi.ProcessGrid(comm)
    for bad in (0, -1, 2.0, True, None):
        all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(4, 5, grid=grid, chunks=bad),
                        rf"chunks={bad!r}: expected a positive integer")
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(4, 5, grid=grid, chunks=1 + rank),
                        "chunks differs across ranks")
    grid.free()


@pytest.mark.mpi
def test_measure_overlap_on_chunked_layer(world):
    if not world.member:
        return
    from tpmpi.studies.overlap import measure_overlap

    grid = tpmpi.ProcessGrid(world.comm)
    layer = tpmpi.ColumnParallelLinear(8, 6, grid=grid, chunks=3, dtype="float64")
    x = np.ones((3 * CHUNK_ROWS, 8))
    ref = layer(x)
    times = measure_overlap(layer, lambda: layer(x), warmup=0, iters=2)
    assert 0 <= times.overlap_pct <= 100 and times.overall_s >= 0
    assert np.array_equal(layer(x), ref)
    grid.free()
