"""Each bad input of scripts/bad_inputs.py fails fast (no hang) with the same ValueError on every
rank, at world sizes 1-4."""
import os
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
    assert len(results) == sum(world.size >= c.min_ranks for c in bad_inputs.CASES)
    for r in results:
        assert r.message and r.message.startswith("ValueError: "), (r.label, r.message)
        assert r.same_everywhere, r.label
        assert r.seconds < 10, (r.label, r.seconds)
