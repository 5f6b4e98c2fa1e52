"""tpmpi.core.cache: the one LRU (eviction order, the callback gets what it evicts) and the one
per-communicator cache (one dict per communicator, empty on new ones, the communicators it
holds freed with it)."""
import pytest
from mpi4py import MPI

from tpmpi.core.cache import LRU, comm_cache


def test_lru_evicts_the_least_recently_used_into_its_callback():
    evicted = []
    lru = LRU(2, evicted.append)
    made = []

    def make(v):
        made.append(v)
        return v

    assert lru.get("a", lambda: make(1)) == 1 and lru.get("b", lambda: make(2)) == 2
    assert lru.get("a", lambda: make(10)) == 1  # a hit, and now the most recent
    assert lru.get("c", lambda: make(3)) == 3
    assert evicted == [2] and made == [1, 2, 3] and len(lru) == 2
    assert lru.get("b", lambda: make(20)) == 20 and evicted == [2, 1]
    # find: a hit is the most recent (c, not b, is evicted next); a miss makes nothing
    assert lru.find("c") == 3 and lru.find("z") is None and made == [1, 2, 3, 20]
    assert lru.get("d", lambda: make(4)) == 4 and evicted == [2, 1, 20]


@pytest.mark.mpi
def test_comm_cache_lives_and_dies_with_its_communicator(world):
    comm = world.comm.Dup()
    cache = comm_cache(comm)
    assert comm_cache(comm) is cache and cache == {}
    cache["facts"] = 1
    inner = comm.Dup()
    cache["inner"] = inner
    dup = comm.Dup()
    assert comm_cache(dup) == {}  # not copied to new communicators
    dup.Free()
    comm.Free()
    assert inner == MPI.COMM_NULL  # freed with the communicator that held it
