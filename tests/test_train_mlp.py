"""scripts/train_mlp.py at a tiny size: the parallel loss curve matches the serial reference on
every dp x tp mesh (sequence parallelism on and off, 2D tile grids), per-rank bytes, errors."""
import pytest

from conftest import all_ranks_raise, load_script, rel_err
from tpmpi.core.mesh import mesh_shapes

train_mlp = load_script("train_mlp")

TINY = ["--samples", "12", "--d-model", "3", "--d-hidden", "5", "--steps", "8", "--quiet"]


def test_serial_run_and_budget_numbers_in_the_epilog():
    from mpi4py import MPI

    out = train_mlp.main(TINY + ["--dtype", "float64"], MPI.COMM_SELF)
    assert out["agree"] and out["max_rel_diff"] <= 1e-12
    assert out["losses"][-1] < out["losses"][0]
    args = train_mlp.build_parser().parse_args([])
    assert train_mlp.rank_need(args, 1) == 529_408  # numbers quoted in EPILOG
    assert train_mlp.rank_need(args, 4) == 133_120
    assert [train_mlp.rank_need(args, p) <= 200_000 for p in (2, 3)] == [False, True]


@pytest.mark.mpi
@pytest.mark.parametrize("extra", [
    ["--dtype", "float64"],
    ["--dtype", "float64", "--mode", "book", "--activation", "gelu_erf", "--optimizer", "sgd",
     "--lr", "0.1"],
    ["--dtype", "float32", "--activation", "relu"],
])
def test_parallel_curve_matches_serial(world, extra):
    out = train_mlp.main(TINY + extra, world.comm)
    assert len(out["losses"]) == 9 and out["agree"]
    if world.comm.Get_rank() == 0:
        tol = 1e-10 if "float64" in extra else 1e-4
        assert rel_err(out["losses"], out["reference"]) <= tol
        assert len(out["rank_weight_bytes"]) == world.size
    # every rank saw the same (replicated) loss
    assert len(set(world.comm.allgather(tuple(out["losses"])))) == 1


@pytest.mark.mpi
def test_budget_refusal_names_the_smallest_p(world):
    # d=3, h=5, float64 adam: 32 bytes/param; rank 0 holds 38, 24, 17, 17 params at P=1..4
    argv = TINY + ["--dtype", "float64", "--max-rank-bytes", str(17 * 32)]
    if world.size >= 3:
        assert train_mlp.main(argv, world.comm)["agree"]
    else:
        need = ["1,216", "768"][world.size - 1]
        all_ranks_raise(world.comm, lambda: train_mlp.main(argv, world.comm),
                        rf"--max-rank-bytes=544: at tp={world.size} a rank needs {need} bytes "
                        r".*the smallest TP group that fits is 3")
    all_ranks_raise(world.comm, lambda: train_mlp.main(["--mode", "2d"], world.comm),
                    "argument --mode: invalid choice")


