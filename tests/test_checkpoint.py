"""Checkpoints: MPI-IO .npy files readable by numpy.load, re-sharded onto any grid, and every
damage (truncation, corruption, missing file, wrong class or shape) reported on every rank."""
import json
import os
import shutil

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise
from problems import draw
from tpmpi.core.grid import factorisations
from tpmpi.layers.base import ParallelLinear
from tpmpi.core.layout import LinearLayouts


class TileLayer(ParallelLinear):
    """Parameters only: a tile-layout weight and a replicated bias (layout coverage)."""

    @classmethod
    def layouts_for(cls, **options):
        return LinearLayouts(x="tiles", y="tiles", weight="tiles", bias="replicated",
                             x_local="tiles", y_local="tiles")


class Composite(tpmpi.layers.Composite):
    """Two sub-layers, as ParallelMLP holds fc1/fc2."""

    def __init__(self, W1, b1, W2, grid):
        self.grid = grid
        self.fc1 = tpmpi.ColumnParallelLinear.from_dense(W1, b1, grid=grid, gather_output=False)
        self.fc2 = TileLayer.from_dense(W2, None, grid=grid)

    def children(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]


def npy(path, name):
    """The committed .npy file of parameter ``name`` (the manifest names it)."""
    with open(os.path.join(path, "manifest.json")) as f:
        return os.path.join(path, json.load(f)["parameters"][name]["file"])


def dense(k, n, seed, dtype="float64"):
    """W (k, n) and b (n,) of a layer."""
    return tuple(draw([(k, n), (n,)], dtype, seed))


@pytest.mark.mpi
@pytest.mark.parametrize("k,n", [(5, 7), (0, 3)])  # (0, 3): empty shards at P=4
def test_roundtrip_any_grid(world, shared_tmp, k, n):
    path = str(shared_tmp)
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
def test_composite_dtype_cast_and_options(world, grid, shared_tmp):
    path = str(shared_tmp)
    W1, b1 = dense(4, 6, 1)
    W2, _ = dense(6, 5, 2)
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


@pytest.mark.mpi
def test_damage_is_reported_on_every_rank(world, grid, shared_tmp):
    comm, rank = world.comm, world.comm.Get_rank()
    path = str(shared_tmp)
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


@pytest.mark.mpi
def test_failed_save_keeps_previous_checkpoint(world, grid, shared_tmp, monkeypatch):
    """A crash after the data files are written (before the commit) keeps the old checkpoint."""
    path = str(shared_tmp)
    W, b = dense(3, 4, 5)
    tpmpi.save_checkpoint(path, tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid))
    import tpmpi.checkpoint.save as ck

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


@pytest.mark.mpi
def test_every_layer_class_reshards_across_world_sizes(world, shared_tmp):
    """Row, tile2d and MLP layers saved on P ranks load on P-1 ranks (another grid shape)."""
    from mpi4py import MPI

    comm = world.comm
    path = str(shared_tmp)
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


