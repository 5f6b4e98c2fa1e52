"""Checkpoints: MPI-IO .npy files readable by numpy.load, re-sharded onto any grid, and every
damage (truncation, corruption, missing file, wrong class or shape) reported on every rank."""
import json
import os

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise
from tpmpi.grid import factorisations
from tpmpi.layers.base import ParallelLinear


class TileLayer(ParallelLinear):
    """Parameters only: a tile-layout weight and a replicated bias (layout coverage)."""

    weight_layout = "tiles"
    bias_layout = "replicated"


class Composite:
    """Two sub-layers, as ParallelMLP holds fc1/fc2."""

    def __init__(self, W1, b1, W2, grid):
        self.grid = grid
        self.fc1 = tpmpi.ColumnParallelLinear.from_dense(W1, b1, grid=grid, gather_output=False)
        self.fc2 = TileLayer.from_dense(W2, None, grid=grid)


def npy(path, name):
    """The committed .npy file of parameter ``name`` (the manifest names it)."""
    with open(os.path.join(path, "manifest.json")) as f:
        return os.path.join(path, json.load(f)["parameters"][name]["file"])


def shared_dir(comm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt")) if comm.Get_rank() == 0 else None
    return comm.bcast(path)


def dense(k, n, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, n)).astype(dtype), rng.standard_normal(n).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("k,n", [(5, 7), (0, 3)])  # (0, 3): empty shards at P=4
def test_roundtrip_any_grid(world, tmp_path_factory, k, n):
    if not world.member:
        return
    path = shared_dir(world.comm, tmp_path_factory)
    W, b = dense(k, n, seed=k * 10 + n)
    shapes = factorisations(world.size)
    for i, save_shape in enumerate(shapes):  # load on the next grid shape (itself for P=1)
        with tpmpi.ProcessGrid(world.comm, shape=save_shape) as grid:
            for cls in (tpmpi.ColumnParallelLinear, TileLayer):
                tpmpi.save_checkpoint(path, cls.from_dense(W, b, grid=grid))
                assert np.array_equal(np.load(npy(path, "weight")), W)
                assert np.array_equal(np.load(npy(path, "bias")), b)
                for load_shape in [shapes[(i + 1) % len(shapes)]]:
                    with tpmpi.ProcessGrid(world.comm, shape=load_shape) as g2:
                        layer = cls.load_checkpoint(path, grid=g2)
                        assert type(layer) is cls and layer.grid is g2
                        assert np.array_equal(layer.weight, W[layer.shard])
                        assert np.array_equal(layer.bias, b[layer.bias_slice])
                        if world.comm.Get_rank() == 0:
                            assert not [f for f in os.listdir(path) if ".tmp-" in f]


@pytest.mark.mpi
def test_composite_dtype_cast_and_options(world, tmp_path_factory):
    if not world.member:
        return
    path = shared_dir(world.comm, tmp_path_factory)
    W1, b1 = dense(4, 6, 1)
    W2, _ = dense(6, 5, 2)
    grid = tpmpi.ProcessGrid(world.comm)
    tpmpi.save_checkpoint(path, Composite(W1, b1, W2, grid))
    assert sorted(os.listdir(path)) == ["manifest.json", "v000001"]
    assert sorted(os.listdir(os.path.join(path, "v000001"))) == [
        "fc1.bias.npy", "fc1.weight.npy", "fc2.weight.npy"]
    for shape in factorisations(world.size):
        with tpmpi.ProcessGrid(world.comm, shape=shape) as g2:
            target = Composite(0 * W1, 0 * b1, 0 * W2, g2)
            tpmpi.load_checkpoint(path, into=target)
            assert np.array_equal(target.fc1.gather_weight(), W1)
            assert np.array_equal(target.fc2.gather_weight(), W2)
            assert np.array_equal(target.fc1.gather_bias(), b1)
    single = os.path.join(path, "single")
    tpmpi.save_checkpoint(single, tpmpi.ColumnParallelLinear.from_dense(W1, b1, grid=grid))
    layer = tpmpi.load_checkpoint(single, grid=grid, dtype="float32", gather_output=False)
    assert layer.dtype == np.float32 and not layer.gather_output
    assert np.array_equal(layer.gather_weight(), W1.astype(np.float32))
    grid.free()


