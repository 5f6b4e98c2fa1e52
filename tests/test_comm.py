"""Chunked collectives: with a tiny TPMPI_MAX_MESSAGE_BYTES every gather and reduction is split
into many MPI calls, and the results are bit-identical to the unsplit ones."""
import os

import numpy as np
import pytest

import tpmpi
from tpmpi import comm as tcomm
from tpmpi.grid import factorisations
from tpmpi.layout import LAYOUTS


def test_chunks_cover_range_within_limit():
    assert tcomm.chunks(10, 8, limit=24) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert tcomm.chunks(0, 8, limit=24) == [slice(0, 0)]
    assert tcomm.chunks(3, 100, limit=24) == [slice(0, 1), slice(1, 2), slice(2, 3)]


def test_limit_from_environment(monkeypatch):
    monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", "64")
    assert tcomm.max_message_bytes() == 64
    monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", "0")
    with pytest.raises(ValueError, match="expected a positive integer"):
        tcomm.max_message_bytes()


def test_row_pieces_split_blocks():
    out = np.empty((5, 4))
    blocks = [((0, 0), (5, 2)), ((0, 2), (5, 2))]
    local = np.zeros((5, 2))
    pieces = [(lo.shape, o.shape, b) for lo, o, b in _pieces(local, out, blocks, 2 * 4 * 8)]
    assert pieces == [((2, 2), (2, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2))]),
                      ((2, 2), (2, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2))]),
                      ((1, 2), (1, 4), [((0, 0), (1, 2)), ((0, 2), (1, 2))])]


def _pieces(local, out, blocks, limit, rank=0):
    old, tcomm.MAX_MESSAGE_BYTES = tcomm.MAX_MESSAGE_BYTES, limit
    try:
        return tcomm._row_pieces(local, out, blocks, rank)
    finally:
        tcomm.MAX_MESSAGE_BYTES = old


@pytest.mark.mpi
@pytest.mark.parametrize("limit", [8, 24, 200])
def test_chunked_collectives_identical(world, monkeypatch, limit):
    if not world.member:
        return
    monkeypatch.setattr(tcomm, "MAX_MESSAGE_BYTES", limit)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 5))
    for shape in factorisations(world.size):
        with tpmpi.ProcessGrid(world.comm, shape=shape) as grid:
            for layout in LAYOUTS:
                assert np.array_equal(tpmpi.gather(tpmpi.scatter(A, grid, layout), grid, layout,
                                                   A.shape), A)
    a = rng.standard_normal((6, 5)) * (world.comm.Get_rank() + 1)
    want = world.comm.allreduce(a)
    b = a.copy()
    assert np.array_equal(tcomm.allreduce(b, world.comm), want)
    c = a.copy()
    if world.size > 1:
        req = tcomm.iallreduce(c, world.comm)
        req.Wait()
        assert np.array_equal(c, want)
    X, W, bias, dY = (rng.standard_normal(s) for s in [(5, 4), (4, 9), (9,), (5, 9)])
    with tpmpi.ProcessGrid(world.comm) as grid:
        layer = tpmpi.ColumnParallelLinear.from_dense(W, bias, grid=grid)
        y, dx = layer(X), layer.backward(dY)
        monkeypatch.setattr(tcomm, "MAX_MESSAGE_BYTES", 2**30)
        assert np.array_equal(layer(X), y) and np.array_equal(layer.backward(dY), dx)


@pytest.mark.mpi
def test_iallgather_chunked(world, monkeypatch):
    if not world.member:
        return
    monkeypatch.setattr(tcomm, "MAX_MESSAGE_BYTES", 16)
    comm, p = world.comm, world.size
    parts = tpmpi.block_partition(6, p)
    A = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    lo, hi = parts[comm.Get_rank()]
    out = np.empty_like(A)
    req = tcomm.iallgather_blocks(np.ascontiguousarray(A[:, lo:hi]), out,
                                  [((0, a), (5, b - a)) for a, b in parts], comm)
    assert isinstance(req, tcomm.Requests) or p == 1
    req.Wait()
    assert np.array_equal(out, A)


@pytest.mark.mpi
def test_limit_must_agree(world, monkeypatch):
    if not world.member or world.size == 1:
        return
    from conftest import all_ranks_raise

    rank = world.comm.Get_rank()
    with tpmpi.ProcessGrid(world.comm) as grid:
        layer = tpmpi.ColumnParallelLinear(3, 4, grid=grid)
        monkeypatch.setattr(tcomm, "MAX_MESSAGE_BYTES", 64 + rank)
        all_ranks_raise(world.comm, lambda: layer(np.zeros((2, 3), np.float32)),
                        "TPMPI_MAX_MESSAGE_BYTES differs across ranks")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TPMPI_LARGE_TESTS"),
                    reason="set TPMPI_LARGE_TESTS=1 (2 ranks, ~7 GB of memory)")
@pytest.mark.parametrize("limit", [None, 2**62], ids=["chunked", "unchunked"])
def test_messages_beyond_2_31_elements_and_bytes(monkeypatch, limit):
    """A gather and an allreduce of 2**31 + 1024 uint8 elements on 2 ranks."""
    from mpi4py import MPI

    if limit:
        monkeypatch.setattr(tcomm, "MAX_MESSAGE_BYTES", limit)
    world = MPI.COMM_WORLD
    comm = world.Split(0 if world.Get_rank() < 2 else MPI.UNDEFINED, world.Get_rank())
    if comm == MPI.COMM_NULL:
        return
    rank, rows, cols = comm.Get_rank(), 2**21 + 1, 1024
    out = np.zeros((rows, cols), dtype=np.uint8)
    local = np.full((rows, cols // 2), rank + 1, dtype=np.uint8)
    tcomm.allgather_blocks(local, out, [((0, 0), local.shape), ((0, cols // 2), local.shape)],
                           comm)
    del local
    assert (out[:, : cols // 2] == 1).all() and (out[:, cols // 2:] == 2).all()
    flat = out.reshape(-1)
    flat[...] = rank + 1
    tcomm.allreduce(flat, comm)
    assert (flat == 3).all()
    comm.Free()


@pytest.mark.mpi
def test_reductions_refuse_strided_buffers(world):
    """Regression: the chunked reductions reshape to 1D; a strided view must not be copied."""
    if not world.member or world.size == 1:
        return
    a = np.ones((4, 6))[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        tcomm.allreduce(a, world.comm)
    with pytest.raises(ValueError, match="C-contiguous"):
        tcomm.iallreduce(a, world.comm)
