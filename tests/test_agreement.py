"""tpmpi.core.agreement: the one collective that turns a bad argument or a differing value on
any rank into the same ValueError on every rank (which rank, which values), the values it
compares, the local checks it runs, and the message-size limit it parses."""
import re

import numpy as np
import pytest
from mpi4py import MPI

from conftest import all_ranks_raise
from tpmpi.core import agreement
from tpmpi.core.agreement import CALL_ORDER, SAME_VALUE, Counted, Same, Text, agree, \
    agree_checks, normalise


def test_values_compare_by_meaning():
    assert normalise(np.int64(3)) == 3 and type(normalise(np.float32(0.5))) is float
    assert normalise(np.dtype("float32")) == "float32"
    assert normalise([1, (2, np.int8(3))]) == (1, (2, 3))
    assert normalise({"b": 1, "a": [2]}) == (("a", (2,)), ("b", 1))
    assert normalise(Same(np.int16(4), "must")) == 4
    assert repr(Text("ProcessGrid()")) == "ProcessGrid()" and repr("x") == "'x'"


def test_one_rank_raises_its_own_error_only():
    agree(MPI.COMM_SELF, None, x=1)
    with pytest.raises(ValueError, match=r"^n=-1: expected a positive integer$"):
        agree(MPI.COMM_SELF, "n=-1: expected a positive integer", x=1)
    with pytest.raises(ValueError, match=r"communicator is MPI\.COMM_NULL"):
        agree(MPI.COMM_NULL)


def test_local_checks_become_the_error():
    def attribute():
        return None.shape

    with pytest.raises(ValueError, match=r"^AttributeError: 'NoneType' object has no attribute"):
        agree_checks(MPI.COMM_SELF, attribute)
    with pytest.raises(ValueError, match=r"^bad$"):
        agree_checks(MPI.COMM_SELF, lambda: (_ for _ in ()).throw(TypeError("bad")))
    agree_checks(MPI.COMM_SELF, lambda: None, x=1)


@pytest.mark.mpi
def test_equal_values_pass_and_errors_name_their_ranks(world):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    agree(comm, None, n=np.int64(6) if rank else 6, dtype=np.dtype("float32") if rank else
          "float32", shape=[2, 3] if rank else (2, 3))
    last = size - 1
    msg = all_ranks_raise(comm, lambda: agree(comm, "n=-1: bad" if rank == last else None),
                          "^n=-1: bad")
    assert msg == ("n=-1: bad" if size == 1 else f"n=-1: bad (rank {last})")
    all_ranks_raise(comm, lambda: agree(comm, "same everywhere"), "^same everywhere$")
    if size > 2:  # two different errors: each with its ranks
        all_ranks_raise(comm, lambda: agree(comm, "a" if rank == 0 else "b"),
                        f"^a \\(rank 0\\); b \\(ranks {','.join(map(str, range(1, size)))}\\)$")


