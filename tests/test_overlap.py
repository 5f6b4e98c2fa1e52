"""tpmpi.studies.overlap: the OSU overlap formula and its edges, what measure_overlap times (the
call as is, GEMMs only, collectives only) on a stand-in layer with known times, isolate's
inert twins swapped in from outside and back, on chunked
column and panel tile2d layers at world sizes 1-4, its argument agreement, and the DP gradient
Allreduce's overlap (measure_dp_overlap)."""
import time

import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from conftest import all_ranks_raise, rel_err
from tpmpi.core.backend import get_backend
from tpmpi.core.gemm import LocalWork
from tpmpi.core.mappings import Operator
from tpmpi.layers.column import CHUNK_ROWS
from tpmpi.studies.overlap import PHASES, InertOperator, InertWork, OverlapTimes, isolate, \
    measure_dp_overlap, measure_overlap, overlap_percent


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
    # faster than the local work alone (noise): at most the communication's time is saved
    assert OverlapTimes(1.0, 7.5, 0.9).saved_s == 0.9
    assert OverlapTimes(0.0, 0.0, -1.0).overlap_pct == 0.0


class SleepingOperator(Operator):
    """An operator on COMM_SELF whose collective takes ``comm_s`` (a sleep), all of it after
    its work, or only what the work has not covered when ``hidden`` (perfect overlap)."""

    op = "allgather"
    src = dst = "replicated"

    def __init__(self, comm_s: float, hidden: bool, **kwargs) -> None:
        super().__init__(MPI.COMM_SELF, **kwargs)
        self.comm_s, self.hidden = comm_s, hidden

    def during(self, x, work, size=None):
        t0 = time.perf_counter()
        work()
        took = time.perf_counter() - t0 if self.hidden else 0.0
        time.sleep(max(0.0, self.comm_s - took))
        return x


SleepingOperator.adjoint_class = SleepingOperator


class Sleeper:
    """A stand-in layer on COMM_SELF: its local work sleeps ``gemm_s`` during its operator's
    collective of ``comm_s``; ``isolate`` swaps either for an inert twin."""

    def __init__(self, gemm_s: float, comm_s: float, hidden: bool):
        self.comm, self.backend = MPI.COMM_SELF, get_backend("numpy")
        self.local = LocalWork(np)
        self.gather = SleepingOperator(comm_s, hidden, _adjoint=None)
        self.gemm_s = gemm_s

    def children(self):
        return []

    def operators(self):
        return {"gather": self.gather}

    def __call__(self) -> None:
        x = np.zeros(1)
        self.gather.during(x, lambda: self.local.pointwise(
            lambda a: time.sleep(self.gemm_s) or a, x))


@pytest.mark.parametrize("hidden", [True, False], ids=["hidden", "exposed"])
def test_measure_overlap_times_each_phase_alone(hidden):
    """0.03 s of GEMMs and 0.015 s of communication: hidden gives about 100 %, exposed about
    0 % (sleeps: the margins absorb a loaded machine's wake-up delays)."""
    layer = Sleeper(0.03, 0.015, hidden)
    gather, local = layer.gather, layer.local
    times = measure_overlap(layer, layer, warmup=0, iters=3)
    assert times.compute_s == pytest.approx(0.03, abs=0.012)
    assert times.comm_s == pytest.approx(0.015, abs=0.012)
    assert times.overall_s == pytest.approx(0.03 if hidden else 0.045, abs=0.012)
    assert (times.overlap_pct > 60) if hidden else (times.overlap_pct < 40)
    assert layer.gather is gather and layer.local is local  # the twins are gone


@pytest.mark.parametrize("phase", PHASES)
def test_isolate_swaps_twins_in_from_outside_and_back(phase):
    """Inside the block the layers' operators (phase "gemm") or local work (phase "comm") are
    inert twins, on every sub-layer; outside, and after an error, the originals."""
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        mlp = tpmpi.ParallelMLP(4, 6, grid=grid, dtype="float64")
        before = mlp.operators()
        locals_ = [mlp.local, mlp.fc1.local, mlp.fc2.local]
        with isolate(mlp, phase):
            ops_inert = all(isinstance(op, InertOperator) for op in mlp.operators().values())
            work_inert = all(isinstance(w, InertWork)
                             for w in (mlp.local, mlp.fc1.local, mlp.fc2.local))
            y = mlp(np.ones((3, 4)))
        assert (ops_inert, work_inert) == ((True, False) if phase == "gemm" else (False, True))
        if phase == "comm":  # no products: zeros through every layer but the biases
            assert np.array_equal(y, np.broadcast_to(mlp.fc2.bias, y.shape))
        with pytest.raises(RuntimeError), isolate(mlp, phase):
            raise RuntimeError("the measurement failed")
        assert mlp.operators() == before
        assert [mlp.local, mlp.fc1.local, mlp.fc2.local] == locals_
        with pytest.raises(ValueError, match="phase='x': expected one of gemm, comm"), \
                isolate(mlp, "x"):
            pass


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
        all_ranks_raise(world.comm, lambda: measure_dp_overlap(model, np.ones_like(y), iters=0),
                        "iters=0: expected a positive integer")
