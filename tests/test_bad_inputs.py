"""Each bad input of scripts/bad_inputs.py fails fast (no hang) with the same ValueError on every
rank, at world sizes 1-4."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
import bad_inputs  # noqa: E402


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_every_bad_input_fails_fast_everywhere(world, tmp_path_factory):
    if not world.member:
        return
    tmpdir = world.comm.bcast(str(tmp_path_factory.mktemp("bad")) if world.comm.Get_rank() == 0
                              else None)
    results = bad_inputs.run_all(world.comm, tmpdir)
    cases = bad_inputs.applicable(world.size)
    assert [r.label for r in results] == [c.label for c in cases]
    for r, c in zip(results, cases):
        assert r.message and r.value_error, (r.label, r.message)
        assert re.search(c.expect, r.message), (r.label, c.expect, r.message)
        assert r.same_everywhere, r.label
        assert r.seconds < 10, (r.label, r.seconds)


@pytest.mark.mpi
def test_check_finite_names_argument_count_and_ranks(world):
    if not world.member:
        return
    import numpy as np

    import tpmpi
    from conftest import all_ranks_raise

    comm, rank = world.comm, world.comm.Get_rank()
    grid = tpmpi.ProcessGrid(comm)
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
    grid.free()
