"""tpmpi.core.staging: host staging of device buffers for an MPI library that is not GPU-aware,
on a CPU with tests/fake_device.py's FakeDevice, which counts every copy and pinned buffer.

Staged collectives move the bytes each way the pipeline promises (and nothing at P = 1),
pipeline their chunks (the copy down of chunk i+1 before the MPI call of chunk i), sum 2-byte
floats on the device in float32 rounded once (bfloat16 where ml_dtypes exists), reuse their
pinned buffers; a column layer and a benchmark record go through the same path.
"""
from __future__ import annotations

import numpy as np
import pytest

import tpmpi
from conftest import RecordingComm, rel_err
from fake_device import FakeDevice
from problems import HALFS, float32_sum, linear_problem
from tpmpi.core.comm import allgather_blocks, allreduce, iallreduce, ibcast, ireduce, \
    ireduce_scatter
from tpmpi.core.staging import Staging


def col_blocks(m, n, p):
    return [((0, start), (m, stop - start)) for start, stop in tpmpi.block_partition(n, p)]


def test_one_rank_stages_nothing_and_calls_no_collective():
    """P = 1: every collective returns at once: no MPI call, no host copy, no pinned buffer."""
    from mpi4py import MPI

    dev, log = FakeDevice(), []
    staging, comm = Staging(dev), RecordingComm(MPI.COMM_SELF, log)
    a = np.arange(12.0).reshape(3, 4)
    out = np.zeros_like(a)
    assert allgather_blocks(a, out, [((0, 0), (3, 4))], comm, staging) is out
    assert np.array_equal(out, a)
    b = a.copy()
    assert allreduce(b, comm, staging) is b and np.array_equal(b, a)
    red = np.zeros_like(a)
    ireduce(a, red, 0, comm, staging).Wait()
    assert np.array_equal(red, a)
    rs = np.zeros(12)
    ireduce_scatter(a, rs, [12], comm, staging).Wait()
    assert np.array_equal(rs, a.reshape(-1))
    ibcast(b, 0, comm, staging).Wait()
    iallreduce(b, comm).Wait()
    assert not dev.events and dev.counts["pinned"] == 0
    assert staging.stats == {"d2h_bytes": 0, "h2d_bytes": 0, "staging_s": 0.0}
    assert {name for name, *_ in log} <= {"Get_size", "Get_rank"}


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", *HALFS])
def test_staged_gather_moves_own_block_down_and_rows_back(world, dtype):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    dev = FakeDevice()
    staging = Staging(dev)
    assert staging.staged
    full = np.arange(5 * 7, dtype=np.float64).reshape(5, 7).astype(dtype)
    blocks = col_blocks(5, 7, size)
    (_, c0), (_, width) = blocks[rank]
    local = np.ascontiguousarray(full[:, c0:c0 + width])
    for call in range(2):
        before = dev.counts.copy()
        staging.reset_stats()
        out = np.zeros((5, 7), dtype=dtype)
        allgather_blocks(local, out, blocks, comm, staging)
        assert np.array_equal(out.view(np.uint8), full.view(np.uint8))
        staged = size > 1  # one rank: the block is copied on the device, nothing staged
        assert staging.stats["d2h_bytes"] == local.nbytes * staged  # only this rank's block
        assert staging.stats["h2d_bytes"] == out.nbytes * staged  # the assembled rows back
        delta = dev.counts - before
        assert delta["pinned"] == (2 if call == 0 and staged else 0)  # 2 slots, then reused


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_staged_gather_pipelines_chunks(world):
    """Chunked staging: the copy down of chunk i+1 is issued before the MPI call of chunk i,
    chunk i comes back before the MPI call of chunk i+1, with two pinned slots per role."""
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    dev = FakeDevice()
    staging = Staging(dev, chunk_bytes=2 * 9 * 8)  # two rows of the (8, 9) float64 output
    blocks = col_blocks(8, 9, size)
    full = np.arange(8 * 9, dtype=np.float64).reshape(8, 9)
    (_, c0), (_, width) = blocks[rank]
    local = np.ascontiguousarray(full[:, c0:c0 + width])
    out = np.zeros_like(full)
    log = dev.events
    allgather_blocks(local, out, blocks, RecordingComm(comm, log), staging)
    assert np.array_equal(out, full)
    order = [e[0] for e in log if e[0] in ("d2h", "h2d", "Alltoallw")]
    mpi = [i for i, e in enumerate(order) if e == "Alltoallw"]
    down = [i for i, e in enumerate(order) if e == "d2h"]
    up = [i for i, e in enumerate(order) if e == "h2d"]
    n = 4
    assert len(mpi) == len(up) == n and len(down) == (n if width else 0)
    for i in range(n):
        assert mpi[i] < up[i] < (mpi[i + 1] if i + 1 < n else len(order))
        if width and i + 1 < n:
            assert down[i + 1] < mpi[i]  # prefetched: overlaps the MPI call of chunk i
    assert dev.counts["pinned"] == (4 if width else 2)  # 2 slots x (send, recv)
    assert staging.stats["d2h_bytes"] == local.nbytes and staging.stats["h2d_bytes"] == out.nbytes


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
def test_staged_reductions_sum_on_the_device(world, dtype):
    """Staged allreduce, reduce, reduce-scatter and bcast: right results (2-byte floats: the
    float32 sum rounded once, bitwise), and the bytes of a slice exchange: this rank's data
    down, the P slices of its part back (summed on the device), then the others' parts back;
    nothing on one rank."""
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    item, n = np.dtype(dtype).itemsize, 11
    parts = [(np.arange(n) * 0.25 + q).astype(dtype) for q in range(size)]
    want = float32_sum(parts, dtype) if dtype in ("float16", "bfloat16") else \
        sum(p.astype(np.float64) for p in parts)
    counts = tpmpi.core.partition.block_sizes(n, size)
    mine = counts[rank] if size > 1 else 0  # one rank: nothing staged, no collective
    staging = Staging(FakeDevice())

    a = parts[rank].copy()
    allreduce(a, comm, staging)
    assert rel_err(a, want) == 0.0
    staged = size > 1
    assert staging.stats["d2h_bytes"] == (n + mine) * item * staged
    assert staging.stats["h2d_bytes"] == (size * mine + n - mine) * item * staged

    staging.reset_stats()
    root = size - 1
    red = np.zeros(n, dtype) if rank == root else None
    ireduce(parts[rank], red, root, comm, staging).Wait()
    if rank == root:
        assert rel_err(red, want) == 0.0
    assert staging.stats["d2h_bytes"] == (n + mine) * item * staged
    assert staging.stats["h2d_bytes"] == (size * mine + (n - mine if rank == root else 0)) \
        * item * staged

    staging.reset_stats()
    seg = counts[::-1]
    out = np.zeros(seg[rank], dtype)
    ireduce_scatter(parts[rank], out, seg, comm, staging).Wait()
    start = sum(seg[:rank])
    assert rel_err(out, want[start:start + seg[rank]]) == 0.0
    assert staging.stats["d2h_bytes"] == n * item * staged
    assert staging.stats["h2d_bytes"] == size * seg[rank] * item * staged

    staging.reset_stats()
    b = parts[rank].copy()
    ibcast(b, 0, comm, staging).Wait()
    assert np.array_equal(b.view(np.uint8), parts[0].view(np.uint8))
    assert staging.stats["d2h_bytes"] == (n * item if rank == 0 else 0) * staged
    assert staging.stats["h2d_bytes"] == (0 if rank == 0 else n * item) * staged
    if size == 1:
        assert staging.backend.counts["pinned"] == 0 and not staging.backend.events


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", *HALFS])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
def test_allreduce_sums_in_place(world, dtype, staged):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    staging = Staging(FakeDevice()) if staged else None
    parts = [(np.arange(6, dtype=np.float64) + r).astype(dtype) for r in range(size)]
    want = sum(np.arange(6, dtype=np.float64) + r for r in range(size))
    for _ in range(2):
        a = parts[rank].copy()
        assert allreduce(a, comm, staging) is a
        assert a.dtype == np.dtype(dtype) and np.array_equal(a.astype(np.float64), want)
    if not staged:
        a = parts[rank].copy()
        iallreduce(a, comm).Wait()
        assert np.array_equal(a.astype(np.float64), want)


