"""The paired communication operators of tpmpi.core.mappings and tpmpi.core.summa: values against
their definition and dot-product (adjoint) tests ``<F x, y> = <x, F* y>`` in float64, run
blocking (``op(x)``), during local work (``op.during``) and started (``op.start``), uneven and
empty blocks (the spaces are described in tests/test_adjoint.py); each operator built once with
its adjoint; the layers' operators named and picked by their declared layouts."""
import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from tpmpi.core.mappings import MAPPINGS, AllReduce, AllReduceMax, Copy, GatherCols, GatherRows, \
    Keep, Operator, ReduceScatterRows, SplitCols, StopGradient, between, mapping_class
from tpmpi.core.partition import block_partition
from tpmpi.core.schedule import Collective
from tpmpi.core.summa import SUMMA, BroadcastPiece, GatherPanel, ReduceScatterPanel, \
    ReduceToOwner

OPERATORS = MAPPINGS + SUMMA
# (domain, codomain) of each operator: "replicated" (one logical array, counted once), "full"
# (a different global-shape array per rank), "rows" / "cols" (each rank's block), "owned" (an
# array on the root only: the other ranks' count for nothing)
SPACES = {Copy: ("replicated", "full"), AllReduce: ("full", "replicated"),
          GatherRows: ("rows", "full"), ReduceScatterRows: ("full", "rows"),
          GatherCols: ("cols", "replicated"), SplitCols: ("replicated", "cols"),
          Keep: ("cols", "cols"), GatherPanel: ("cols", "full"),
          ReduceScatterPanel: ("full", "cols"), BroadcastPiece: ("owned", "full"),
          ReduceToOwner: ("full", "owned")}
MODES = ("call", "during", "start")


def starts(cls) -> bool:
    """Whether ``cls`` has a non-blocking start (those the layers pipeline), or nothing to
    start."""
    return cls.op is None or cls.start is not Operator.start


def root(p):
    """The broadcasts' and reductions' root: the last rank (not 0, to catch a default)."""
    return p - 1


def piece(space, shape, seed, q, p):
    """Rank ``q``'s array of ``space`` for the global ``shape`` over ``p`` ranks."""
    m, n = shape
    if space == "replicated":
        return np.random.default_rng(seed).standard_normal(shape)
    rng = np.random.default_rng(seed + 1 + q)
    if space in ("full", "owned"):
        return rng.standard_normal(shape)
    if space == "rows":
        a, b = block_partition(m, p)[q]
        return rng.standard_normal((b - a, n))
    a, b = block_partition(n, p)[q]
    return rng.standard_normal((m, b - a))


def reference(cls, shape, seed, rank, p):
    """The definition of ``cls`` applied to the pieces of every rank (no MPI)."""
    dom = SPACES[cls][0]
    pieces = [piece(dom, shape, seed, q, p) for q in range(p)]
    own_rows = slice(*block_partition(shape[0], p)[rank])
    own_cols = slice(*block_partition(shape[1], p)[rank])
    return {Copy: lambda: pieces[rank], AllReduce: lambda: sum(pieces),
            GatherRows: lambda: np.vstack(pieces), ReduceScatterRows: lambda: sum(pieces)[own_rows],
            GatherCols: lambda: np.hstack(pieces), SplitCols: lambda: pieces[rank][:, own_cols],
            Keep: lambda: pieces[rank], GatherPanel: lambda: np.hstack(pieces),
            ReduceScatterPanel: lambda: sum(pieces)[:, own_cols],
            BroadcastPiece: lambda: pieces[root(p)],
            ReduceToOwner: lambda: sum(pieces) if rank == root(p) else None,
            }[cls]()


def dot(comm, space, a, b, rank) -> float:
    if space == "owned":
        local = float(np.vdot(a, b)) if rank == root(comm.Get_size()) else 0.0
        return comm.allreduce(local)
    local = float(np.vdot(a, b))
    return local if space == "replicated" else comm.allreduce(local)


def argument(op, shape):
    """The operator's call argument: the gathered axis' length, the panel's shape or the
    root."""
    if isinstance(op, (BroadcastPiece, ReduceToOwner)):
        return root(op.size)
    if isinstance(op, ReduceScatterPanel):
        return shape
    return shape[0] if isinstance(op, (GatherRows, ReduceScatterRows)) else shape[1]


