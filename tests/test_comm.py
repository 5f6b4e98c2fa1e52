"""tpmpi.core.comm: the message-size limit (agreed, and true for every MPI call a layer makes),
chunked collectives bit-identical to unsplit ones, float16/bfloat16 reductions summed in float32
and rounded once, and the Open MPI 4.1 ``Ialltoallw`` workaround (datatypes and gather plans:
test_datatypes.py)."""
import os

import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from conftest import all_ranks_raise, message_bytes, record_mpi_calls, rel_err, stop_recording
from problems import HALFS, float32_sum
from tpmpi.core import agreement
from tpmpi.core import comm as tcomm
from tpmpi.core.dtypes import tolerance
from tpmpi.core.grid import factorisations
from tpmpi.core.layout import LAYOUTS
from tpmpi.core.partition import block_sizes

DTYPES = ["float64", "float32", *HALFS]


def test_chunks_cover_range_within_limit():
    assert tcomm.chunks(10, 8, limit=24) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert tcomm.chunks(0, 8, limit=24) == [slice(0, 0)]
    assert tcomm.chunks(3, 100, limit=24) == [slice(0, 1), slice(1, 2), slice(2, 3)]


# --------------------------------------------------------------------------- chunked collectives


def _every_collective(comm, A, dtype):
    """Results of every tpmpi collective on ``A`` (one rank's contribution), on host buffers."""
    rank, size = comm.Get_rank(), comm.Get_size()
    out = {}
    a = A.copy()
    out["allreduce"] = tcomm.allreduce(a, comm).copy()
    a = A.copy()
    tcomm.iallreduce(a, comm).Wait()
    out["iallreduce"] = a
    counts = block_sizes(A.size, size)[::-1]  # uneven, zero-size at the end
    rs = np.zeros(counts[rank], dtype=dtype)
    out["reduce_scatter"] = tcomm.reduce_scatter(A, rs, counts, comm)
    root = size - 1
    red = np.zeros_like(A) if rank == root else None
    tcomm.ireduce(A, red, root, comm).Wait()
    out["reduce"] = red
    b = A.copy() if rank == 0 else np.zeros_like(A)
    tcomm.ibcast(b, 0, comm).Wait()
    out["bcast"] = b
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit", [16, 24, 200])
def test_chunked_collectives_identical(world, grid, grids, monkeypatch, limit, dtype):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 5)).astype(dtype)
    C = (rng.standard_normal((6, 5)) * (world.comm.Get_rank() + 1)).astype(dtype)
    whole = _every_collective(world.comm, C, dtype)
    monkeypatch.setattr(agreement, "MAX_MESSAGE_BYTES", limit)
    for g in grids():
        for layout in LAYOUTS:
            got = tpmpi.gather(tpmpi.scatter(A, g, layout), g, layout, A.shape)
            assert np.array_equal(got.view(np.uint8), A.view(np.uint8))
    split = _every_collective(world.comm, C, dtype)
    for name, want in whole.items():
        if want is None:
            assert split[name] is None
        elif dtype in ("float16", "bfloat16") or name == "bcast":  # tpmpi's own sums
            assert np.array_equal(split[name].view(np.uint8), want.view(np.uint8)), name
        else:  # MPI's reduction: its summation order may depend on the message size
            assert rel_err(split[name], want) <= tolerance(dtype, world.size), name
    X, W, bias, dY = (rng.standard_normal(s).astype(dtype) for s in [(5, 4), (4, 9), (9,), (5, 9)])
    layer = tpmpi.ColumnParallelLinear.from_dense(W, bias, grid=grid)
    y, dx = layer(X), layer.backward(dY)
    monkeypatch.setattr(agreement, "MAX_MESSAGE_BYTES", 2**30)
    assert np.array_equal(layer(X), y) and np.array_equal(layer.backward(dY), dx)


@pytest.mark.mpi
def test_iallgather_chunked(world, monkeypatch):
    monkeypatch.setattr(agreement, "MAX_MESSAGE_BYTES", 16 * world.size)
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


