"""tpmpi.core.tap: the null tap every operator and local work holds records nothing, reads no
clock and keeps no state; a tap subclass sees every verb."""
from tpmpi.core.tap import NOTHING, NULL_TAP, Tap


def test_the_null_tap_records_nothing():
    NULL_TAP.count("allreduce", 8, 2)
    for region in (NULL_TAP.product(), NULL_TAP.wait("bcast"), NULL_TAP.blocked("bcast", 8, 2)):
        assert region is NOTHING
        with region:
            pass
    assert vars(NULL_TAP) == {}


def test_a_tap_subclass_sees_every_verb():
    seen = []

    class Log(Tap):
        def count(self, op, nbytes, p):
            seen.append(("count", op, nbytes, p))

        def blocked(self, op, nbytes, p):
            seen.append(("blocked", op, nbytes, p))
            return NOTHING

    tap = Log()
    tap.count("bcast", 4, 2)
    with tap.blocked("allgather", 16, 4), tap.wait("bcast"), tap.product():
        pass
    assert seen == [("count", "bcast", 4, 2), ("blocked", "allgather", 16, 4)]
