"""run/bench/plan with --dp and --sequence-parallel: records carry the mesh and the DP traffic,
every scheme verifies on a mesh (DP averaging included), usage errors exit 2 everywhere."""
import pytest

from conftest import read_records
from tpmpi.cli import main
from tpmpi.core.mesh import mesh_shapes
from tpmpi.studies.sweep import configs


@pytest.mark.mpi
@pytest.mark.parametrize("scheme,extra", [
    ("mlp", ["--sequence-parallel"]), ("mlp", ["--mode", "book"]), ("mlp", ["--mode", "tile2d"]),
    ("column", []), ("row", ["--no-overlap"]), ("tile2d", [])])
def test_run_on_every_mesh_verifies(world, shared_tmp, scheme, extra):
    comm, size = world.comm, world.size
    path = str(shared_tmp / "r.jsonl")
    meshes = [(dp, g) for dp, g in mesh_shapes(size)
              if scheme == "tile2d" or "tile2d" in extra or g[0] == 1]
    for dp, (pr, pc) in meshes:
        argv = ["run", "--scheme", scheme, "--m", "9", "--k", "5", "--n", "5", "--hidden", "7",
                "--dtype", "float64", "--backward", "--iters", "2", "--warmup", "1", "--check",
                "--dp", str(dp), "--grid", f"{pr}x{pc}", "--bucket-bytes", "64", "--json",
                path] + extra
        assert main(argv, comm) == 0, argv
    comm.Barrier()
    if comm.Get_rank() == 0:
        recs = read_records(path)
        assert [(r["mesh"]["dp"], r["grid"]) for r in recs] == \
            [(dp, f"{pr}x{pc}") for dp, (pr, pc) in meshes]
        for rec, (dp, _) in zip(recs, meshes):
            assert rec["ranks"] == size and rec["m"] == 9 and rec["max_rel_err"] <= 1e-10
            assert rec["mesh"]["bucket_bytes"] == (64 if dp > 1 else None)
            assert (rec["dp_bytes"] > 0) == (dp > 1) and rec["dp_comm_s"] >= 0
            assert rec["predicted"]["dp"] == dp and rec["predicted_s"] > 0
            if "--sequence-parallel" in extra:
                assert rec["options"]["mode"] == "sequence"


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_verification_catches_a_wrong_dp_average(world, monkeypatch):
    """The DP check of DataParallelCase.verify is not vacuous: skipping the average fails."""
    from tpmpi.core.backend import get_backend
    from tpmpi.layers.data_parallel import DataParallel
    from tpmpi.core.mesh import Mesh
    from tpmpi.studies.schemes import Problem
    from tpmpi.studies.schemes.hybrid import build_case

    backend = get_backend("numpy")
    problem = Problem(scheme="mlp", m=8, k=4, n=4, hidden=6, dtype="float64", backward=True)
    with Mesh(world.comm, dp=2) as mesh:
        case = build_case(problem, mesh, backend)
        case.forward()
        case.backward()
        assert case.verify() <= 1e-12
        monkeypatch.setattr(DataParallel, "allreduce_gradients", lambda self: None)
        assert case.verify() > 1e-3  # the replicas' data differ: local != mean


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_bench_sweeps_dp_and_sp(world, shared_tmp):
    comm, size = world.comm, world.size
    path = str(shared_tmp / "b.jsonl")
    argv = ["bench", "--scheme", "mlp", "--mode", "megatron,sequence", "--m", "8", "--k", "4",
            "--n", "4", "--hidden", "8", "--backward", "--iters", "1", "--warmup", "0",
            "--dp", f"1,{size}", "--ranks", str(size), "--no-baseline", "--json", path]
    assert main(argv, comm) == 0
    comm.Barrier()
    if comm.Get_rank() == 0:
        got = sorted((r["mesh"]["dp"], r["options"].get("mode", "megatron"), r["grid"])
                     for r in read_records(path))
        assert got == sorted([(1, "megatron", f"1x{size}"), (1, "sequence", f"1x{size}"),
                              (size, "megatron", "1x1"), (size, "sequence", "1x1")])
        assert all(r["max_rel_err"] <= 1e-4 for r in read_records(path))


def test_configs_place_dp_replicas_and_tile2d_ffn_grids():
    cfgs = configs("strong", schemes=["mlp"], dims={"m": [8], "k": [4], "n": [4],
                                                    "hidden": [None]},
                   dim="m", sizes=[], ranks=[4], grids=["auto", "1x2", "2x2"],
                   dtypes=["float32"], backward=True,
                   options={"mode": [None, "tile2d"]}, dps=[1, 2, 3])
    got = {(c.dp, c.grid, dict(c.problem.options).get("mode")) for c in cfgs}
    assert got == {(1, (1, 4), None), (2, (1, 2), None), (1, (2, 2), "tile2d"),
                   (2, (1, 2), "tile2d")}


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [
    ["run", "--scheme", "column", "--sequence-parallel"],
    ["run", "--scheme", "mlp", "--mode", "book", "--sequence-parallel"],
    ["run", "--dp", "0"],
    ["bench", "--scheme", "mlp,row", "--sequence-parallel", "--no-baseline"]])
def test_usage_errors(world, argv):
    assert world.comm.allgather(main(argv, world.comm)) == [2] * world.size


@pytest.mark.mpi
def test_bad_mesh_exits_2_naming_the_valid_meshes(world, capsys):
    code = main(["run", "--dp", str(world.size + 1), "--m", "4", "--k", "4", "--n", "4"],
                world.comm)
    assert code == 2
    if world.comm.Get_rank() == 0:
        assert "valid meshes: dp=1" in capsys.readouterr().err


def test_plan_explains_the_first(capsys):
    from mpi4py import MPI

    assert main(["plan", "--m", "512", "--k", "256", "--n", "256", "--hidden", "1024",
                 "--ranks", "4", "--backward", "--bucket-bytes", "4096"], MPI.COMM_SELF) == 0
    out = capsys.readouterr().out
    assert "dp_comm_ms" in out and "mlp 1x2 dp=2 mode=sequence" in out
    assert "mlp 2x2 mode=tile2d" in out and "\nwhy " in out
