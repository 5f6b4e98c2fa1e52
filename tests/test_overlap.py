"""tpmpi.studies.overlap: the OSU overlap formula and its edges, what measure_overlap times (the
call as is, GEMMs only, collectives only) on stand-in layers with known times, on chunked
column and panel tile2d layers at world sizes 1-4, its argument agreement, and the DP gradient
Allreduce's overlap (measure_dp_overlap)."""
import time

import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from conftest import all_ranks_raise, rel_err
from tpmpi.core.backend import get_backend
from tpmpi.core.profiler import Profiler
from tpmpi.layers.column import CHUNK_ROWS
from tpmpi.studies.overlap import OverlapTimes, measure_dp_overlap, measure_overlap, \
    overlap_percent


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


def test_saved_time_and_record_fields():
    half = OverlapTimes(1.25, 1.0, 0.5)
    assert half.saved_s == pytest.approx(0.25)
    assert half.as_dict() == {"overall_s": 1.25, "compute_s": 1.0, "comm_only_s": 0.5,
                              "overlap_pct": pytest.approx(50.0), "saved_s": pytest.approx(0.25)}
    assert OverlapTimes(2.0, 1.0, 0.5).saved_s == 0.0  # slower than serial: nothing saved
    assert OverlapTimes(0.0, 0.0, -1.0).overlap_pct == 0.0


class Sleeper:
    """A stand-in layer on COMM_SELF: a call sleeps ``gemm_s`` if its profiler lets the GEMMs
    run and ``comm_s`` if it lets the collectives run, one after the other, or at once when
    ``hidden`` (perfect overlap); it counts one collective per call."""

    def __init__(self, gemm_s: float, comm_s: float, hidden: bool):
        self.profiler = Profiler(timed=False)
        self.comm, self.backend = MPI.COMM_SELF, get_backend("numpy")
        self.gemm_s, self.comm_s, self.hidden = gemm_s, comm_s, hidden

    def __call__(self) -> None:
        gemm = self.gemm_s if self.profiler.runs("gemm") else 0.0
        comm = self.comm_s if self.profiler.runs("comm") else 0.0
        self.profiler.count("allgather", 8, 2)
        time.sleep(max(gemm, comm) if self.hidden else gemm + comm)


@pytest.mark.parametrize("hidden", [True, False], ids=["hidden", "exposed"])
def test_measure_overlap_times_each_phase_alone(hidden):
    """0.03 s of GEMMs and 0.015 s of communication: hidden gives about 100 %, exposed about
    0 % (sleeps: the margins absorb a loaded machine's wake-up delays)."""
    layers = [Sleeper(0.03, 0.015, hidden), Sleeper(0.0, 0.0, hidden)]
    times = measure_overlap(layers, layers[0], warmup=0, iters=3)
    assert times.compute_s == pytest.approx(0.03, abs=0.012)
    assert times.comm_s == pytest.approx(0.015, abs=0.012)
    assert times.overall_s == pytest.approx(0.03 if hidden else 0.045, abs=0.012)
    assert (times.overlap_pct > 60) if hidden else (times.overlap_pct < 40)
    for layer in layers:  # totals reset, both phases back on
        assert layer.profiler.calls == {} and layer.profiler.runs("gemm")
        assert layer.profiler.runs("comm")


@pytest.mark.mpi
def test_measure_overlap_on_chunked_layer(grid):
    layer = tpmpi.ColumnParallelLinear(8, 6, grid=grid, chunks=3, dtype="float64")
    x = np.ones((3 * CHUNK_ROWS, 8))
    ref = layer(x)
    times = measure_overlap(layer, lambda: layer(x), warmup=0, iters=2)
    assert 0 <= times.overlap_pct <= 100 and times.overall_s >= 0
    assert np.array_equal(layer(x), ref)


def measure_panel_layer(grid) -> None:
    """measure_overlap on a panel tile layer of ``grid``: times in range, results intact."""
    layer = tpmpi.TileParallelLinear(16, 12, grid=grid, panel=4, dtype="float64")
    x = tpmpi.scatter(np.ones((10, 16)), grid, "tiles")
    times = measure_overlap(layer, lambda: layer(x), iters=2)
    assert min(times.overall_s, times.compute_s, times.comm_s) >= 0
    assert 0 <= times.overlap_pct <= 100
    assert set(times.as_dict()) == {"overall_s", "compute_s", "comm_only_s", "overlap_pct",
                                    "saved_s"}
    want = np.ones((10, 16)) @ layer.gather_weight() + layer.gather_bias()
    assert rel_err(layer(x), tpmpi.scatter(want, grid, "tiles")) <= 1e-12
    all_ranks_raise(grid.comm, lambda: measure_overlap(layer, lambda: None, iters=0),
                    "iters=0: expected a positive integer")


@pytest.mark.mpi
def test_measure_overlap_on_panel_layer(grids):
    for grid in grids():
        measure_panel_layer(grid)


@pytest.mark.mpi
def test_arguments_agreed_on_every_rank(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    layer = tpmpi.ColumnParallelLinear(4, 4, grid=grid)
    all_ranks_raise(comm, lambda: measure_overlap(layer, lambda: None, warmup=-1),
                    "warmup=-1: expected a non-negative integer")
    if world.size > 1:  # a value differing on one rank: an error on every rank, no hang
        all_ranks_raise(comm, lambda: measure_overlap(layer, lambda: layer(np.ones((2, 4),
                                                                                    np.float32)),
                                                      iters=2 + (rank == 0)),
                        "iters differs across ranks: 3 on rank 0")


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_dp_overlap_measurement(world):
    with tpmpi.Mesh(world.comm, dp=2) as mesh:
        mlp = tpmpi.ParallelMLP(32, 64, grid=mesh.tp)
        model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=1024)
        x = np.ones((16, 32), dtype=np.float32)
        y = model(x)
        times = measure_dp_overlap(model, np.ones_like(y), iters=3)
        assert times.overall_s > 0 and times.compute_s > 0 and times.comm_s > 0
        assert 0.0 <= times.overlap_pct <= 100.0
        assert model.profiler.calls == {}  # reset after the measurement
        all_ranks_raise(world.comm, lambda: measure_dp_overlap(model, np.ones_like(y), iters=0),
                        "iters=0: expected a positive integer")