@pytest.mark.mpi
def test_bfloat16_checkpoint_is_a_standard_npy_and_loads(grid, shared_tmp):
    """bfloat16 parameters are stored as their bit pattern ('<u2'), which numpy.load reads;
    .view(ml_dtypes.bfloat16) gives the values back, and load_checkpoint restores them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    path = str(shared_tmp)
    W, b = dense(5, 7, seed=11, dtype="float32")
    Wb, bb = W.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    tpmpi.save_checkpoint(path, tpmpi.ColumnParallelLinear.from_dense(Wb, bb, grid=grid))
    raw = np.load(npy(path, "weight"))
    assert raw.dtype == np.dtype("<u2")
    assert np.array_equal(raw.view(ml_dtypes.bfloat16).astype(np.float32),
                          Wb.astype(np.float32))
    with open(os.path.join(path, "manifest.json")) as f:
        entry = json.load(f)["parameters"]["weight"]
    assert (entry["dtype"], entry["npy_dtype"]) == ("bfloat16", "<u2")
    layer = tpmpi.ColumnParallelLinear.load_checkpoint(path, grid=grid)
    assert layer.dtype.name == "bfloat16"
    assert np.array_equal(layer.gather_weight().astype(np.float32), Wb.astype(np.float32))
    wide = tpmpi.ColumnParallelLinear.load_checkpoint(path, grid=grid, dtype="float32")
    assert np.array_equal(wide.gather_bias(), bb.astype(np.float32))


def write_format1(path, W, b, bf16=False):
    """A format-1 checkpoint as tpmpi 0.1.0 wrote it: files beside the manifest (bfloat16 as
    '|V2'). Serial (rank 0)."""
    from mpi4py import MPI

    from tpmpi.checkpoint import manifest as ckmanifest
    from tpmpi.checkpoint import npyfile

    entries = {}
    for name, a in (("weight", W), ("bias", b)):
        filename = os.path.join(path, f"{name}.npy")
        with open(filename, "wb") as f:
            descr = "|V2" if bf16 else np.lib.format.dtype_to_descr(a.dtype)
            np.lib.format.write_array_header_1_0(
                f, {"descr": descr, "fortran_order": False, "shape": a.shape})
            header_bytes = f.tell()
            f.write(np.ascontiguousarray(a).tobytes())
        value = npyfile.checksum(MPI.COMM_SELF, filename, header_bytes, a.nbytes)
        entries[name] = {"file": f"{name}.npy", "shape": list(a.shape), "dtype": a.dtype.name,
                         "layout": "cols", "header_bytes": header_bytes,
                         "checksum": {"algorithm": npyfile.CHECKSUM,
                                      "chunk_bytes": npyfile.CHUNK_BYTES, "value": value}}
    manifest = {"format": ckmanifest.FORMAT, "format_version": 1, "tpmpi_version": "0.1.0",
                "class": "ColumnParallelLinear",
                "config": {"in_features": W.shape[0], "out_features": W.shape[1], "bias": True,
                           "dtype": W.dtype.name, "seed": 0, "check_finite": False,
                           "gather_output": True, "chunks": 1},
                "layers": {"": "ColumnParallelLinear"}, "grid": [1, 1], "world_size": 1,
                "parameters": entries}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


@pytest.mark.mpi
def test_format_1_checkpoints_load_and_are_replaced_whole(world, shared_tmp):
    """A checkpoint written by the previous format (bfloat16 as '|V2' too) still loads; saving
    over it commits the new format and removes the old files."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    comm, rank = world.comm, world.comm.Get_rank()
    path = str(shared_tmp)
    W, b = dense(4, 6, seed=12, dtype="float32")
    for bf16 in (False, True):
        Wd, bd = (W.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)) if bf16 else (W, b)
        if rank == 0:
            write_format1(path, Wd, bd, bf16=bf16)
        comm.Barrier()
        with tpmpi.ProcessGrid(comm) as grid:
            layer = tpmpi.ColumnParallelLinear.load_checkpoint(path, grid=grid)
            assert np.array_equal(layer.gather_weight().astype(np.float32),
                                  Wd.astype(np.float32))
            tpmpi.save_checkpoint(path, layer)
            if rank == 0:
                assert sorted(os.listdir(path)) == ["manifest.json", "v000001"]
            again = tpmpi.ColumnParallelLinear.load_checkpoint(path, grid=grid)
            assert np.array_equal(again.gather_bias().astype(np.float32), bd.astype(np.float32))
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(path)
            os.mkdir(path)
        comm.Barrier()


