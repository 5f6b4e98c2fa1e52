"""The schedules the layers list without being built (tpmpi.layers.linear_schedule, and the tile2d,
MLP and DataParallel ones built the same way) are what the layers run: on the rank holding the
largest blocks, a recording tap sees the collectives of the schedule, in its order, with its
nccl-tests sizes, started non-blocking exactly where the schedule overlaps them, and local
products of the same total flops; at world sizes 1-4, every grid, uneven shapes, with and
without overlap. The schedule's parameter bytes are the footprint's."""
import math

import numpy as np
import pytest

import tpmpi
from tpmpi.core.gemm import LocalWork
from tpmpi.core.schedule import Collective, Product
from tpmpi.core.tap import NOTHING, Tap
from tpmpi.layers.linear_schedule import block_shape, grid_shape, overlapped
from tpmpi.layers.module import attach_tap, modules
from tpmpi.studies.footprint import bytes_per_rank
from tpmpi.studies.problem import Problem


class Recorder(Tap):
    """Logs every collective as ``("started"|"blocked", op, nbytes)`` (one-rank ones aside)."""

    def __init__(self) -> None:
        self.log: list = []

    def count(self, op, nbytes, p):
        if p > 1:
            self.log.append(("started", op, nbytes))

    def blocked(self, op, nbytes, p):
        if p > 1:
            self.log.append(("blocked", op, nbytes))
        return NOTHING


class CountingWork(LocalWork):
    """Local work that adds up the flops of its products."""

    flops = 0

    def product(self, a, b, out=None, bias=None):
        CountingWork.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return super().product(a, b, out, bias)


def expected(schedule):
    """What the recorder should see: each collective started (overlapped) or either way
    (blocking: a non-blocking start waited for at once is the same), and the flops."""
    steps = list(schedule.steps())
    colls = [(bool(s.during), s.op, s.nbytes) for s in steps if isinstance(s, Collective)]
    return colls, sum(s.flops for s in steps if isinstance(s, Product))


def run_and_compare(module, x, dy, schedule, rank0, extra=()):
    """One forward and backward of ``module`` under the recorder (and ``extra`` modules'
    operators, e.g. a DataParallel's), compared with ``schedule`` on rank 0."""
    rec = Recorder()
    for target in (module, *extra):
        attach_tap(target, rec)
        for sub in modules(target):
            work = getattr(sub, "local", None)
            if work is not None:
                sub.local = CountingWork(work.xp, work.pending)
    CountingWork.flops = 0
    y = module(x)
    module.backward(dy if dy is not None else np.ones_like(y))
    if rank0:
        colls, flops = expected(schedule)
        assert [(op, n) for _, op, n in rec.log] == [(op, n) for _, op, n in colls], rec.log
        for (kind, _, _), (overlaps, _, _) in zip(rec.log, colls):
            assert kind == "started" or not overlaps
        assert CountingWork.flops == flops


LINEAR = [("ColumnParallelLinear", {}), ("ColumnParallelLinear", {"gather_output": False}),
          ("ColumnParallelLinear", {"chunks": 3}),
          ("ColumnParallelLinear", {"gather_output": False, "sequence_parallel": True}),
          ("RowParallelLinear", {}), ("RowParallelLinear", {"input_is_parallel": True}),
          ("RowParallelLinear", {"input_is_parallel": True, "sequence_parallel": True})]


@pytest.mark.mpi
@pytest.mark.parametrize("cls,options", LINEAR, ids=str)
@pytest.mark.parametrize("m,k,n", [(150, 7, 9), (5, 3, 2)])
@pytest.mark.parametrize("overlap", [True, False])
def test_a_1d_layer_runs_its_schedule(world, grid, cls, options, m, k, n, overlap):
    layer_cls = getattr(tpmpi, cls)
    layer = layer_cls(k, n, grid=grid, dtype="float64", overlap=overlap, **options)
    lay = layer.layouts
    rng = np.random.default_rng(1)
    x = np.ascontiguousarray(tpmpi.scatter(rng.standard_normal((m, k)), grid, lay.x))
    dy = np.ascontiguousarray(tpmpi.scatter(rng.standard_normal((m, n)), grid, lay.y))
    sched = layer_cls.schedule_for(m, k, n, world.size, dtype="float64", backward=True,
                                   overlap=overlap, **options)
    assert sched == layer.schedule(m)
    run_and_compare(layer, x, dy, sched, grid.rank == 0)


