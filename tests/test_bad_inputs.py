"""Each bad input of scripts/bad_inputs.py fails fast (no hang) with the same ValueError on every
rank, or gives the correct result (its "OK" cases), at world sizes 1-4."""
import re

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, load_script
from tpmpi import cli

bad_inputs = load_script("bad_inputs")


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_every_bad_input_fails_fast_everywhere(world, shared_tmp):
    results = bad_inputs.run_all(world.comm, str(shared_tmp))
    cases = bad_inputs.applicable(world.size)
    assert [r.label for r in results] == [c.label for c in cases]
    for r, c in zip(results, cases):
        assert r.message and r.as_expected, (r.label, r.message)
        assert re.search(c.expect, r.message), (r.label, c.expect, r.message)
        assert r.same_everywhere, r.label
        assert r.seconds < 10, (r.label, r.seconds)


@pytest.mark.mpi
def test_check_finite_names_argument_count_and_ranks(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    X, W, dY = np.ones((3, 4)), np.ones((4, 5)), np.ones((3, 5))
    dY[0, :3] = np.nan if rank == 0 else 1.0
    off = tpmpi.ColumnParallelLinear.from_dense(W, grid=grid)
    off(X)
    assert np.isnan(off.backward(dY)).any()  # default: no check, NaN propagates
    on = tpmpi.ColumnParallelLinear.from_dense(W, grid=grid, check_finite=True)
    on(X)
    suffix = " (rank 0)" if world.size > 1 else ""
    all_ranks_raise(comm, lambda: on.backward(dY),
                    r"dy has 3 non-finite value\(s\) \(NaN/Inf\) \[check_finite=True\]"
                    + suffix.replace("(", r"\(").replace(")", r"\)"))
    assert on.config()["check_finite"] is True


@pytest.mark.mpi
def test_numpy_scalars_equal_python_numbers_in_agreements(world, grid):
    """np.int64(6) on one rank and 6 on another is the same argument (no "differs")."""


    rank = world.comm.Get_rank()
    layer = tpmpi.ColumnParallelLinear(np.int64(5) if rank else 5, 6, grid=grid,
                                       seed=np.uint8(3) if rank else 3)
    assert layer.config()["in_features"] == 5
    tpmpi.gather(np.zeros((2, 1)), grid, "rows", (2 * world.size, np.int32(1)))


@pytest.mark.mpi
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.world_sizes(2, 3, 4)
def test_a_failure_between_collectives_completes_them_and_is_raised_everywhere(world, grid,
                                                                              overlap):
    """A rank failing in backward's local work after the collective started still completes
    it (no rank hangs); the next call on the layer raises on every rank."""
    comm, last = world.comm, world.size - 1
    X, dY = np.ones((3, 4)), np.ones((3, 5))
    layer = tpmpi.ColumnParallelLinear.from_dense(np.ones((4, 5)), np.ones(5), grid=grid,
                                                  overlap=overlap)
    layer(X)
    if comm.Get_rank() == last:  # its bias gradient can no longer take db
        layer.grad_bias.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            layer.backward(dY)
    else:
        assert np.array_equal(layer.backward(dY), np.full((3, 4), 5.0))
    all_ranks_raise(comm, lambda: layer(X),
                    rf"an earlier operation of layer #\d+ \(ColumnParallelLinear 4x5\) failed "
                    rf"on this rank .*rebuild or reload the layer \(rank {last}\)")
    layer(X)  # reported once: the ranks are in step again


@pytest.mark.mpi
def test_check_replicated_passes_replicated_inputs(world, grid):
    """Equal inputs (NaN at the same place included) pass the check and give the unchecked
    results; the check covers x of column layers, dy of row layers and both of an MLP."""
    rng = np.random.default_rng(1)
    X, dY = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    for cls in (tpmpi.ColumnParallelLinear, tpmpi.RowParallelLinear):
        W = rng.standard_normal((4, 4))
        on, off = (cls.from_dense(W, grid=grid, check_replicated=flag)
                   for flag in (True, False))
        assert np.array_equal(on(X), off(X))
        assert np.array_equal(on.backward(dY), off.backward(dY))
        assert on.config()["check_replicated"] is True
    mlp = tpmpi.ParallelMLP(4, 6, grid=grid, dtype="float64", check_replicated=True)
    mlp(X)
    mlp.backward(dY)
    assert mlp.fc1.check_replicated and mlp.fc2.check_replicated
    nan = X.copy()
    nan[1, 1] = np.nan
    assert np.isnan(tpmpi.ColumnParallelLinear(4, 2, grid=grid, dtype="float64",
                                               check_replicated=True)(nan)[1]).all()


@pytest.mark.mpi
def test_cli_help_and_version_print_once_and_checks_run_before_the_work(world, shared_tmp,
                                                                        monkeypatch, capsys):
    comm = world.comm
    assert cli.main(["--version"], comm) == 0
    out = capsys.readouterr().out
    assert out == (f"tpmpi {tpmpi.__version__}\n" if comm.Get_rank() == 0 else "")

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    monkeypatch.setattr(cli.commands, "run_case", no_work)
    monkeypatch.setattr(cli.commands, "run_sweep", no_work)
    missing = str(shared_tmp / "missing" / "r.jsonl")
    for argv in (["run", "--m", "8", "--json", missing],
                 ["bench", "--m", "8", "--json", missing],
                 ["run", "--n", str(10**12)], ["run", "--n", str(10**12), "--backward"],
                 ["bench", "--m", "8", "--n", f"8,{10**12}", "--no-baseline"]):
        assert comm.allgather(cli.main(argv, comm)) == [2] * world.size, argv
        err = capsys.readouterr().err
        if comm.Get_rank() == 0:
            assert err.count("\n") == 1 and ("does not exist" in err or "needs at least" in err)
