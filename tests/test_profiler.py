"""tpmpi.core.profiler: what the profiler tap counts (collectives over more than one rank, their
bytes and bus bytes), what a timed one charges to local products and communication (syncing
the stream at each boundary), totals and reset."""
import time

import pytest

from fake_device import FakeDevice
from tpmpi.core.backend import get_backend
from tpmpi.core.colltable import bus_factor
from tpmpi.core.profiler import Profiler


def test_untimed_profiler_counts_collectives_only():
    prof = Profiler(timed=False, sync=lambda: pytest.fail("an untimed profiler synced"))
    with prof.product():
        time.sleep(0.001)
    with prof.blocked("allgather", 400, 4):
        pass
    with prof.blocked("allreduce", 100, 1):  # one rank: no collective
        pass
    prof.count("allreduce", 80, 2)
    with prof.wait("allreduce"):  # waiting: counted when it started
        pass
    assert (prof.gemm_s, prof.comm_s) == (0.0, 0.0)
    assert prof.calls == {"allgather": 1, "allreduce": 1} and prof.bytes == 480
    assert prof.bus_bytes == pytest.approx(400 * bus_factor("allgather", 4)
                                           + 80 * bus_factor("allreduce", 2))
    totals = prof.totals()
    prof.reset()
    assert totals["calls"] == {"allgather": 1, "allreduce": 1} and totals["bytes"] == 480
    assert prof.totals() == {"gemm_s": 0.0, "comm_s": 0.0, "bytes": 0.0, "bus_bytes": 0.0,
                             "calls": {}}


def test_timed_profiler_charges_each_region_and_syncs_at_its_boundaries():
    syncs = []
    prof = Profiler(sync=lambda: syncs.append(1))
    with prof.product():
        time.sleep(0.02)
    assert len(syncs) == 2 and prof.gemm_s >= 0.015 and prof.comm_s == 0.0
    with prof.blocked("bcast", 64, 2):
        time.sleep(0.01)
    assert len(syncs) == 4 and prof.comm_s >= 0.005 and prof.calls == {"bcast": 1}
    prof.count("reduce", 64, 2)
    with prof.wait("reduce"):
        time.sleep(0.01)
    assert len(syncs) == 6 and prof.comm_s >= 0.01 and prof.calls == {"bcast": 1, "reduce": 1}
    assert prof.gemm_s >= 0.015


def test_for_backend_syncs_only_a_device():
    assert Profiler.for_backend(get_backend("numpy")).sync is None
    dev = FakeDevice()
    prof = Profiler.for_backend(dev)
    assert prof.timed
    with prof.product():
        pass
    assert dev.counts["sync"] == 2

