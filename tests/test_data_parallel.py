"""tpmpi.DataParallel on every mesh of 1-4 ranks: forward, dX and every gradient (TP shards
averaged over the DP replicas) against the serial float64 reference, uneven data and shards,
DP=1, bucketing, when the Allreduces start, errors (the overlap measurement: test_overlap.py)."""
import numpy as np
import pytest

import tpmpi
import tpmpi.core.mappings as tmap
from conftest import all_ranks_raise, counting, rel_err
from problems import linear_problem, mlp_problem, mlp_reference
from tpmpi.core.mesh import mesh_shapes
from tpmpi.core.partition import block_partition

# (M, d_model, d_hidden): even, uneven, M < dp (an empty replica), d_hidden < T
SHAPES = [(8, 4, 8), (7, 3, 5), (1, 4, 6), (5, 2, 3)]


def dp_reference(X, W1, b1, W2, b2, dY, dp, replica):
    """The replica's rows of Y and dX, and the four gradients averaged over the replicas."""
    parts = block_partition(X.shape[0], dp)
    refs = [mlp_reference(X[a:b], W1, b1, W2, b2, dY[a:b]) for a, b in parts]
    mine = refs[replica]
    mean = [sum(r[i] for r in refs) / dp for i in range(2, 6)]
    return (mine[0], mine[1], *mean), slice(*parts[replica])


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["megatron", "sequence", "book", "tile2d"])
@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("bucket_bytes,overlap", [(25 * 2**20, True), (1, True), (1, False)])
def test_mlp_on_every_mesh_matches_serial(world, mode, m, d, h, bucket_bytes, overlap):
    X, W1, b1, W2, b2, dY = mlp_problem(m, d, h, "float64", seed=4)
    for dp, shape in mesh_shapes(world.size):
        if mode != "tile2d" and shape[0] > 1:
            continue  # the 1D modes ignore the grid's shape (tests/test_sequence.py)
        with tpmpi.Mesh(world.comm, dp=dp, tp=shape) as mesh:
            grid = mesh.tp
            mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode)
            model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=bucket_bytes, overlap=overlap)
            count = counting(model)
            (Y, dX, dW1, db1, dW2, db2), rows = dp_reference(X, W1, b1, W2, b2, dY, dp,
                                                             mesh.dp_rank)
            lay = mlp.layouts.x  # = y's
            y = model(tpmpi.scatter(X[rows], grid, lay))
            assert rel_err(y, tpmpi.scatter(Y, grid, lay)) <= 1e-12
            for step in (1, 2):  # gradients accumulate
                dx = model.backward(tpmpi.scatter(dY[rows], grid, lay))
                assert rel_err(dx, tpmpi.scatter(dX, grid, lay)) <= 1e-12
                for layer, dW, db in ((mlp.fc1, dW1, db1), (mlp.fc2, dW2, db2)):
                    assert rel_err(layer.grad_weight, step * dW[layer.shard]) <= 1e-12
                    assert rel_err(layer.grad_bias, step * db[layer.bias_slice]) <= 1e-12
            # every replica holds the same averaged gradients
            assert len({g.tobytes() for g in mesh.dp_comm.allgather(mlp.fc1.grad_weight)}) == 1
            calls = count.calls.get("allreduce", 0)
            assert calls == (0 if dp == 1 else 2 * len(model.buckets))
            model.zero_grad()
            assert not any(g.any() for _, _, g in model.parameters())


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["column", "row", "tile2d"])
def test_single_layers(world, kind):
    m, k, n = 7, 5, 3
    X, W, b, dY = linear_problem(m, k, n, seed=6)
    for dp, shape in mesh_shapes(world.size):
        if kind != "tile2d" and shape[0] > 1:
            continue
        with tpmpi.Mesh(world.comm, dp=dp, tp=shape) as mesh:
            cls = {"column": tpmpi.ColumnParallelLinear, "row": tpmpi.RowParallelLinear,
                   "tile2d": tpmpi.TileParallelLinear}[kind]
            layer = cls.from_dense(W, b, grid=mesh.tp)
            model = tpmpi.DataParallel(layer, mesh, bucket_bytes=1)
            lay = "tiles" if kind == "tile2d" else "replicated"
            a, z = block_partition(m, dp)[mesh.dp_rank]
            model(tpmpi.scatter(X[a:z], mesh.tp, lay))
            model.backward(tpmpi.scatter(dY[a:z], mesh.tp, lay))
            grads = [sum(X[p:q].T @ dY[p:q] for p, q in block_partition(m, dp)) / dp,
                     sum(dY[p:q].sum(0) for p, q in block_partition(m, dp)) / dp]
            assert rel_err(layer.grad_weight, grads[0][layer.shard]) <= 1e-12
            assert rel_err(layer.grad_bias, grads[1][layer.bias_slice]) <= 1e-12