@pytest.mark.mpi
def test_damage_is_reported_on_every_rank(world, tmp_path_factory):
    if not world.member:
        return
    comm, rank = world.comm, world.comm.Get_rank()
    path = shared_dir(comm, tmp_path_factory)
    grid = tpmpi.ProcessGrid(comm)
    W, b = dense(6, 5, 3)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    Col = tpmpi.ColumnParallelLinear

    def damage(fn):
        tpmpi.save_checkpoint(path, layer)
        if rank == 0:
            fn(npy(path, "weight"))
        comm.Barrier()

    all_ranks_raise(comm, lambda: Col.load_checkpoint(os.path.join(path, "nope"), grid=grid),
                    "manifest.json is missing")
    damage(lambda f: os.truncate(f, os.path.getsize(f) - 3))
    all_ranks_raise(comm, lambda: Col.load_checkpoint(path, grid=grid),
                    r"weight.npy is truncated: \d+ bytes, expected")

    def flip(f):
        with open(f, "r+b") as fh:
            fh.seek(-5, 2)
            byte = fh.read(1)
            fh.seek(-5, 2)
            fh.write(bytes([byte[0] ^ 1]))

    damage(flip)
    all_ranks_raise(comm, lambda: Col.load_checkpoint(path, grid=grid),
                    "weight.npy is corrupted")
    def junk_header(f):
        with open(f, "r+b") as fh:
            fh.write(b"JUNK")

    damage(junk_header)
    all_ranks_raise(comm, lambda: Col.load_checkpoint(path, grid=grid), "corrupted .npy header")
    damage(os.remove)
    all_ranks_raise(comm, lambda: Col.load_checkpoint(path, grid=grid),
                    r"parameter weight file v\d+/weight.npy is missing")
    tpmpi.save_checkpoint(path, layer)
    all_ranks_raise(comm, lambda: TileLayer.load_checkpoint(path, grid=grid),
                    "holds a ColumnParallelLinear, not a TileLayer")
    all_ranks_raise(comm, lambda: Col.load_checkpoint(path, grid=grid, out_features=4),
                    "do not match the layer's")
    other = Col(6, 4, grid=grid)
    all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(path, into=other), "do not match")
    grid.free()


@pytest.mark.mpi
def test_failed_save_keeps_previous_checkpoint(world, tmp_path_factory, monkeypatch):
    """A crash after the data files are written (before the commit) keeps the old checkpoint."""
    if not world.member:
        return
    path = shared_dir(world.comm, tmp_path_factory)
    grid = tpmpi.ProcessGrid(world.comm)
    W, b = dense(3, 4, 5)
    tpmpi.save_checkpoint(path, tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid))
    import tpmpi.checkpoint as ck

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ck, "checksum", crash)
    all_ranks_raise(world.comm, lambda: tpmpi.save_checkpoint(
        path, tpmpi.ColumnParallelLinear.from_dense(2 * W, b, grid=grid)),
        r"save_checkpoint\(.*\) failed: RuntimeError: simulated crash")
    monkeypatch.undo()
    world.comm.Barrier()
    layer = tpmpi.ColumnParallelLinear.load_checkpoint(path, grid=grid)
    assert np.array_equal(layer.gather_weight(), W)
    if world.comm.Get_rank() == 0:  # the failed version is gone, the lock released
        assert sorted(os.listdir(path)) == ["manifest.json", "v000001"]
    grid.free()


@pytest.mark.mpi
def test_every_layer_class_reshards_across_world_sizes(world, tmp_path_factory):
    """Row, tile2d and MLP layers saved on P ranks load on P-1 ranks (another grid shape)."""
    if not world.member:
        return
    from mpi4py import MPI

    comm = world.comm
    path = shared_dir(comm, tmp_path_factory)
    W, b = dense(7, 5, seed=3)
    W2, b2 = dense(5, 7, seed=4)
    makers = {
        "row": lambda g: tpmpi.RowParallelLinear.from_dense(W, b, grid=g),
        "tile": lambda g: tpmpi.TileParallelLinear.from_dense(W, b, grid=g, panel=2),
        "mlp": lambda g: tpmpi.ParallelMLP.from_dense(W, b, W2, b2, grid=g, mode="book"),
    }
    smaller = max(1, comm.Get_size() - 1)
    sub = comm.Split(0 if comm.Get_rank() < smaller else MPI.UNDEFINED, comm.Get_rank())
    for name, make in makers.items():
        with tpmpi.ProcessGrid(comm, shape=factorisations(comm.Get_size())[-1]) as grid:
            saved = make(grid)
            tpmpi.save_checkpoint(os.path.join(path, name), saved)
        if sub != MPI.COMM_NULL:
            with tpmpi.ProcessGrid(sub, shape=factorisations(smaller)[0]) as g2:
                loaded = type(saved).load_checkpoint(os.path.join(path, name), grid=g2)
                assert type(loaded) is type(saved)
                layers = [loaded.fc1, loaded.fc2] if name == "mlp" else [loaded]
                dense_of = [(W, b), (W2, b2)] if name == "mlp" else [(W, b)]
                for layer, (Wd, bd) in zip(layers, dense_of):
                    assert np.array_equal(layer.weight, Wd[layer.shard])
                    assert np.array_equal(layer.bias, bd[layer.bias_slice])
                if name == "mlp":
                    assert loaded.mode == "book" and loaded.activation == saved.activation
        comm.Barrier()
    if sub != MPI.COMM_NULL:
        sub.Free()
