"""The paired communication operators of tpmpi.core.mappings: values against their definition and
dot-product (adjoint) tests ``<F x, y> = <x, F* y>`` in float64, blocking and non-blocking,
uneven and empty blocks (the spaces are described in tests/test_adjoint.py)."""
import numpy as np
import pytest

from tpmpi.core.mappings import MAPPINGS, AllReduce, Copy, GatherCols, GatherRows, \
    ReduceScatterRows, SplitCols
from tpmpi.core.partition import block_partition

# (domain, codomain) of each operator: "replicated" (one logical array, counted once), "full"
# (a different global-shape array per rank), "rows" / "cols" (each rank's block)
SPACES = {Copy: ("replicated", "full"), AllReduce: ("full", "replicated"),
          GatherRows: ("rows", "full"), ReduceScatterRows: ("full", "rows"),
          GatherCols: ("cols", "replicated"), SplitCols: ("replicated", "cols")}


def piece(space, shape, seed, q, p):
    """Rank ``q``'s array of ``space`` for the global ``shape`` over ``p`` ranks."""
    m, n = shape
    if space == "replicated":
        return np.random.default_rng(seed).standard_normal(shape)
    rng = np.random.default_rng(seed + 1 + q)
    if space == "full":
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
            }[cls]()


def dot(comm, space, a, b) -> float:
    local = float(np.vdot(a, b))
    return local if space == "replicated" else comm.allreduce(local)


def apply(mapping, x, size, blocking):
    out = mapping.out(x, size)
    if blocking:
        mapping.forward(x, out)
    else:
        mapping.start(x, out).Wait()
    return out


def size_of(cls, shape):
    return shape[0] if cls in (GatherRows, ReduceScatterRows) else shape[1]


@pytest.mark.mpi
@pytest.mark.parametrize("cls", MAPPINGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3), (3, 2), (0, 4), (4, 0)])
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "nonblocking"])
def test_values_and_adjoint(world, cls, shape, blocking):
    comm, rank, p = world.comm, world.comm.Get_rank(), world.size
    fwd = cls(comm)
    adj = fwd.adjoint
    assert type(adj).adjoint_class is cls  # the pairs are symmetric
    dom, cod = SPACES[cls]
    assert SPACES[type(adj)] == (cod, dom)
    size = size_of(cls, shape)
    x = piece(dom, shape, 10, rank, p)
    y = piece(cod, shape, 20, rank, p)
    fx = apply(fwd, x.copy(), size, blocking)
    assert np.allclose(fx, reference(cls, shape, 10, rank, p), rtol=1e-14, atol=1e-14)
    aty = apply(adj, y.copy(), size, blocking)
    assert np.allclose(aty, reference(type(adj), shape, 20, rank, p), rtol=1e-14, atol=1e-14)
    lhs, rhs = dot(comm, cod, fx, y), dot(comm, dom, x, aty)
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)
    if cod == "replicated":  # the result really is the same on every rank
        assert len({a.tobytes() for a in comm.allgather(np.ascontiguousarray(fx))}) == 1


def test_operator_names_and_no_communication_on_one_rank():
    from mpi4py import MPI

    ops = {cls: cls.op for cls in MAPPINGS}
    assert ops == {Copy: None, AllReduce: "allreduce", GatherRows: "allgather",
                   ReduceScatterRows: "reduce_scatter", GatherCols: "allgather", SplitCols: None}
    x = np.arange(6.0).reshape(2, 3)
    for cls in MAPPINGS:  # on one rank every operator is the identity, without a copy
        out = cls(MPI.COMM_SELF).out(x, 2 if cls is GatherRows else 3)
        assert np.shares_memory(out, x) and np.array_equal(out, x)


def test_operators_are_named_by_their_layouts():
    """A layer's declared layouts pick its operators (tpmpi.core.mappings.between)."""
    from mpi4py import MPI

    from tpmpi.core.mappings import between, mapping_class

    pairs = {(cls.src, cls.dst): cls for cls in MAPPINGS}
    assert pairs == {("replicated", "replicated"): Copy, ("partial", "replicated"): AllReduce,
                     ("rows", "replicated"): GatherRows, ("partial", "rows"): ReduceScatterRows,
                     ("cols", "replicated"): GatherCols, ("replicated", "cols"): SplitCols}
    for (src, dst), cls in pairs.items():
        assert mapping_class(src, dst) is cls and type(between(src, dst, MPI.COMM_SELF)) is cls
    for layout in ("cols", "rows", "tiles"):  # blocks kept: no operator
        assert mapping_class(layout, layout) is None
        assert between(layout, layout, MPI.COMM_SELF) is None
    with pytest.raises(ValueError, match="no operator maps layout 'tiles' to 'replicated'"):
        mapping_class("tiles", "replicated")
    assert [c for c in MAPPINGS if c.allocates] == [GatherRows, ReduceScatterRows, GatherCols]


@pytest.mark.parametrize("cls,options,x_map,y_map", [
    ("ColumnParallelLinear", {}, Copy, GatherCols),
    ("ColumnParallelLinear", {"gather_output": False}, Copy, None),
    ("ColumnParallelLinear", {"gather_output": False, "sequence_parallel": True}, GatherRows,
     None),
    ("RowParallelLinear", {}, SplitCols, AllReduce),
    ("RowParallelLinear", {"input_is_parallel": True}, None, AllReduce),
    ("RowParallelLinear", {"input_is_parallel": True, "sequence_parallel": True}, None,
     ReduceScatterRows)])
def test_layers_operators_follow_their_flags(cls, options, x_map, y_map):
    from mpi4py import MPI

    import tpmpi

    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        layer = getattr(tpmpi, cls)(3, 4, grid=grid, **options)
        assert type(layer.x_map) is type(None) if x_map is None else type(layer.x_map) is x_map
        assert type(layer.y_map) is type(None) if y_map is None else type(layer.y_map) is y_map