@pytest.mark.mpi
def test_dp1_is_the_module_alone(world):
    """DP=1: bitwise the module's own gradients, no DP collective."""
    X, W1, b1, W2, b2, dY = mlp_problem(6, 3, 7, "float32")
    with tpmpi.Mesh(world.comm) as mesh:
        plain = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=mesh.tp)
        wrapped = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=mesh.tp)
        model = tpmpi.DataParallel(wrapped, mesh)
        count = counting(model)
        assert np.array_equal(model(X), plain(X))
        assert np.array_equal(model.backward(dY), plain.backward(dY))
        for (_, _, g), (_, _, h) in zip(plain.parameters(), wrapped.parameters()):
            assert np.array_equal(g, h)
        assert count.calls == {}


def test_buckets_are_views_in_backward_order():
    from mpi4py import MPI

    with tpmpi.Mesh(MPI.COMM_SELF) as mesh:
        mlp = tpmpi.ParallelMLP(3, 5, grid=mesh.tp, dtype="float64")
        mlp.fc1.grad_weight[...] = 7.0
        model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=1)
        names = [[(layer is mlp.fc1, name) for layer, name, _ in b.entries]
                 for b in model.buckets]
        assert names == [[(False, "grad_bias")], [(False, "grad_weight")],
                         [(True, "grad_bias")], [(True, "grad_weight")]]
        assert np.all(mlp.fc1.grad_weight == 7.0)  # values kept when moved into the bucket
        for bucket in model.buckets:
            for layer, name, view in bucket.entries:
                assert getattr(layer, name) is view and np.shares_memory(view, bucket.buffer)
        # bias 24 B + weight 120 B (fc2), bias 40 B + weight 120 B (fc1): buckets of >= 32 bytes
        model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=32)
        assert [len(b.entries) for b in model.buckets] == [2, 1, 1]
        assert model.grad_bytes == (15 + 5 + 15 + 3) * 8
        assert len(tpmpi.DataParallel(mlp, mesh).buckets) == 1


@pytest.mark.mpi
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.world_sizes(2, 4)
def test_fc2_gradients_travel_during_fc1_backward(world, monkeypatch, overlap):
    """With overlap, fc2's buckets start after fc2's backward and before fc1's; fc1's after."""
    events = []
    with tpmpi.Mesh(world.comm, dp=2) as mesh:
        mlp = tpmpi.ParallelMLP(4, 6, grid=mesh.tp, dtype="float64")
        model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=1, overlap=overlap)
        real = tmap.iallreduce  # the DP buckets' (not the TP layers') Iallreduces are traced
        monkeypatch.setattr(tmap, "iallreduce", lambda a, comm: (
            events.append(("start", a.size)) if comm is mesh.dp_comm else None) or real(a, comm))
        count = counting(model)
        fc1_backward = mlp.fc1.backward

        def traced(dh):
            events.append("fc1 begins")
            return fc1_backward(dh)
        monkeypatch.setattr(mlp.fc1, "backward", traced)
        y = model(np.ones((3, 4)))
        model.backward(np.ones_like(y))
        sizes = [b.buffer.size for b in model.buckets]
        if overlap:
            assert events == [("start", sizes[0]), ("start", sizes[1]), "fc1 begins",
                              ("start", sizes[2]), ("start", sizes[3])]
        else:
            assert events == ["fc1 begins"]  # blocking Allreduces after backward
        assert count.calls == {"allreduce": 4}


@pytest.mark.mpi
def test_errors_on_every_rank(world):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    dp = size if size > 1 else 1
    with tpmpi.Mesh(comm, dp=dp) as mesh:
        mlp = tpmpi.ParallelMLP(3, 4, grid=mesh.tp, dtype="float64")
        all_ranks_raise(comm, lambda: tpmpi.DataParallel(mlp, mesh, bucket_bytes=0),
                        "bucket_bytes=0: expected a positive integer")
        other = tpmpi.ProcessGrid(comm)
        if size > 1:
            wrong = tpmpi.ParallelMLP(3, 4, grid=other)
            all_ranks_raise(comm, lambda: tpmpi.DataParallel(wrong, mesh),
                            r"expected the mesh's TP grid \(mesh.tp, 1x1\)")
            # replicas that built different modules
            odd = tpmpi.ParallelMLP(3, 4 + (rank == size - 1), grid=mesh.tp)
            all_ranks_raise(comm, lambda: tpmpi.DataParallel(odd, mesh),
                            f"the replicas' gradients differ .*DP ranks \\[{size - 1}\\]")
        all_ranks_raise(comm, lambda: tpmpi.DataParallel(mlp, other),
                        "mesh is a ProcessGrid: expected a tpmpi.Mesh")
        # a module found through the module protocol only (children()), on every rank
        all_ranks_raise(comm, lambda: tpmpi.DataParallel({} if rank == size - 1 else mlp, mesh),
                        "module: dict is not a tpmpi layer or composite")
        other.free()
        model = tpmpi.DataParallel(mlp, mesh)
        all_ranks_raise(comm, lambda: model.backward(np.ones((2, 3))),
                        r"backward\(\) called before forward")
        if size > 1:  # a bad input on one replica only: every rank of the mesh raises
            x = np.ones((2, 3 + (rank == 0)))
            all_ranks_raise(comm, lambda: model(x), r"x.shape=\(2, 4\): expected 3 columns")
        model(np.ones((2, 3)))
        dy = np.ones((2 + (rank == size - 1), 3))
        all_ranks_raise(comm, lambda: model.backward(dy),
                        r"dy.shape=\(3, 3\) dtype=float64: expected \(2, 3\) float64")