def apply(op, x, shape, mode):
    """``op`` applied to ``x`` (a packed panel for ReduceScatterPanel) in ``mode``."""
    arg = argument(op, shape)
    if isinstance(op, ReduceScatterPanel):
        packed, views = op.pack(shape, np, x.dtype)
        for view, (a, b) in zip(views, block_partition(shape[1], op.size)):
            view[...] = x[:, a:b]
        x = packed
    if mode == "call":
        return op(x, arg)
    if mode == "during":
        ran = []
        out = op.during(x, lambda: ran.append(True), arg)
        assert ran == [True]
        return out
    out = op.out(x, arg)
    op.start(x, arg, out=out).wait()
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3), (3, 2), (0, 4), (4, 0)])
@pytest.mark.parametrize("mode", MODES)
def test_values_and_adjoint(world, cls, shape, mode):
    comm, rank, p = world.comm, world.comm.Get_rank(), world.size
    fwd = cls(comm)
    adj = fwd.adjoint
    if mode == "start" and not all(map(starts, (cls, type(adj)))):
        with pytest.raises(TypeError, match="has no start"):
            (fwd if cls.op and not starts(cls) else adj).start(np.zeros(shape), 0)
        return
    assert adj.adjoint is fwd and type(adj) is cls.adjoint_class  # built once, a pair
    dom, cod = SPACES[cls]
    assert SPACES[type(adj)] == (cod, dom)
    x = piece(dom, shape, 10, rank, p)
    y = piece(cod, shape, 20, rank, p)
    fx = apply(fwd, x.copy(), shape, mode)
    want = reference(cls, shape, 10, rank, p)
    if want is None:
        assert fx is None
    else:
        assert np.allclose(fx, want, rtol=1e-14, atol=1e-14)
    aty = apply(adj, y.copy(), shape, mode)
    want = reference(type(adj), shape, 20, rank, p)
    if want is None:
        assert aty is None
    else:
        assert np.allclose(aty, want, rtol=1e-14, atol=1e-14)
    lhs, rhs = dot(comm, cod, fx, y, rank), dot(comm, dom, x, aty, rank)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)
    if cod == "replicated":  # the result really is the same on every rank
        assert len({a.tobytes() for a in comm.allgather(np.ascontiguousarray(fx))}) == 1


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
@pytest.mark.parametrize("cls", [c for c in OPERATORS if c.op], ids=lambda c: c.__name__)
@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_work_completes_the_collective_and_is_kept(world, cls, overlap):
    """``during``: if the work raises on one rank, that rank still completes the collective
    the others are in (their results are right), and the failure is kept for the layer."""
    comm, rank, p = world.comm, world.comm.Get_rank(), world.size
    shape = (3, 5)
    op = cls(comm, overlap=overlap)
    dom = SPACES[cls][0]
    x = piece(dom, shape, 30, rank, p)

    def work():
        if rank == 0:
            raise RuntimeError("a local failure")

    if isinstance(op, ReduceScatterPanel):
        packed, views = op.pack(shape, np, x.dtype)
        for view, (a, b) in zip(views, block_partition(5, p)):
            view[...] = x[:, a:b]
        x = packed
    if rank == 0:
        with pytest.raises(RuntimeError, match="a local failure"):
            op.during(x, work, argument(op, shape))
        assert op.pending.failed == "RuntimeError: a local failure"
    else:
        out = op.during(x, work, argument(op, shape))
        want = reference(cls, shape, 30, rank, p)
        assert (out is None) if want is None else np.allclose(out, want, rtol=1e-14)
        assert op.pending.failed is None


def test_operator_names_and_no_communication_on_one_rank():
    ops = {cls: cls.op for cls in OPERATORS}
    assert ops == {Copy: None, AllReduce: "allreduce", GatherRows: "allgather",
                   ReduceScatterRows: "reduce_scatter", GatherCols: "allgather", SplitCols: None,
                   Keep: None, GatherPanel: "allgather", ReduceScatterPanel: "reduce_scatter",
                   BroadcastPiece: "bcast", ReduceToOwner: "reduce"}
    x = np.arange(6.0).reshape(2, 3)
    for cls in MAPPINGS:  # on one rank every operator is the identity, without a copy
        out = cls(MPI.COMM_SELF)(x, 2 if cls is GatherRows else 3)
        assert np.shares_memory(out, x) and np.array_equal(out, x)


