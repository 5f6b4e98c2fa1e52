"""tpmpi.Mesh: every dp x tp factorisation of 1-4 ranks (TP ranks contiguous, DP groups across
them), meshes on sub-communicators, the error naming the valid meshes, the node warning."""
import warnings

import numpy as np
import pytest

import tpmpi
import tpmpi.core.mesh as tmesh
from conftest import all_ranks_raise
from tpmpi.core.mesh import describe_shapes, mesh_shapes


def test_mesh_shapes_and_their_description():
    assert mesh_shapes(4) == [(1, (1, 4)), (1, (2, 2)), (1, (4, 1)), (2, (1, 2)), (2, (2, 1)),
                              (4, (1, 1))]
    assert mesh_shapes(3) == [(1, (1, 3)), (1, (3, 1)), (3, (1, 1))]
    assert describe_shapes(4) == "dp=1 tp=4 (1x4, 2x2, 4x1); dp=2 tp=2 (1x2, 2x1); dp=4 tp=1 (1x1)"
    assert tmesh.tp_shape(None, 4, 2) == (1, 2) and tmesh.tp_shape("2x2", 4, 1) == (2, 2)
    assert tmesh.tp_shape("3", 6, 2) == (1, 3) and tmesh.tp_shape((2, 1), 4, 2) == (2, 1)
    with pytest.raises(ValueError, match="mesh dp=3: dp must divide the 4 ranks; valid"):
        tmesh.tp_shape(None, 4, 3)
    with pytest.raises(ValueError, match="tp='two': expected T or RxC"):
        tmesh.tp_shape("two", 4, 1)
    with pytest.raises(ValueError, match=r"tp=\(1, 2, 2\): expected T or \(pr, pc\)"):
        tmesh.tp_shape((1, 2, 2), 4, 1)


def members(sub, comm):
    """Ranks of ``comm`` in the sub-communicator ``sub``, in ``sub``'s rank order."""
    return sub.allgather(comm.Get_rank())


@pytest.mark.mpi
def test_every_factorisation(world):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    for dp, (pr, pc) in mesh_shapes(size):
        t = pr * pc
        specs = [(pr, pc), f"{pr}x{pc}"] + ([t, None if dp * t == size else t] if pr == 1 else [])
        for tp in specs:
            with tpmpi.Mesh(comm, dp=dp, tp=tp) as mesh:
                assert mesh.shape == (dp, pr, pc) and mesh.label == f"{dp}x({pr}x{pc})"
                assert (mesh.dp, mesh.dp_rank) == (dp, rank // t)
                assert mesh.tp.size == t and mesh.tp.rank == rank % t
                assert mesh.tp.coords == divmod(rank % t, pc)
                # TP ranks contiguous in comm; DP groups join the same TP coordinates
                first = rank // t * t
                assert members(mesh.tp.comm, comm) == list(range(first, first + t))
                assert members(mesh.dp_comm, comm) == list(range(rank % t, size, t))
                assert mesh.dp_comm.Get_rank() == mesh.dp_rank
                assert members(mesh.tp.row_comm, comm) == \
                    [first + mesh.tp.coords[0] * pc + c for c in range(pc)]


@pytest.mark.mpi
def test_bad_meshes_raise_on_every_rank(world):
    comm, size = world.comm, world.size
    valid = describe_shapes(size).replace("(", r"\(").replace(")", r"\)")
    all_ranks_raise(comm, lambda: tpmpi.Mesh(comm, dp=size + 1),
                    rf"mesh dp={size + 1}: dp must divide the {size} ranks; valid meshes: "
                    rf"{valid}$")
    all_ranks_raise(comm, lambda: tpmpi.Mesh(comm, tp=(2, size)), "dp \\* pr \\* pc must equal")
    all_ranks_raise(comm, lambda: tpmpi.Mesh(comm, dp=0), "dp=0: expected a positive integer")
    all_ranks_raise(comm, lambda: tpmpi.Mesh(comm, tp="1by2"), "tp='1by2'")
    if size > 1:
        all_ranks_raise(comm, lambda: tpmpi.Mesh(comm, dp=1 if comm.Get_rank() else size),
                        "dp differs across ranks")


@pytest.mark.mpi
def test_meshes_on_disjoint_sub_communicators():
    """Two halves of COMM_WORLD build different meshes at once and train independently."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() < 4:
        pytest.skip("needs 4 ranks")
    half = world.Split(world.Get_rank() // 2, world.Get_rank())
    left = world.Get_rank() < 2
    with tpmpi.Mesh(half, dp=2 if left else 1) as mesh:
        assert mesh.tp.size == (1 if left else 2)
        mlp = tpmpi.ParallelMLP(3, 4, grid=mesh.tp, dtype="float64", seed=2)
        dp = tpmpi.DataParallel(mlp, mesh)
        x = np.full((2, 3), 1.0 + mesh.dp_rank)
        y = dp(x)
        dp.backward(np.ones_like(y))
        # the average of the two replicas' gradients equals the gradient of their mean input
        # only for the linear fc2 bias: d(sum y)/db2 = rows, the same on both replicas
        assert np.allclose(mlp.fc2.grad_bias, 2.0)
        grads = half.allgather(mlp.fc1.grad_weight.copy())
        if left:  # averaged: identical on both DP replicas
            assert np.array_equal(grads[0], grads[1])
    half.Free()


@pytest.mark.mpi
def test_warns_once_when_a_tp_group_spans_nodes(world, monkeypatch):
    """Faked placement of two ranks per node: a TP group of more than 2 ranks spans nodes."""
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    monkeypatch.setattr(tmesh, "node_leader", lambda c: c.Get_rank() // 2 * 2)
    monkeypatch.setattr(tmesh, "_warned", False)

    def build(**kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tpmpi.Mesh(comm, **kw).free()
        return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]

    if size % 2 == 0:
        assert build(dp=size // 2, tp=2) == []  # every TP group inside a "node"
    if size > 2:
        msgs = build(dp=1, tp=size)
        if rank == 0:
            assert len(msgs) == 1 and f"1 of 1 TP groups of {size} ranks span several nodes" \
                in msgs[0]
        else:
            assert msgs == []
        assert build(dp=1, tp=size) == []  # once per process