def _faulty_replica(world, **options):
    """A dp=2 mesh (TP = the rest), an MLP wrapped in DataParallel after one forward and
    backward, and whether this rank is the last (the one that misbehaves)."""
    mesh = tpmpi.Mesh(world.comm, dp=2)
    mlp = tpmpi.ParallelMLP(4, 6, grid=mesh.tp, dtype="float64", **options)
    model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=1)
    y = model(np.ones((3, 4)))
    model.backward(np.ones_like(y))
    return mesh, mlp, model, world.comm.Get_rank() == world.size - 1


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.world_sizes(2, 4)
def test_a_fault_on_one_replica_raises_on_every_rank(world, overlap):
    """NaN in dy on one rank (check_finite): its TP group raises inside the module's backward
    while the other replica has started its bucket Iallreduces; every rank of the mesh ends
    with the same ValueError, and the model works again afterwards."""
    mesh, mlp, model, odd = _faulty_replica(world, check_finite=True)
    model.overlap = model.allreduce_grads.overlap = overlap
    x = np.ones((3, 4))
    y = model(x)
    dy = np.ones_like(y)
    dy[0, 0] = np.nan if odd else 1.0
    all_ranks_raise(world.comm, lambda: model.backward(dy),
                    rf"in the TP group of DP replica 1: dy has 1 non-finite value\(s\) .*"
                    rf"\(ranks? {world.size // 2 if world.size > 2 else 1}.*\)")
    model.zero_grad()
    model(x)
    model.backward(np.ones_like(y))  # in step again
    assert len({g.tobytes() for g in mesh.dp_comm.allgather(mlp.fc1.grad_weight)}) == 1
    mesh.free()


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.world_sizes(2, 4)
@pytest.mark.parametrize("fault", ["replicated dy differs", "gradient re-assigned"])
def test_a_fault_on_one_rank_raises_everywhere(world, fault):
    """A replicated dy that differs inside one TP group (check_replicated; a TP group of 2
    needs 4 ranks), a grad_weight re-assigned on one rank: the same error on every rank."""
    if fault == "replicated dy differs" and world.size < 4:
        pytest.skip("needs two replicas of two TP ranks")
    mesh, mlp, model, odd = _faulty_replica(world, check_replicated=fault != "gradient "
                                                                         "re-assigned")
    dy = np.ones_like(model(np.ones((3, 4))))
    if fault == "replicated dy differs":
        dy += odd
        match = r"dy differs across ranks: checksum .* dy must be replicated"
    else:
        if odd:
            mlp.fc1.grad_weight = np.zeros_like(mlp.fc1.grad_weight)
        match = r"ColumnParallelLinear.grad_weight was re-assigned: DataParallel averages"
    all_ranks_raise(world.comm, lambda: model.backward(dy), match)
    mesh.free()


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.world_sizes(2, 4)
def test_backward_twice_on_one_rank_while_the_others_go_on(world):
    """The agreements over the mesh come first in every DataParallel call, so a rank in
    backward and ranks in the next forward meet in the same agreement."""
    mesh, _, model, odd = _faulty_replica(world)
    x = np.ones((3, 4))
    all_ranks_raise(world.comm, lambda: model.backward(np.ones((3, 4))) if odd else model(x),
                    rf"call differs across ranks: DataParallel forward on ranks? [\d,]+ and "
                    rf"DataParallel backward on rank {world.size - 1};")
    mesh.free()


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_replicas_built_differently_are_refused_at_wrap_time(world):
    comm, odd = world.comm, world.comm.Get_rank() == world.size - 1
    mesh = tpmpi.Mesh(comm, dp=2)
    seeded = tpmpi.ParallelMLP(3, 5, grid=mesh.tp, seed=mesh.dp_rank)
    all_ranks_raise(comm, lambda: tpmpi.DataParallel(seeded, mesh),
                    r"DataParallel: the replicas' parameters differ from DP rank 0's \(fc1.weight"
                    r" differs on DP rank\(s\) 1; .*build them with the same seed")
    W1, W2 = np.ones((3, 5)), np.ones((5, 3))
    W2 += 1e-7 * odd
    dense = tpmpi.ParallelMLP.from_dense(W1, None, W2, None, grid=mesh.tp)
    msg = all_ranks_raise(comm, lambda: tpmpi.DataParallel(dense, mesh),
                          r"the replicas' parameters differ from DP rank 0's \(fc2.weight "
                          r"differs on DP rank\(s\) 1\)")
    assert "fc1" not in msg
    same = tpmpi.ParallelMLP(3, 5, grid=mesh.tp, seed=3)
    tpmpi.DataParallel(same, mesh)
    mesh.free()