@pytest.mark.mpi
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_every_mesh_trains_like_serial(world, sp):
    """Every dp x tp of the world size, 1D (with and without --sequence-parallel) and 2D
    (tile2d FFN): the curve matches; the activations per rank shrink by T with SP."""
    comm, size = world.comm, world.size
    specs = [(dp, str(pc), False) for dp, (pr, pc) in mesh_shapes(size) if pr == 1]
    if not sp:  # "RxC", 1xC included, is a 2D grid: the tile2d FFN
        specs += [(dp, f"{pr}x{pc}", True) for dp, (pr, pc) in mesh_shapes(size)]
    for dp, tp, two_d in specs:
        pc = int(tp.split("x")[-1])
        argv = TINY + ["--dtype", "float64", "--dp", str(dp), "--tp", tp, "--bucket-bytes", "8"]
        out = train_mlp.main(argv + (["--sequence-parallel"] if sp else []), comm)
        assert out["agree"], (dp, tp, out["max_rel_diff"])
        assert len(set(comm.allgather(tuple(out["losses"])))) == 1
        if comm.Get_rank() == 0:
            assert rel_err(out["losses"], out["reference"]) <= 1e-10
            sizes = out["rank_bytes"]
            assert len(sizes["weights"]) == size and sizes["weights"] == sizes["gradients"]
            assert sizes["optimizer"] == [2 * w for w in sizes["weights"]]  # Adam: m and v
            assert all(p > 0 for p in sizes["step_peak"])
            if not two_d:  # x + y of the replica's rows (12 / dp of them), 3 columns, 8 bytes
                m = -(-12 // dp)
                rows = -(-m // pc) if sp else m
                assert sizes["activations"][0] == 2 * rows * 3 * 8
        assert (out["dp_bytes"] > 0) == (dp > 1) and out["dp_comm_s"] >= 0


@pytest.mark.mpi
def test_mesh_and_mode_errors(world):
    comm, size = world.comm, world.size
    all_ranks_raise(comm, lambda: train_mlp.main(TINY + ["--dp", str(size + 1)], comm),
                    f"mesh dp={size + 1}: dp must divide the {size} ranks; valid meshes: dp=1")
    all_ranks_raise(comm, lambda: train_mlp.main(TINY + ["--tp", f"1x{size}",
                                                         "--sequence-parallel"], comm),
                    "--sequence-parallel: needs a 1D --tp T")
    all_ranks_raise(comm, lambda: train_mlp.main(TINY + ["--tp", f"{size}x1", "--mode",
                                                         "book"], comm),
                    f"--tp {size}x1: a 2D TP grid runs the tile2d FFN, not --mode book")
    all_ranks_raise(comm, lambda: train_mlp.main(TINY + ["--bucket-bytes", "0"], comm),
                    "--bucket-bytes=0: expected a positive integer")


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_overlap_measurement_is_printed(world, capsys):
    argv = ["--samples", "16", "--d-model", "8", "--d-hidden", "16", "--steps", "2", "--dp", "2",
            "--measure-overlap"]
    out = train_mlp.main(argv, world.comm)
    assert 0 <= out["overlap"].overlap_pct <= 100
    if world.comm.Get_rank() == 0:
        text = capsys.readouterr().out
        assert "hidden" in text and "time blocked in DP communication" in text
        assert "agree" in text and " rank    weights  gradients  adam state" in text


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_save_and_resume_continue_the_loss_curve_on_any_mesh(world, shared_tmp):
    """16 steps in one go = 8 steps --save, then 8 steps --resume: on the same mesh bitwise,
    on another mesh (smaller, other dp x tp) to rounding; the serial reference too."""
    from mpi4py import MPI

    comm, size = world.comm, world.size
    ckpt = str(shared_tmp / "ckpt")
    base = ["--samples", "12", "--d-model", "3", "--d-hidden", "5", "--dtype", "float64",
            "--quiet"]
    mesh = ["--dp", "2", "--tp", str(size // 2)]
    whole = train_mlp.main(base + mesh + ["--steps", "16"], comm)
    first = train_mlp.main(base + mesh + ["--steps", "8", "--save", ckpt], comm)
    again = train_mlp.main(base + mesh + ["--steps", "8", "--resume", ckpt], comm)
    assert first["losses"] == whole["losses"][:9] and again["losses"] == whole["losses"][8:]
    if comm.Get_rank() == 0:
        assert again["reference"] == whole["reference"][8:]
    sub = comm.Split(0 if comm.Get_rank() < size - 1 else MPI.UNDEFINED, comm.Get_rank())
    if sub != MPI.COMM_NULL:  # P - 1 ranks, dp 1, tp P - 1
        other = train_mlp.main(base + ["--steps", "8", "--resume", ckpt], sub)
        assert rel_err(other["losses"], whole["losses"][8:]) <= 1e-12
        sub.Free()
    comm.Barrier()
    all_ranks_raise(comm, lambda: train_mlp.main(base + ["--steps", "1", "--resume", ckpt,
                                                         "--activation", "relu"], comm),
                    f"--activation=relu: the checkpoint {ckpt} was saved with gelu")
    all_ranks_raise(comm, lambda: train_mlp.main(base + ["--steps", "1", "--resume", ckpt,
                                                         "--optimizer", "sgd"], comm),
                    "--optimizer=sgd: the checkpoint .* was saved with adam")
