"""Sequence parallelism and DataParallel on the host-staging path (a GPU without GPU-aware MPI),
run on a CPU with tests/fake_device.py's FakeDevice: same results, the staged branch taken."""
import numpy as np
import pytest

import tpmpi
from conftest import counting, rel_err
from fake_device import FakeDevice
from problems import mlp_problem, mlp_reference
from tpmpi.core.mappings import MAPPINGS
from tpmpi.core.staging import Staging


@pytest.mark.mpi
@pytest.mark.parametrize("cls", MAPPINGS, ids=lambda c: c.__name__)
def test_operators_run_blocking_after_the_work_when_staged(world, cls):
    """Under staging ``during`` runs its work first, then the blocking form through the
    pinned buffers (nothing is staged before the work); the result equals the direct,
    non-blocking path's (to the last bits for sums)."""
    comm, rank = world.comm, world.comm.Get_rank()
    dev = FakeDevice()
    x = np.random.default_rng(rank).standard_normal((5, 6))
    size = 5 if "Rows" in cls.__name__ else 6
    if cls.__name__ == "GatherRows":
        a, b = tpmpi.block_partition(5, world.size)[rank]
        x = x[a:b].copy()
    if cls.__name__ == "GatherCols":
        a, b = tpmpi.block_partition(6, world.size)[rank]
        x = np.ascontiguousarray(x[:, a:b])
    staged, direct = cls(comm, Staging(dev)), cls(comm)
    xs, xd = x.copy(), x.copy()
    seen = []
    out_s = staged.during(xs, lambda: seen.append(dict(dev.counts)), size)
    assert seen == [{}]  # the work ran before anything was staged
    out_d = direct.during(xd, lambda: None, size)
    # blocking and non-blocking reductions may add in another order (Open MPI at 3 ranks)
    assert np.allclose(out_s, out_d, rtol=1e-14, atol=1e-14)
    if cls.op is not None and world.size > 1:
        assert dev.counts["to_host"] >= 1 and dev.counts["from_host"] >= 1


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["sequence", "megatron"])
def test_sequence_mlp_and_data_parallel_through_staging(world, mode):
    X, W1, b1, W2, b2, dY = mlp_problem(7, 3, 5, "float64", seed=8)
    dp = 2 if world.size % 2 == 0 else 1
    with tpmpi.Mesh(world.comm, dp=dp) as mesh:
        dev = FakeDevice()
        mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=mesh.tp, mode=mode, backend=dev)
        model = tpmpi.DataParallel(mlp, mesh, bucket_bytes=1)
        count = counting(model)
        assert model.staging.staged
        a, b = tpmpi.block_partition(7, dp)[mesh.dp_rank]
        refs = [mlp_reference(X[p:q], W1, b1, W2, b2, dY[p:q])
                for p, q in tpmpi.block_partition(7, dp)]
        Y, dX = refs[mesh.dp_rank][:2]
        lay = mlp.layouts.x  # = y's
        y = model(tpmpi.scatter(X[a:b], mesh.tp, lay))
        dx = model.backward(tpmpi.scatter(dY[a:b], mesh.tp, lay))
        assert rel_err(y, tpmpi.scatter(Y, mesh.tp, lay)) <= 1e-12
        assert rel_err(dx, tpmpi.scatter(dX, mesh.tp, lay)) <= 1e-12
        mean = [sum(r[i] for r in refs) / dp for i in range(2, 6)]
        for layer, dW, db in ((mlp.fc1, mean[0], mean[1]), (mlp.fc2, mean[2], mean[3])):
            assert rel_err(layer.grad_weight, dW[layer.shard]) <= 1e-12
            assert rel_err(layer.grad_bias, db[layer.bias_slice]) <= 1e-12
        if world.size > 1:
            assert dev.counts["to_host"] > 0 and dev.counts["from_host"] > 0
        if dp > 1:  # blocking DP Allreduces through the staging buffers, all counted
            assert count.calls == {"allreduce": len(model.buckets)}