def test_schedule_steps_state_the_collective_and_its_size():
    """An operator class's step: its collective with nccl-tests S (the whole array's bytes),
    none for one rank or an operator that moves nothing."""
    step = GatherCols.step("gather_y", (8, 10), "float32", "tp", 4, during=("dW",))
    assert step == Collective("gather_y", "allgather", "tp", 4, 8 * 10 * 4, "float32", ("dW",))
    assert ReduceToOwner.step("r", (3, 2), "float64", "row", 2).nbytes == 48
    assert GatherCols.step("gather_y", (8, 10), "float32", "tp", 1) is None
    assert SplitCols.step("split", (8, 10), "float32", "tp", 4) is None


def test_operators_are_named_by_their_layouts():
    """A layer's declared layouts pick its operators (tpmpi.core.mappings.between)."""
    pairs = {(cls.src, cls.dst): cls for cls in MAPPINGS if cls is not Keep}
    assert pairs == {("replicated", "replicated"): Copy, ("partial", "replicated"): AllReduce,
                     ("rows", "replicated"): GatherRows, ("partial", "rows"): ReduceScatterRows,
                     ("cols", "replicated"): GatherCols, ("replicated", "cols"): SplitCols}
    for (src, dst), cls in pairs.items():
        assert mapping_class(src, dst) is cls and type(between(src, dst, MPI.COMM_SELF)) is cls
    for layout in ("cols", "rows", "tiles"):  # blocks kept: the identity
        assert mapping_class(layout, layout) is Keep
        assert type(between(layout, layout, MPI.COMM_SELF)) is Keep
    with pytest.raises(ValueError, match="no operator maps layout 'tiles' to 'replicated'"):
        mapping_class("tiles", "replicated")
    assert [c for c in OPERATORS if c.allocates] == [GatherRows, ReduceScatterRows, GatherCols,
                                                     GatherPanel, ReduceScatterPanel,
                                                     ReduceToOwner]


@pytest.mark.parametrize("cls,options,ops", [
    ("ColumnParallelLinear", {}, {"gather_x": Copy, "gather_y": GatherCols,
                                  "split_dy": SplitCols, "reduce_dx": AllReduce}),
    ("ColumnParallelLinear", {"gather_output": False}, {"gather_x": Copy, "gather_y": Keep,
                                                        "split_dy": Keep,
                                                        "reduce_dx": AllReduce}),
    ("ColumnParallelLinear", {"gather_output": False, "sequence_parallel": True},
     {"gather_x": GatherRows, "gather_y": Keep, "split_dy": Keep,
      "reduce_dx": ReduceScatterRows}),
    ("RowParallelLinear", {}, {"split_x": SplitCols, "reduce_y": AllReduce, "gather_dy": Copy,
                               "gather_dx": GatherCols}),
    ("RowParallelLinear", {"input_is_parallel": True}, {"split_x": Keep, "reduce_y": AllReduce,
                                                        "gather_dy": Copy, "gather_dx": Keep}),
    ("RowParallelLinear", {"input_is_parallel": True, "sequence_parallel": True},
     {"split_x": Keep, "reduce_y": ReduceScatterRows, "gather_dy": GatherRows,
      "gather_dx": Keep})])
def test_layers_hold_their_operators_by_name(cls, options, ops):
    """Built once from the declared layouts, each adjoint the very object its forward holds,
    listed by operators() in the order built and named in the schedule the same way."""
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        layer_cls = getattr(tpmpi, cls)
        layer = layer_cls(3, 4, grid=grid, **options)
        assert {name: type(op) for name, op in layer.operators().items()} == ops
        x_name, y_name, dy_name, dx_name = layer_cls.STEP_NAMES
        assert list(layer.operators()) == [x_name, y_name, dy_name, dx_name]
        ops_ = layer.operators()
        assert ops_[dy_name] is ops_[y_name].adjoint and ops_[dx_name] is ops_[x_name].adjoint
        assert all(op.pending is layer._pending for op in ops_.values())


