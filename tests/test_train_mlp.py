"""scripts/train_mlp.py at a tiny size: the parallel loss curve matches the serial reference."""
import importlib.util
import pathlib

import pytest

from conftest import all_ranks_raise, rel_err

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_mlp.py"
_spec = importlib.util.spec_from_file_location("train_mlp", _PATH)
train_mlp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mlp)

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
    if not world.member:
        return
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
    if not world.member:
        return
    # d=3, h=5, float64 adam: 32 bytes/param; rank 0 holds 38, 24, 17, 17 params at P=1..4
    argv = TINY + ["--dtype", "float64", "--max-rank-bytes", str(17 * 32)]
    if world.size >= 3:
        assert train_mlp.main(argv, world.comm)["agree"]
    else:
        need = ["1,216", "768"][world.size - 1]
        all_ranks_raise(world.comm, lambda: train_mlp.main(argv, world.comm),
                        rf"--max-rank-bytes=544: at P={world.size} a rank needs {need} bytes "
                        r".*the smallest P that fits is 3")
    all_ranks_raise(world.comm, lambda: train_mlp.main(["--mode", "2d"], world.comm),
                    "argument --mode: invalid choice")