@pytest.mark.mpi
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_layer_through_staging(grid, gather_output):
    dev = FakeDevice()
    X, W, b, dY = linear_problem(6, 5, 7, "float64", seed=4)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, backend=dev,
                                                  gather_output=gather_output)
    assert layer.staging.staged
    cols = layer.shard[1]
    dy = dY if gather_output else np.ascontiguousarray(dY[:, cols])
    pinned = []
    for _ in range(2):
        layer.staging.reset_stats()
        y = layer(X)
        want = X @ W + b
        assert rel_err(y, want if gather_output else want[:, cols]) <= 1e-12
        forward = dict(layer.staging.stats)
        assert rel_err(layer.backward(dy), dY @ W.T) <= 1e-12
        pinned.append(dev.counts["pinned"])
    assert pinned[0] == pinned[1]  # no new pinned buffer on the second step
    n_p = cols.stop - cols.start
    if grid.size == 1:  # no collective, no copy
        assert not dev.events and dev.counts["pinned"] == 0
    else:  # forward: own block down, output back; backward: the dX allreduce
        assert forward["d2h_bytes"] == (6 * n_p * 8 if gather_output else 0)
        assert forward["h2d_bytes"] == (6 * 7 * 8 if gather_output else 0)
        mine = tpmpi.core.partition.block_sizes(6 * 5, grid.size)[grid.rank]
        assert layer.staging.stats["d2h_bytes"] - forward["d2h_bytes"] == (30 + mine) * 8
    assert rel_err(layer.grad_weight, 2 * (X.T @ dY)[:, cols]) <= 1e-12


@pytest.mark.mpi
def test_records_report_staging(grid):
    """bench records: host<->device bytes per iteration and staging seconds (0 at P = 1)."""
    from tpmpi.studies.bench import run_case
    from tpmpi.studies.schemes import Problem

    rec = run_case(Problem(scheme="row", m=6, k=5, n=7, dtype="float64", backward=True),
                   grid, FakeDevice(), warmup=0, iters=2)
    assert rec["max_rel_err"] <= rec["tolerance"]
    if grid.size == 1:
        assert (rec["d2h_bytes"], rec["h2d_bytes"], rec["staging_s"]) == (0, 0, 0.0)
    else:  # forward allreduce of Y (6, 7), backward gather of dX (6, 5): at least Y down
        assert rec["d2h_bytes"] >= 6 * 7 * 8 and rec["h2d_bytes"] >= 6 * 5 * 8
        assert 0 <= rec["staging_s"] <= rec["comm_s"] + 1e-3