@pytest.mark.parametrize("chain", [
    ("ColumnParallelLinear.forward", "self.gather_y(", "GatherCols.__call__",
     "allgather_blocks(", "allgather_blocks", "comm.Alltoallw("),
    ("RowParallelLinear.backward", "self.gather_dx.during(", "GatherCols.during",
     "iallgather_blocks(", "iallgather_blocks", ".Ialltoallw("),
    ("TileParallelLinear.forward", "self.gather_x(", "GatherPanel.__call__",
     "allgather_blocks(", "allgather_blocks", "comm.Alltoallw("),
    ("DataParallel._start", "self.allreduce_grads.start(", "AllReduce.start", "iallreduce(",
     "iallreduce", "comm.Iallreduce("),
    ("ColumnParallelLinear.backward", "self.reduce_dx.during(", "AllReduce.during",
     "iallreduce(", "iallreduce", "comm.Iallreduce("),
], ids=lambda c: c[0])
def test_from_a_layer_to_the_mpi_call_in_three_hops(chain):
    """The layer's line calls its operator by name (hop 1), the operator's method calls one
    comm.py function (hop 2), which makes the MPI call (hop 3)."""
    import inspect

    import tpmpi.core.comm as comm_module
    import tpmpi.core.summa as summa_module
    from tpmpi.layers import data_parallel

    layer_fn, call, op_fn, comm_call, comm_fn, mpi_call = chain
    owners = {"DataParallel": data_parallel.DataParallel, "GatherPanel": summa_module.GatherPanel,
              "GatherCols": GatherCols, "AllReduce": AllReduce}

    def resolve(dotted):
        cls, name = dotted.split(".")
        return getattr(owners.get(cls) or getattr(tpmpi, cls), name)

    assert call in inspect.getsource(resolve(layer_fn))
    assert comm_call in inspect.getsource(resolve(op_fn))
    assert mpi_call in inspect.getsource(getattr(comm_module, comm_fn))


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(2, 5), (0, 3)])
def test_allreduce_max_and_its_stop_gradient(world, shape):
    """The loss's row maxima: the element-wise maximum over the ranks, the same everywhere; its
    adjoint is the zero map (the loss does not depend on the shift), and they are a pair."""
    comm, rank, p = world.comm, world.comm.Get_rank(), world.size
    op = AllReduceMax(comm)
    assert type(op.adjoint) is StopGradient and op.adjoint.adjoint is op
    pieces = [np.random.default_rng(40 + q).standard_normal(shape) for q in range(p)]
    got = op(pieces[rank].copy())
    assert np.array_equal(got, np.max(pieces, axis=0))
    zeros = op.adjoint(pieces[rank])
    assert zeros.shape == shape and not zeros.any()
    assert AllReduceMax.step("max", (shape[0],), "float32", "tp", p) == (
        None if p == 1 else Collective("max", "allreduce", "tp", p, 4 * shape[0], "float32"))


@pytest.mark.mpi
@pytest.mark.world_sizes(3, 4)
@pytest.mark.parametrize("mode", MODES)
def test_allreduce_on_the_ranks_sharing_a_kv_head(world, mode):
    """The attention's kv-head gradient sum: an AllReduce on a sub-communicator (ranks {0, 1}
    and the rest) sums exactly over its members, and the dot-product test holds there."""
    comm, rank = world.comm, world.comm.Get_rank()
    sub = comm.Split(0 if rank < 2 else 1, rank)
    try:
        fwd = AllReduce(sub)
        members = sub.Get_size()
        shape = (3, 4)
        x = piece("full", shape, 50 + 2 * (rank >= 2), sub.Get_rank(), members)
        y = piece("replicated", shape, 60 + (rank >= 2), sub.Get_rank(), members)
        fx = apply(fwd, x.copy(), shape, mode)
        want = sum(piece("full", shape, 50 + 2 * (rank >= 2), q, members)
                   for q in range(members))
        assert np.allclose(fx, want, rtol=1e-14)
        aty = apply(fwd.adjoint, y.copy(), shape, mode)
        lhs, rhs = dot(sub, "replicated", fx, y, 0), dot(sub, "full", x, aty, 0)
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    finally:
        sub.Free()
