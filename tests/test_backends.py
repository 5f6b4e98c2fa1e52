"""The GPU path without a GPU, and every backend through the same correctness tests.

* ``xb`` (conftest): column layer forward/backward against a float64 reference on each backend
  ("numpy" always, "cupy" where CuPy and a device exist), world sizes 1-4.
* :class:`FakeDevice`: NumPy arrays posing as device arrays of a backend that is not GPU-aware,
  so the host-staging branch of :class:`tpmpi.core.comm.Staging` runs (and counts its copies and
  pinned allocations) on a CPU.
* staged collectives (bytes each way, chunk pipelining, nothing at P = 1), float16 and
  bfloat16 (2-byte words summed in float32; bfloat16 where ml_dtypes exists),
  the GPU-aware probe's decisions, tiling and peak helpers.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tpmpi
from conftest import RecordingComm, rel_err
from tpmpi.core import backend as backend_mod
from tpmpi.core.backend import Backend
from tpmpi.core.comm import (Staging, allgather_blocks, allreduce, iallreduce, ibcast, ireduce,
                             ireduce_scatter)
from tpmpi.core.dtypes import tolerance
from tpmpi.studies.peak import gemm_fraction, gemm_peak
from tpmpi.core.tiling import panel_workspace_bytes, round_size

try:
    import ml_dtypes  # noqa: F401
    HALFS = ["float16", "bfloat16"]
except ImportError:
    HALFS = ["float16", pytest.param("bfloat16", marks=pytest.mark.skip(
        reason="bfloat16 needs the ml_dtypes package (not installed)"))]


class FakeDevice(Backend):
    """A GPU backend without GPU-aware MPI whose "device" arrays are NumPy arrays. Pinned
    buffers start as all-ones bytes (NaN in every float dtype: a missed copy shows); every
    staging operation is counted, and copies are logged in ``events`` as ``("d2h"|"h2d",
    nbytes)`` (the async copies of the base class complete at once)."""

    is_gpu = True

    def __init__(self) -> None:
        super().__init__("fake-gpu", np)
        self.counts: collections.Counter = collections.Counter()
        self.events: list = []

    def synchronize(self) -> None:
        self.counts["sync"] += 1

    def pinned_empty(self, shape, dtype):
        self.counts["pinned"] += 1
        buf = np.empty(shape, dtype=dtype)
        buf.view(np.uint8).fill(0xFF)
        return buf

    def copy_to_host(self, a, out) -> None:
        self.counts["to_host"] += 1
        self.events.append(("d2h", a.nbytes))
        super().copy_to_host(a, out)

    def copy_from_host(self, host, a) -> None:
        self.counts["from_host"] += 1
        self.events.append(("h2d", host.nbytes))
        super().copy_from_host(host, a)


def problem(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(m, k), (k, n), (n,), (m, n)]]


# --------------------------------------------------------------------------- every backend


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("m,k,n", [(6, 5, 7), (3, 0, 4), (4, 2, 1)])
def test_column_matches_reference_on_backend(world, xb, dtype, m, k, n):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    X, W, b, dY = problem(m, k, n, dtype)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, backend=xb)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    cols, tol = layer.shard[1], tolerance(dtype)
    y = layer(xb.asarray(X))
    assert xb.owns(y) and y.dtype == np.dtype(dtype) and y.shape == (m, n)
    assert rel_err(xb.to_host(y), X64 @ W64 + b64) <= tol
    dx = layer.backward(xb.asarray(dY))
    assert rel_err(xb.to_host(dx), dY64 @ W64.T) <= tol
    assert rel_err(xb.to_host(layer.grad_weight), (X64.T @ dY64)[:, cols]) <= tol
    assert rel_err(xb.to_host(layer.grad_bias), dY64.sum(0)[cols]) <= tol
    grid.free()


def test_cupy_backend_request_is_clear_without_a_gpu():
    if backend_mod.cupy_usable():
        pytest.skip("a GPU is present: this checks the error without one")
    with pytest.raises(ValueError, match="CuPy is not installed or no CUDA device"):
        backend_mod.get_backend("cupy")


def test_auto_backend_follows_env(monkeypatch):
    monkeypatch.setenv("TPMPI_BACKEND", "numpy")
    assert backend_mod.get_backend("auto").name == "numpy"
    monkeypatch.setenv("TPMPI_BACKEND", "torch")
    with pytest.raises(ValueError, match="TPMPI_BACKEND='torch'"):
        backend_mod.get_backend("auto")


# --------------------------------------------------------------------------- host staging


def col_blocks(m, n, p):
    return [((0, start), (m, stop - start)) for start, stop in tpmpi.block_partition(n, p)]


def _f32_sum(parts, dtype):
    acc = parts[0].astype(np.float32)
    for p in parts[1:]:
        acc += p
    return acc.astype(dtype)


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
    if not world.member:
        return
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
def test_staged_gather_pipelines_chunks(world):
    """Chunked staging: the copy down of chunk i+1 is issued before the MPI call of chunk i,
    chunk i comes back before the MPI call of chunk i+1, with two pinned slots per role."""
    if not world.member or world.size == 1:
        return
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
    if not world.member:
        return
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    item, n = np.dtype(dtype).itemsize, 11
    parts = [(np.arange(n) * 0.25 + q).astype(dtype) for q in range(size)]
    want = _f32_sum(parts, dtype) if dtype in ("float16", "bfloat16") else \
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
    if not world.member:
        return
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
def test_column_layer_through_staging(world, gather_output):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    dev = FakeDevice()
    X, W, b, dY = problem(6, 5, 7, "float64", seed=4)
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
    if world.size == 1:  # no collective, no copy
        assert not dev.events and dev.counts["pinned"] == 0
    else:  # forward: own block down, output back; backward: the dX allreduce
        assert forward["d2h_bytes"] == (6 * n_p * 8 if gather_output else 0)
        assert forward["h2d_bytes"] == (6 * 7 * 8 if gather_output else 0)
        mine = tpmpi.core.partition.block_sizes(6 * 5, world.size)[grid.rank]
        assert layer.staging.stats["d2h_bytes"] - forward["d2h_bytes"] == (30 + mine) * 8
    assert rel_err(layer.grad_weight, 2 * (X.T @ dY)[:, cols]) <= 1e-12
    grid.free()


@pytest.mark.mpi
def test_records_report_staging(world):
    """bench records: host<->device bytes per iteration and staging seconds (0 at P = 1)."""
    if not world.member:
        return
    from tpmpi.studies.bench import run_case
    from tpmpi.studies.schemes import Problem

    with tpmpi.ProcessGrid(world.comm, blas_threads=None) as grid:
        rec = run_case(Problem(scheme="row", m=6, k=5, n=7, dtype="float64", backward=True),
                       grid, FakeDevice(), warmup=0, iters=2)
    assert rec["max_rel_err"] <= rec["tolerance"]
    if world.size == 1:
        assert (rec["d2h_bytes"], rec["h2d_bytes"], rec["staging_s"]) == (0, 0, 0.0)
    else:  # forward allreduce of Y (6, 7), backward gather of dX (6, 5): at least Y down
        assert rec["d2h_bytes"] >= 6 * 7 * 8 and rec["h2d_bytes"] >= 6 * 5 * 8
        assert 0 <= rec["staging_s"] <= rec["comm_s"] + 1e-3


# --------------------------------------------------------------------------- GPU-aware probe


@pytest.mark.parametrize("env,library,want", [
    ("0", True, False),    # forced off, whatever the library says
    ("1", False, True),    # forced on, no test
    ("", False, False),    # library without CUDA support -> staging
    ("", None, False),     # library without MPIX_Query_cuda_support -> staging
    ("", True, True),      # library claims support and the device Allreduce checks out
])
def test_probe_gpu_aware_decision(monkeypatch, env, library, want):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", env)
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: library)
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is want
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, backend_mod.get_backend("numpy")) is False


def test_probe_falls_back_when_the_device_allreduce_fails(monkeypatch):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: True)
    monkeypatch.setattr(backend_mod, "_device_allreduce_ok", lambda comm, backend: False)
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is False
    monkeypatch.setenv("TPMPI_GPU_AWARE", "yes")
    with pytest.raises(ValueError, match="TPMPI_GPU_AWARE='yes': expected 0 or 1"):
        backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice())


@pytest.mark.mpi
def test_probe_is_collective(world, monkeypatch):
    if not world.member:
        return
    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    rank = world.comm.Get_rank()
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: rank != 1)
    assert backend_mod.probe_gpu_aware(world.comm, FakeDevice()) is (world.size == 1)


def test_sharing_warning_compares_physical_devices():
    assert backend_mod.sharing_message(["0000:3b:00.0", "0000:5e:00.0"]) is None
    msg = backend_mod.sharing_message(["0000:3b:00.0"] * 4)
    assert msg.startswith("4 ranks share 1 GPU(s) on this node")


# --------------------------------------------------------------------------- tiling, peak


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


def test_gemm_peak_and_fraction():
    peak = gemm_peak(backend_mod.get_backend("numpy"), 64, "float32", warmup=1, iters=2)
    assert peak > 0
    rec = {"gflops": 8.0, "time_s": {"median": 0.5}, "ranks": 4, "gemm_s": 0.25}
    # 4 GFLOP in all, 1 GFLOP per rank in 0.25 s of GEMM = 4 GFLOP/s = 40 % of 10 GFLOP/s
    assert gemm_fraction(rec, 10.0) == pytest.approx(0.4)
    assert gemm_fraction({**rec, "gemm_s": 0.0}, 10.0) is None


def test_cupy_memory_peak_hook_takes_cupys_keyword_calls(monkeypatch):
    """CuPy calls ``hook.malloc_postprocess(device_id=, size=, mem_size=, mem_ptr=, pmem_id=)``
    and ``hook.free_postprocess(device_id=, mem_size=, mem_ptr=, pmem_id=)``; replayed here on a
    stand-in ``cupy.cuda.memory_hook`` module."""
    import sys
    import types

    active = []

    class MemoryHook:
        def __enter__(self):
            active.append(self)
            return self

        def __exit__(self, *exc):
            active.remove(self)

    hook_mod = types.ModuleType("cupy.cuda.memory_hook")
    hook_mod.MemoryHook = MemoryHook
    cuda = types.ModuleType("cupy.cuda")
    cuda.memory_hook = hook_mod
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory_hook", hook_mod)

    def malloc(size, ptr):
        for h in active:
            h.malloc_postprocess(device_id=0, size=size, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    def free(size, ptr):
        for h in active:
            h.free_postprocess(device_id=0, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    with backend_mod.CupyBackend(cupy, 0).memory_peak() as mem:
        free(4096, 1)        # an array from before the block: usage drops below the start
        malloc(1024, 2)
        malloc(2048, 3)      # peak: -4096 + 3072
        free(1024, 2)
        malloc(8192, 4)      # peak: -4096 + 2048 + 8192 = 6144
        malloc(10**9, 0)     # failed allocation (mem_ptr 0): not counted
    assert not active and mem["peak"] == 6144