def test_fingerprints_differ_where_the_values_do_and_the_cache_changes_nothing():
    fp = agreement._fingerprint
    first = fp({"n": 1, "call": Same(Counted(Text("layer f()"), 3), CALL_ORDER)})
    cached = fp({"n": 1, "call": Same(Counted(Text("layer f()"), 3), CALL_ORDER)})
    agreement._FINGERPRINTS.clear()
    assert first == cached == fp({"n": 1, "call": Same(Counted(Text("layer f()"), 3),
                                                        CALL_ORDER)})
    # values equal in Python but not in meaning, seen by one rank after the other
    codes = {fp({"n": v}) for v in (1, True, 1.0, "1", Text("1"), np.int64(1), None, 0)}
    assert len(codes) == 7  # np.int64(1) is 1; 1, True, 1.0, "1", Text("1"), None, 0 differ
    assert fp({"x": -0.0}) != fp({"x": 0.0}) and fp({"n": 2, "m": 3}) != fp({"m": 3, "n": 2})
    # the count is part of the call: another operation of the same layer differs
    calls = {fp({"call": Counted(Text(t), n)}) for t in ("a f()", "a g()") for n in (1, 2, 3)}
    assert len(calls) == 6
    assert repr(Counted(Text("layer #1 f()"), 7)) == "layer #1 f() [operation 7]"
    assert all(0 <= c < 2**62 for c in codes | calls)


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_differing_values_are_reported_on_every_rank(world):
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    others = ",".join(map(str, range(1, size)))
    all_ranks_raise(comm, lambda: agree(comm, seed=rank == 0),
                    rf"^seed differs across ranks: True on rank 0 and False on ranks? {others}; "
                    rf"{re.escape(SAME_VALUE)}$")
    all_ranks_raise(comm, lambda: agree(comm, n=4, m=Same(rank, "every rank must hold it")),
                    r"^m differs across ranks: 0 on rank 0 and 1 on rank 1.*; every rank must "
                    r"hold it$")
    # another call on one rank is reported before its values
    all_ranks_raise(comm, lambda: agree(comm, call=Same(Text("forward" if rank else "backward"),
                                                        CALL_ORDER), n=rank),
                    rf"^call differs across ranks: backward on rank 0 and forward on ranks? "
                    rf"{others}; {re.escape(CALL_ORDER)}$")


@pytest.mark.mpi
def test_agree_checks_runs_the_checks_and_agrees_the_limit(world, monkeypatch):
    comm, rank, last = world.comm, world.comm.Get_rank(), world.size - 1

    def check():
        if rank == last:
            raise ValueError("iters=0: expected a positive integer")

    suffix = f" \\(rank {last}\\)$" if world.size > 1 else "$"
    all_ranks_raise(comm, lambda: agree_checks(comm, check),
                    "^iters=0: expected a positive integer" + suffix)
    if rank == 0:
        monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", "4096")
    if world.size > 1:
        all_ranks_raise(comm, lambda: agree_checks(comm, lambda: None),
                        "TPMPI_MAX_MESSAGE_BYTES differs across ranks: 4096 on rank 0")
    else:
        agree_checks(comm, lambda: None)


@pytest.mark.parametrize("value,want", [("64", 64), (" 4096 ", 4096), ("", 2**30)])
def test_limit_from_environment(monkeypatch, value, want):
    monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", value)
    assert agreement.max_message_bytes() == want


@pytest.mark.parametrize("value", ["0", "-8", "abc", "1e6", "2**20", "64.0", "1²", "١٢", "1_0"])
def test_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("TPMPI_MAX_MESSAGE_BYTES", value)
    with pytest.raises(ValueError, match=r"TPMPI_MAX_MESSAGE_BYTES=.*expected a positive "
                                         r"integer"):
        agreement.max_message_bytes()


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_a_started_agreement_decides_when_settled(world):
    """start_checks: a rank whose checks fail raises at once (after starting its part); the
    others go on with local work and raise the same error when the agreement is settled; a
    Settle completes what it holds once, and holding another settles the first."""
    comm, rank = world.comm, world.comm.Get_rank()

    def checks():
        if rank == 1:
            raise ValueError("x.shape=(2,): expected a 2D array")

    slot = agreement.Settle()
    if rank == 1:
        with pytest.raises(ValueError) as info:
            agreement.start_checks(comm, checks, n=3)
    else:
        slot.hold(agreement.start_checks(comm, checks, n=3))
        assert slot.agreement is not None  # in flight: local work may run here
        with pytest.raises(ValueError) as info:
            slot.settle()
        assert slot.agreement is None
    assert len(set(comm.allgather(str(info.value)))) == 1
    slot.hold(agreement.start_agree(comm, None, n=4))
    slot.hold(agreement.start_agree(comm, None, n=5 + (rank == 0)))  # the first is settled
    with pytest.raises(ValueError, match="n differs across ranks: 6 on rank 0"):
        slot.settle()
    slot.settle()  # nothing held: nothing happens
