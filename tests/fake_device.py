"""A GPU backend without GPU-aware MPI whose "device" arrays are NumPy arrays, so that the
host-staging path of :class:`tpmpi.core.staging.Staging` runs (and is counted) on a CPU."""
from __future__ import annotations

import collections

import numpy as np

from tpmpi.core.backend import Backend


class FakeDevice(Backend):
    """A GPU backend without GPU-aware MPI whose "device" arrays are NumPy arrays. Pinned
    buffers start as all-ones bytes (NaN in every float dtype: a missed copy shows); every
    staging operation is counted, and copies are logged in ``events`` as ``("d2h"|"h2d",
    nbytes)`` (the async copies of the base class complete at once)."""

    is_gpu = True

    def __init__(self) -> None:
        super().__init__("fake-gpu", np)
        self.counts: collections.Counter = collections.Counter()
        self.events: list = []

    def synchronize(self) -> None:
        self.counts["sync"] += 1

    def pinned_empty(self, shape, dtype):
        self.counts["pinned"] += 1
        buf = np.empty(shape, dtype=dtype)
        buf.view(np.uint8).fill(0xFF)
        return buf

    def copy_to_host(self, a, out) -> None:
        self.counts["to_host"] += 1
        self.events.append(("d2h", a.nbytes))
        super().copy_to_host(a, out)

    def copy_from_host(self, host, a) -> None:
        self.counts["from_host"] += 1
        self.events.append(("h2d", host.nbytes))
        super().copy_from_host(host, a)
