"""tpmpi.core.profiler: what a layer's profiler counts (collectives over more than one rank, their
bytes and bus bytes), what a timed one charges to GEMMs and communication (syncing the stream
at each boundary), totals and reset, and the single-phase runs of overlap measurements."""
import time

import pytest

from fake_device import FakeDevice
from tpmpi.core.backend import get_backend
from tpmpi.core.colltable import bus_factor
from tpmpi.core.profiler import Profiler


def test_untimed_profiler_counts_collectives_only():
    prof = Profiler(timed=False, sync=lambda: pytest.fail("an untimed profiler synced"))
    with prof.gemm():
        time.sleep(0.001)
    with prof.comm("allgather", 400, 4):
        pass
    with prof.comm("allreduce", 100, 1):  # one rank: no collective
        pass
    prof.count("allreduce", 80, 2)
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
    with prof.gemm():
        time.sleep(0.02)
    assert len(syncs) == 2 and prof.gemm_s >= 0.015 and prof.comm_s == 0.0
    with prof.comm("bcast", 64, 2):
        time.sleep(0.01)
    assert len(syncs) == 4 and prof.comm_s >= 0.005 and prof.calls == {"bcast": 1}
    assert prof.gemm_s >= 0.015


def test_for_backend_syncs_only_a_device():
    assert Profiler.for_backend(get_backend("numpy")).sync is None
    dev = FakeDevice()
    prof = Profiler.for_backend(dev)
    assert prof.timed
    with prof.gemm():
        pass
    assert dev.counts["sync"] == 2


def test_profiler_only_switches_phases():
    prof = Profiler()
    assert prof.runs("gemm") and prof.runs("comm")
    with prof.only("comm"):
        assert prof.runs("comm") and not prof.runs("gemm")
    assert prof.runs("gemm")
    with pytest.raises(ValueError, match="phase='x'"), prof.only("x"):
        pass
    with pytest.raises(RuntimeError), prof.only("gemm"):
        raise RuntimeError("the block failed")
    assert prof.runs("comm") and prof.runs("gemm")  # restored on the way out