# --------------------------------------------------------------------------- half precision


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", HALFS)
def test_half_sums_are_float32_sums_rounded_once(world, dtype):
    """Rank 0 holds 1, the others 2**-9 (bfloat16) / 2**-12 (float16): a sum rounded at every
    step stays at 1; the float32 sum rounded once moves to the next representable value."""
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    tiny = 2.0**-9 if dtype == "bfloat16" else 2.0**-12
    rng = np.random.default_rng(7)
    noise = [rng.standard_normal(13).astype(dtype) for _ in range(size)]
    contributions = [np.concatenate([np.full(3, 1.0 if q == 0 else tiny), noise[q]]).astype(dtype)
                     for q in range(size)]
    want = float32_sum(contributions, dtype)
    if size == 4:
        assert want[0] > 1.0  # the case that tells the two roundings apart
    mine = contributions[rank]
    for name, got in _every_collective(comm, mine, dtype).items():
        if name == "bcast":
            assert np.array_equal(got.view(np.uint16), contributions[0].view(np.uint16))
        elif name == "reduce":
            if rank == size - 1:
                assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        elif name == "reduce_scatter":
            counts = block_sizes(mine.size, size)[::-1]
            start = sum(counts[:rank])
            assert np.array_equal(got.view(np.uint16),
                                  want[start:start + counts[rank]].view(np.uint16))
        else:
            assert got.dtype == np.dtype(dtype)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), name
            every = comm.allgather(got.view(np.uint16).tobytes())
            assert len(set(every)) == 1  # bitwise identical on every rank


# --------------------------------------------------------------------------- the message limit


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_limit_must_agree(world, grid, monkeypatch):
    layer = tpmpi.ColumnParallelLinear(3, 4, grid=grid)
    monkeypatch.setattr(agreement, "MAX_MESSAGE_BYTES", 64 + world.comm.Get_rank())
    all_ranks_raise(world.comm, lambda: layer(np.zeros((2, 3), np.float32)),
                    "TPMPI_MAX_MESSAGE_BYTES differs across ranks")


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["column", "row", "tile2d"])
@pytest.mark.world_sizes(2, 3, 4)
def test_bad_limit_on_one_rank_raises_everywhere(world, monkeypatch, scheme):
    """A value that does not parse on the last rank only: the same error on every rank, no
    hang (for tile2d too, which never agreed the limit before)."""
    rank, size = world.comm.Get_rank(), world.size
    with tpmpi.ProcessGrid(world.comm, shape=factorisations(size)[-1]) as grid:
        cls = {"column": tpmpi.ColumnParallelLinear, "row": tpmpi.RowParallelLinear,
               "tile2d": tpmpi.TileParallelLinear}[scheme]
        layer = cls(4, 6, grid=grid)
        x = tpmpi.scatter(np.ones((3, 4), np.float32), grid,
                          "tiles" if scheme == "tile2d" else "replicated")
        if rank == size - 1:
            monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", "abc")
        msg = all_ranks_raise(world.comm, lambda: layer(x),
                              r"TPMPI_MAX_MESSAGE_BYTES='abc': expected a positive integer")
        assert f"rank {size - 1}" in msg
        monkeypatch.delenv("TPMPI_MAX_MESSAGE_BYTES", raising=False)
        if rank == 0:
            monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", "512")
        all_ranks_raise(world.comm, lambda: layer(x), "TPMPI_MAX_MESSAGE_BYTES differs")


def _layers(scheme, grid, dtype):
    if scheme == "column":
        return tpmpi.ColumnParallelLinear(7, 6, grid=grid, dtype=dtype), "replicated", 6
    if scheme == "row":
        return tpmpi.RowParallelLinear(7, 6, grid=grid, dtype=dtype), "replicated", 6
    if scheme.startswith("mlp"):
        mode = scheme.split("-")[1]
        return tpmpi.ParallelMLP(7, 5, grid=grid, mode=mode, dtype=dtype), "replicated", 7
    panel = 2 if scheme == "tile2d-panel" else None
    return tpmpi.TileParallelLinear(7, 6, grid=grid, panel=panel, dtype=dtype), "tiles", 6


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", *HALFS])
@pytest.mark.parametrize("scheme", ["column", "row", "mlp-megatron", "mlp-book", "tile2d",
                                    "tile2d-panel"])
