"""The cost model for GPU runs, on a synthetic GPU calibration, and ``calibrate`` on the CuPy
code path (a NumPy-made CuPy): per-dtype GEMM rates on one rank per device, pinned copy
bandwidth, ranks sharing a device, collectives staged through host memory."""
from __future__ import annotations

import math

import pytest

import fake_cupy
from tpmpi.studies import collbench, localbench
from tpmpi.core.backend import get_backend
from tpmpi.core.colltable import staged_bytes
from tpmpi.studies.costmodel import STAGING_CHUNK_BYTES, Calibration, load_calibration, predict
from tpmpi.core.dtypes import SUPPORTED
from tpmpi.studies.schemes import Problem

BIG = dict(m=8192, k=8192, n=8192)


def gpu_calibration() -> Calibration:
    """An H200-like device: 50 TFLOP/s fp32, 600 fp16/bf16; 10 GB/s pinned copies; host MPI
    with 5 us latency and 5 GB/s."""
    cal = Calibration(alpha={op: {"2": 5e-6} for op in ("allgather", "allreduce")},
                      beta={op: {"2": 2e-10} for op in ("allgather", "allreduce")},
                      staging={"d2h": 10e9, "h2d": 10e9})
    def flat(rate):
        return {"thin": 2e12, "small": rate, "medium": rate, "large": rate}

    cal.rates.update({"cupy:float32": flat(50e12), "cupy:float16": flat(600e12),
                      "cupy:bfloat16": flat(600e12)})
    return cal


def test_bfloat16_on_a_gpu_uses_gpu_rates():
    """The default "cupy:bfloat16" rates, not NumPy's float32 ones (9.2 s for a 1.7 ms run):
    the product at the "large" rate, the bias add streaming (read and write) at the "thin"
    rate."""
    pred = predict(Problem(scheme="column", dtype="bfloat16", **BIG), 1, backend="cupy")
    bias = 2 * 8192 * 8192 / 1.5e12  # bytes read and written per element: 2 x 2
    assert pred.time_s == pytest.approx(2 * 8192 ** 3 / 500e12 + 2 * bias)
    fp32 = predict(Problem(scheme="column", **BIG), 1, backend="cupy")
    assert fp32.time_s == pytest.approx(2 * 8192 ** 3 / 50e12 + 4 * bias)


def test_staged_collective_is_copies_and_mpi_pipelined():
    cal, S = gpu_calibration(), 8192 * 8192 * 4
    down, up = staged_bytes("allgather", 2, S)
    assert (down, up) == (S / 2, S / 2)
    d, u = down * 2 / 10e9, up * 2 / 10e9  # two ranks share the device's copy link
    m = cal.collective("allgather", 2, S)
    assert m == pytest.approx(5e-6 + 0.5 * S * 2e-10)
    pieces = math.ceil(down / STAGING_CHUNK_BYTES)
    want = max(d, m, u) + (d + m + u - max(d, m, u)) / pieces
    assert cal.staged_collective("allgather", 2, S, sharing=2) == pytest.approx(want)
    assert cal.staged_collective("allgather", 1, S) == 0
    assert staged_bytes("reduce_scatter", 4, S) == (S, S / 4)
    assert staged_bytes("allreduce", 4, S) == (S, S)


def test_column_on_two_ranks_sharing_a_gpu():
    """P=2 on one device: each rank's half product takes the whole product's time (the ranks
    time-slice the device), plus the staged gather; P=1 has no communication."""
    cal, S = gpu_calibration(), 8192 * 8192 * 4
    prob = Problem(scheme="column", **BIG)
    shared = predict(prob, 2, calibration=cal, backend="cupy", oversubscription=2, staged=True)
    bias = 2 * 8192 * 4096 * 4 / 2e12  # the bias add on the (M, N/2) block, thin rate
    assert shared.compute_s == pytest.approx(2 * (2 * 8192 * 8192 * 4096 / 50e12 + bias))
    assert shared.comm_s == pytest.approx(cal.staged_collective("allgather", 2, S, 2))
    direct = predict(prob, 2, calibration=cal, backend="cupy", oversubscription=2)
    assert direct.comm_s == pytest.approx(cal.collective("allgather", 2, S))
    assert shared.comm_s > direct.comm_s
    one = predict(prob, 1, calibration=cal, backend="cupy", staged=True)
    assert one.comm_s == 0 and one.time_s == pytest.approx(2 * 8192 ** 3 / 50e12 + 2 * bias)
    # backward adds the dX allreduce, staged both ways: under host staging the layer runs it
    # blocking after the dW product, so all of it is exposed
    bwd = predict(Problem(scheme="column", backward=True, **BIG), 2, calibration=cal,
                  backend="cupy", oversubscription=2, staged=True)
    ar = cal.staged_collective("allreduce", 2, S, 2)
    assert bwd.comm_s == pytest.approx(shared.comm_s + ar)