@pytest.mark.mpi
def test_saves_keep_one_version_and_clean_what_crashes_left(world, grid, shared_tmp):
    """Each save commits a new version directory and removes the previous one; leftovers of a
    crashed save (an uncommitted version directory, *.tmp-* files, a dead holder's lock) are
    removed by the next save; files that are not the checkpoint's are left alone."""
    comm, rank = world.comm, world.comm.Get_rank()
    path = str(shared_tmp)
    W, b = dense(3, 5, seed=13)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    tpmpi.save_checkpoint(path, layer)
    tpmpi.save_checkpoint(path, layer)
    if rank == 0:
        assert sorted(os.listdir(path)) == ["manifest.json", "v000002"]
        os.mkdir(os.path.join(path, "v000003"))  # a crash after creating the next version
        with open(os.path.join(path, "v000003", "weight.npy"), "wb") as f:
            f.write(b"partial")
        open(os.path.join(path, ".manifest.json.tmp-dead"), "w").close()
        open(os.path.join(path, "notes.txt"), "w").close()  # the user's
        with open(os.path.join(path, ".lock"), "w") as f:  # a dead process's lock
            json.dump({"pid": 2**22 + 12345, "host": os.uname().nodename, "since": "-"}, f)
    comm.Barrier()
    assert np.array_equal(tpmpi.load_checkpoint(path, grid=grid).gather_weight(), W)
    tpmpi.save_checkpoint(path, tpmpi.ColumnParallelLinear.from_dense(2 * W, b, grid=grid))
    if rank == 0:
        assert sorted(os.listdir(path)) == ["manifest.json", "notes.txt", "v000003"]
    assert np.array_equal(tpmpi.load_checkpoint(path, grid=grid).gather_weight(), 2 * W)