def test_no_mpi_call_exceeds_the_limit(world, grids, monkeypatch, scheme, dtype):
    """Every MPI call of forward and backward, on every grid, sends and receives at most
    TPMPI_MAX_MESSAGE_BYTES (256 here), agreement's control Allreduce (op MAX) aside."""
    limit = 256
    monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", str(limit))
    traffic = 0
    for grid in grids(None if scheme.startswith("tile2d") else [(1, world.size)]):
        layer, layout, n_out = _layers(scheme, grid, dtype)
        rng = np.random.default_rng(3)
        X = rng.standard_normal((24, 7)).astype(dtype)
        dY = rng.standard_normal((24, n_out)).astype(dtype)
        log = []
        record_mpi_calls(layer, log)
        y = layer(tpmpi.scatter(X, grid, layout))
        layer.backward(tpmpi.scatter(dY, grid, layout))
        data = [(name, message_bytes(name, args, kwargs)) for name, args, kwargs in log
                if kwargs.get("op") not in (MPI.MAX, MPI.MIN)]
        data = [(name, b) for name, b in data if b is not None]
        over = [(name, b) for name, b in data if max(b) > limit]
        assert not over, over[:5]
        traffic += sum(max(b) for _, b in data)
        assert y is not None
        stop_recording(grid)
    if world.size > 1:  # the recorder saw real traffic, more than a few calls could carry
        assert traffic > 2 * limit, traffic


# --------------------------------------------------------------------------- Open MPI 4.1


@pytest.mark.mpi
def test_iallgather_on_a_cartesian_grid(grid):
    """The non-blocking gather on a 1xP Cartesian communicator, whose 4 neighbours exceed
    P < 4 (Open MPI 4.1 segfaults in ompi_coll_base_retain_datatypes_w on such a call)."""
    comm = grid.comm
    parts = tpmpi.block_partition(5, grid.size)
    lo, hi = parts[grid.rank]
    A = np.arange(24.0).reshape(4, 6)[:, :5].copy()
    for _ in range(2):
        out = np.zeros_like(A)
        tcomm.iallgather_blocks(np.ascontiguousarray(A[:, lo:hi]), out,
                                [((0, a), (4, b - a)) for a, b in parts], comm).Wait()
        assert np.array_equal(out, A)
    if grid.size > 1:
        plain = tcomm._split_without_topology(comm)
        assert plain is tcomm._split_without_topology(comm)  # made once, kept on the comm
        assert plain.Get_topology() == MPI.UNDEFINED and plain.Get_size() == grid.size


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TPMPI_LARGE_TESTS"),
                    reason="set TPMPI_LARGE_TESTS=1 (2 ranks, ~7 GB of memory)")
@pytest.mark.parametrize("limit", [None, 2**62], ids=["chunked", "unchunked"])
def test_messages_beyond_2_31_elements_and_bytes(monkeypatch, limit):
    """A gather and an allreduce of 2**31 + 1024 uint8 elements on 2 ranks."""
    if limit:
        monkeypatch.setattr(agreement, "MAX_MESSAGE_BYTES", limit)
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
@pytest.mark.world_sizes(2, 3, 4)
def test_reductions_refuse_strided_buffers(world):
    """The chunked reductions reshape to 1D: a strided view, which would be copied (and the
    in-place result lost), is refused."""
    for dtype in ("float64", "float16"):
        a = np.ones((4, 6), dtype)[:, ::2]
        with pytest.raises(ValueError, match="C-contiguous"):
            tcomm.allreduce(a, world.comm)
        with pytest.raises(ValueError, match="C-contiguous"):
            tcomm.iallreduce(a, world.comm)


@pytest.mark.mpi
def test_first_ranks_frees_its_communicator_after_an_error(world):
    """The communicator of the first P ranks (a sweep's or a calibration's rank count) is freed
    even when the block raises (a failing sweep must not leak one communicator per P)."""
    from mpi4py import MPI

    held = []
    with pytest.raises(RuntimeError, match="inside"), tcomm.first_ranks(world.comm, 1) as sub:
        held.append(sub)
        assert (sub != MPI.COMM_NULL) == (world.comm.Get_rank() == 0)
        raise RuntimeError("inside")
    assert held[0] == MPI.COMM_NULL  # freed (mpi4py resets a freed handle) or never made