def test_calibration_file_keeps_the_staging_bandwidth(tmp_path):
    path = tmp_path / "cal.json"
    cal = gpu_calibration()
    path.write_text(__import__("json").dumps(cal.to_json()))
    back = load_calibration(str(path))
    assert back.staging == {"d2h": 10e9, "h2d": 10e9}
    assert back.rates["cupy:bfloat16"]["large"] == 600e12


@pytest.mark.mpi
def test_calibrate_on_a_gpu_measures_one_rank_per_device(world, monkeypatch):
    """All ranks on one (fake) device: only the first measures GEMM rates (every supported
    dtype) and copy bandwidth; every rank gets the same calibration."""
    fake_cupy.install(monkeypatch)
    monkeypatch.setenv("TPMPI_GPU_AWARE", "0")
    shapes = {"thin": (4, 64, 64), "small": (16, 16, 16), "medium": (32, 32, 32),
              "large": (64, 64, 64)}
    monkeypatch.setattr(collbench, "GPU_CLASS_SHAPES", shapes)
    monkeypatch.setattr(localbench, "GRID_DIMS", {"cpu": (16, 32), "gpu": (16, 32)})
    monkeypatch.setattr(localbench, "POINTWISE_SIZES", (4096,))
    curves = []  # the fake device's matmul is 2-D only in half precision: curves in float32
    real_curves = collbench.local_curves
    monkeypatch.setattr(collbench, "local_curves", lambda backend, dtype, comm:
                        curves.append((dtype, comm.Get_size())) or
                        real_curves(backend, "float32", comm))
    timed = []
    real_rate = collbench.gemm_rate
    monkeypatch.setattr(collbench, "gemm_rate", lambda shape, dtype, backend, comm:
                        timed.append((shape, dtype, comm.Get_size())) or
                        real_rate(shape, dtype, backend, comm))
    backend = get_backend("cupy", world.comm)
    cal = collbench.calibrate(world.comm, backend, dtypes=SUPPORTED, sizes=[64, 4096],
                              ops=("allgather",), iters=2)
    if world.comm.Get_rank() == 0:
        assert sorted({d for _, d, _ in timed}) == sorted(SUPPORTED)
        assert {s for s, _, _ in timed} == set(shapes.values()) and {p for *_, p in timed} == {1}
        assert curves == [(dtype, 1) for dtype in SUPPORTED]
    else:
        assert timed == [] and curves == []
    for dtype in SUPPORTED:
        assert set(cal.rates[f"cupy:{dtype}"]) == set(shapes)
    assert set(cal.staging) == {"d2h", "h2d"} and min(cal.staging.values()) > 0
    assert sorted(cal.local) == sorted(f"cupy:{dtype}" for dtype in SUPPORTED)
    same = world.comm.allgather(cal.to_json())
    assert all(c == same[0] for c in same)


@pytest.mark.mpi
def test_run_records_on_a_gpu_predict_staged_shared_runs(world, grid, monkeypatch):
    """A record of the CuPy path (fake device shared by every rank, no GPU-aware MPI): its
    prediction charges the ranks sharing the device and the staged collectives."""
    from tpmpi.studies.bench import run_case

    fake_cupy.install(monkeypatch)
    monkeypatch.setenv("TPMPI_GPU_AWARE", "0")
    backend = get_backend("cupy", world.comm)
    prob = Problem(scheme="column", m=64, k=32, n=48, backward=True)
    cal = gpu_calibration()
    rec = run_case(prob, grid, backend, warmup=0, iters=1, calibration=cal)
    assert rec["backend"] == "cupy" and rec["gpu_aware"] is False
    assert rec["oversubscription"] == world.size
    want = predict(prob, world.size, (1, world.size), cal, "cupy",
                   oversubscription=world.size, staged=True)
    assert rec["predicted_s"] == pytest.approx(want.time_s)
    assert rec["comm_s"] >= 0 and rec["gemm_s"] > 0  # the profiler the benchmark attaches