@pytest.mark.mpi
def test_a_live_lock_refuses_the_save_and_an_old_one_is_taken_over(world, grid, shared_tmp,
                                                                  monkeypatch):
    import tpmpi.checkpoint.lock as ck

    comm, rank = world.comm, world.comm.Get_rank()
    path = str(shared_tmp)
    W, b = dense(3, 5, seed=14)
    lock = os.path.join(path, ".lock")
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    tpmpi.save_checkpoint(path, layer)
    if rank == 0:  # held by a live process of another host: nothing says it is stale
        with open(lock, "w") as f:
            json.dump({"pid": os.getpid(), "host": "elsewhere", "since": "t0"}, f)
    comm.Barrier()
    all_ranks_raise(comm, lambda: tpmpi.save_checkpoint(path, layer),
                    r"is being saved by another job \(pid \d+ on elsewhere since t0\); "
                    r"concurrent saves to one path are refused: wait for it, or remove "
                    r".*\.lock if no save is running")
    if rank == 0:
        assert os.path.exists(lock)  # not ours to remove
    monkeypatch.setattr(ck, "LOCK_STALE_S", 0.0)  # its heartbeat is now too old
    tpmpi.save_checkpoint(path, layer)
    if rank == 0:
        assert not os.path.exists(lock)


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_load_arguments_are_agreed(world, grid, shared_tmp):
    """One rank's different path/cls/verify/into/options is reported on every rank instead
    of mixing checkpoints or crashing MPI (tested in full by scripts/bad_inputs.py)."""
    comm, rank = world.comm, world.comm.Get_rank()
    path = str(shared_tmp)
    W, b = dense(3, 5, seed=15)
    tpmpi.save_checkpoint(os.path.join(path, "a"), tpmpi.ColumnParallelLinear.from_dense(
        W, b, grid=grid))
    tpmpi.save_checkpoint(os.path.join(path, "b"), tpmpi.ColumnParallelLinear.from_dense(
        2 * W, b, grid=grid))
    all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(
        os.path.join(path, "b" if rank == 1 else "a"), grid=grid), "path differs")
    all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(
        os.path.join(path, "a"), grid=grid, verify=rank != 1), "verify differs")
    twin = tpmpi.ColumnParallelLinear(3, 5, grid=grid)
    all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(
        os.path.join(path, "a"), grid=grid, into=twin if rank == 1 else None),
        "into differs")
    layer = tpmpi.load_checkpoint(os.path.join(path, "a"), grid=grid)  # still in step
    assert np.array_equal(layer.gather_weight(), W)


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_every_rank_of_a_mesh_saves_and_loads_with_optimizer_state(world, shared_tmp):
    """dp=2 x tp=P/2: every rank calls save_checkpoint (on the DataParallel or on the module),
    again and again: replica 0 writes, nobody is refused; the parameters and the state arrays
    (m = 2 W, v = W**2 per shard) load re-sharded onto the 1D grid of all P ranks and into a
    DataParallel on the mesh."""
    comm, path = world.comm, str(shared_tmp / "ckpt")
    W1, b1 = dense(3, 5, seed=1)
    W2, b2 = dense(5, 3, seed=2)
    mesh = tpmpi.Mesh(comm, dp=2)
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=mesh.tp)
    model = tpmpi.DataParallel(mlp, mesh)

    def state_of(module):
        params = {name: p for name, p, _ in module.parameters()}
        return {"adam.m": {n: 2 * p for n, p in params.items()},
                "adam.v": {n: p ** 2 for n, p in params.items()}}

    for target in (model, mlp, model):
        tpmpi.save_checkpoint(path, target, state=state_of(mlp), meta={"step": 7})
    if comm.Get_rank() == 0:
        assert sorted(os.listdir(path)) == ["manifest.json", "v000003"]
        assert np.array_equal(np.load(npy(path, "fc2.weight")), W2)
    comm.Barrier()
    with tpmpi.ProcessGrid(comm) as grid:
        fresh = tpmpi.ParallelMLP(3, 5, grid=grid, seed=9, dtype="float64")
        state = {g: {n: np.zeros_like(p) for n, p, _ in fresh.parameters()}
                 for g in ("adam.m", "adam.v")}
        meta = {}
        tpmpi.load_checkpoint(path, into=fresh, state=state, meta=meta)
        assert meta == {"step": 7}
        for name, p, _ in fresh.parameters():
            assert np.array_equal(state["adam.m"][name], 2 * p)
            assert np.array_equal(state["adam.v"][name], p ** 2)
        assert np.array_equal(fresh.fc1.gather_weight(), W1)
        all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(
            path, into=fresh, state={"sgd.m": {"fc1.weight": fresh.fc1.weight}}),
            r"holds no state 'sgd.m' of fc1.weight \(its state: adam.m \(fc1.weight, ")
        all_ranks_raise(comm, lambda: tpmpi.load_checkpoint(
            path, into=fresh, state={"adam.m": {"fc1.weight": np.zeros(2)}}),
            r"state\['adam.m'\]\['fc1.weight'\] is a ndarray of shape \(2,\) and dtype float64: "
            r"expected a ndarray of the parameter's local shape")
    twin = tpmpi.DataParallel(tpmpi.ParallelMLP(3, 5, grid=mesh.tp, seed=9, dtype="float64"),
                               mesh)
    tpmpi.load_checkpoint(path, into=twin)
    assert np.array_equal(twin.module.fc2.gather_weight(), W2)
    mesh.free()


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_replicas_that_differ_are_not_saved(world, shared_tmp):
    comm = world.comm
    mesh = tpmpi.Mesh(comm, dp=2)
    mlp = tpmpi.ParallelMLP(3, 5, grid=mesh.tp, seed=mesh.dp_rank)  # another seed per replica
    all_ranks_raise(comm, lambda: tpmpi.save_checkpoint(str(shared_tmp), mlp),
                    r"the data-parallel replicas hold different values of fc1.weight \(replica"
                    r"\(s\) [01] differ from replica [01]\): save_checkpoint writes replica 0's")
    mesh.free()


@pytest.mark.mpi
def test_a_lock_that_is_a_directory_is_named(world, grid, shared_tmp):
    path = str(shared_tmp / "ckpt")
    if world.comm.Get_rank() == 0:
        os.makedirs(os.path.join(path, ".lock", "inside"))
    world.comm.Barrier()
    layer = tpmpi.ColumnParallelLinear(3, 4, grid=grid)
    all_ranks_raise(world.comm, lambda: tpmpi.save_checkpoint(path, layer),
                    rf"checkpoint '{path}': {path}/.lock is a directory, not a tpmpi save lock "
                    r"\(a regular file\): tpmpi does not remove what it did not create; remove "
                    r"it yourself if no save to this path is running")
