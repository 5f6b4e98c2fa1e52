"""The one timing loop (tpmpi.studies.timing.time_calls): rounds, repeats, warmup, syncs, readings,
and the slowest rank's time, with a scripted clock so that every figure is exact."""
import numpy as np
import pytest

from tpmpi.studies.timing import time_calls


class Clock:
    """A clock that only moves when a call advances it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        def call():
            self.now += seconds
        return call


def test_each_call_is_clocked_over_its_repeats():
    clock = Clock()
    out = time_calls([clock.advance(2.0), clock.advance(0.5)], iters=3, repeat=4, clock=clock)
    assert out.shape == (2, 3)
    assert np.allclose(out, [[2.0] * 3, [0.5] * 3])


def test_warmup_is_untimed_and_after_follows_each_round():
    calls, rounds = [], []
    out = time_calls([lambda: calls.append("a"), lambda: calls.append("b")], iters=2,
                     warmup=3, after=rounds.append, clock=Clock())
    assert calls == ["a", "b"] * 5 and rounds == [0, 1] and out.shape == (2, 2)


def test_sync_opens_each_round_and_closes_each_call():
    events = []
    time_calls([lambda: events.append("call"), lambda: events.append("call")], iters=2,
               sync=lambda: events.append("sync"), clock=Clock())
    assert events == ["sync", "call", "sync", "call", "sync"] * 2


def test_readings_add_their_increase_per_round():
    clock, total = Clock(), [0.0]

    def work():
        clock.now += 1.0
        total[0] += 0.25
    out = time_calls([work], iters=3, readings=lambda: (total[0], 7.0), clock=clock)
    assert np.allclose(out, [[1.0] * 3, [0.25] * 3, [0.0] * 3])


def test_no_rounds():
    assert time_calls([lambda: None], iters=0).shape == (1, 0)


@pytest.mark.mpi
def test_every_entry_is_the_slowest_ranks(world):
    rank, clock = world.comm.Get_rank(), Clock()
    out = time_calls([clock.advance(1.0 + rank)], world.comm, iters=2, clock=clock)
    assert np.allclose(out, [[float(world.size)] * 2])