@pytest.mark.mpi
@pytest.mark.parametrize("panel", [None, 2, 5])
@pytest.mark.parametrize("m,k,n", [(9, 7, 5), (3, 2, 4)])
def test_tile2d_runs_its_schedule(grids, panel, m, k, n):
    for grid in grids():
        layer = tpmpi.TileParallelLinear(k, n, grid=grid, dtype="float64", panel=panel)
        rng = np.random.default_rng(2)
        x = tpmpi.scatter(rng.standard_normal((m, k)), grid, "tiles")
        dy = tpmpi.scatter(rng.standard_normal((m, n)), grid, "tiles")
        run_and_compare(layer, x, dy, layer.schedule(m), grid.rank == 0)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["megatron", "book", "sequence", "tile2d"])
@pytest.mark.parametrize("overlap", [True, False])
def test_the_mlp_and_data_parallelism_run_their_schedules(world, mode, overlap):
    from tpmpi.core.mesh import mesh_shapes

    for dp, shape in mesh_shapes(world.size):
        if mode != "tile2d" and shape[0] > 1:
            continue
        with tpmpi.Mesh(world.comm, dp=dp, tp=shape) as mesh:
            mlp = tpmpi.ParallelMLP(6, 10, grid=mesh.tp, mode=mode, dtype="float64",
                                    overlap=overlap)
            model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=100, overlap=overlap)
            m = 7 if mesh.dp_rank == 0 else 6  # replica 0 holds the largest block of 13 rows
            sched = model.schedule_for(mlp.schedule(m), dp, bucket_bytes=100, overlap=overlap)
            x = tpmpi.scatter(np.ones((m, 6)), mesh.tp, mlp.layouts.x)
            run_and_compare(model, x, None, sched, mesh.comm.Get_rank() == 0, extra=(mlp,))


def test_collectives_overlap_the_steps_after_them_in_order():
    a, b = (Collective(n, "allreduce", "tp", 2, 8, "float32") for n in ("a", "b"))
    work = [Product("dW", 2, 2, 2, "float32")]
    assert overlapped([a, None, b], work, True) == [
        Collective("a", "allreduce", "tp", 2, 8, "float32", ("b", "dW")),
        Collective("b", "allreduce", "tp", 2, 8, "float32", ("dW",)), work[0]]
    assert overlapped([a, b], work, False) == work + [a, b]
    assert grid_shape(4) == (1, 4) and grid_shape((2, 3)) == (2, 3)
    assert block_shape((5, 7), (1, 2), "cols") == (5, 4)


@pytest.mark.parametrize("scheme,options", [("column", {}), ("row", {}), ("tile2d", {}),
                                            ("mlp", {"mode": "sequence"}),
                                            ("mlp", {"mode": "tile2d"})])
def test_parameter_bytes_agree_with_the_footprint(scheme, options):
    """The schedule's param_bytes are the parameter arrays the footprint counts (forward-only
    footprint minus the activations and inputs it holds besides)."""
    from tpmpi.studies.footprint import SCHEME_LAYERS

    cls = SCHEME_LAYERS[scheme]
    grid = (2, 2) if scheme == "tile2d" or options.get("mode") == "tile2d" else (1, 3)
    sched = cls.schedule_for(10, 8, 8 if scheme == "mlp" else 6, grid, hidden=12, **options)
    params = []
    for sub_cls, k, n, opts in ([(cls, 8, 6, options)] if scheme != "mlp" else
                                [(c, kk, nn, o) for (c, o), (kk, nn) in
                                 zip(tpmpi.ParallelMLP.sublayers(options["mode"]),
                                     [(8, 12), (12, 8)])]):
        lay = sub_cls.layouts_for(**opts)
        params += [block_shape((k, n), grid, lay.weight), block_shape((n,), grid, lay.bias)]
    assert sched.param_bytes == sum(math.prod(s) for s in params) * 4
    prob = Problem(scheme=scheme, m=10, k=8, n=8 if scheme == "mlp" else 6, hidden=12,
                   options=tuple(sorted(options.items())))
    assert bytes_per_rank(prob, grid) > sched.param_bytes + sched.saved_bytes / 2
