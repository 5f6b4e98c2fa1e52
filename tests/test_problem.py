"""tpmpi.studies.problem: the plain description of a workload (its options, the FFN's hidden size
in effect, the longest sum behind its results)."""
import dataclasses

import pytest

from tpmpi.studies.problem import Problem, options_label


def test_options_label_sorts_by_name():
    assert options_label({"panel": 64, "chunks": 2}) == "chunks=2,panel=64"
    assert options_label({}) == ""


def test_defaults_and_options():
    p = Problem()
    assert (p.scheme, p.m, p.k, p.n, p.hidden, p.dtype, p.backward) == \
        ("column", 1024, 1024, 1024, None, "float32", False)
    assert Problem(options=(("chunks", 2), ("panel", 8))).opts == {"chunks": 2, "panel": 8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.m = 8
    assert Problem(m=8) == Problem(m=8) and hash(Problem(m=8)) == hash(Problem(m=8))


def test_hidden_size_in_effect():
    assert Problem(scheme="mlp", k=6).d_hidden == 24  # 4 k by default
    assert Problem(scheme="mlp", k=6, hidden=5).d_hidden == 5


def test_longest_sum():
    assert Problem(scheme="mlp", m=9, k=5, n=5, backward=True).longest_sum == 20  # hidden 4k
    assert Problem(scheme="mlp", m=9, k=5, n=5, hidden=30).longest_sum == 30  # forward
    assert Problem(m=9000, k=5, n=7).longest_sum == 5  # forward: K only
    assert Problem(m=9000, k=5, n=7, backward=True).longest_sum == 9000  # dW sums over M
    assert Problem(m=3, k=5, n=70, backward=True).longest_sum == 70  # dX sums over N


def test_a_record_names_the_run_it_measured():
    from tpmpi.studies.problem import Problem, RecordedRun

    rec = {"scheme": "mlp", "m": 8, "k": 4, "n": 4, "hidden": 16, "dtype": "float32",
           "backward": True, "options": {"mode": "book"}, "grid": "1x2",
           "mesh": {"dp": 2, "bucket_bytes": 64}}
    run = RecordedRun.of(rec)
    assert run == RecordedRun(Problem("mlp", 8, 4, 4, 16, "float32", True, (("mode", "book"),)),
                              (1, 2), 2, 64)
    plain = RecordedRun.of({**rec, "mesh": None, "options": None, "backward": None})
    assert (plain.dp, plain.bucket_bytes, plain.problem.options, plain.problem.backward) == \
        (1, None, (), False)
