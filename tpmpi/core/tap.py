"""Where the communication operators (:mod:`tpmpi.core.mappings`, :mod:`tpmpi.core.summa`) and a
module's local work (:class:`tpmpi.core.gemm.LocalWork`) report what they do.

A :class:`Tap` has four verbs: ``count(op, nbytes, p)`` (a non-blocking collective of nccl-tests
size ``nbytes`` over ``p`` ranks was started), ``wait(op)`` (a region spent waiting for one to
complete), ``blocked(op, nbytes, p)`` (a region spent in a blocking collective) and
``product()`` (a region spent in a local product). This base class is the null tap every
operator holds by default: it records nothing, reads no clock and never synchronises a device
stream, so that a layer pays nothing for accounting unless a measurement attaches a real tap
(:class:`tpmpi.core.profiler.Profiler`, through :func:`tpmpi.layers.module.attach_tap`).
"""
from __future__ import annotations

import contextlib

NOTHING: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
"""The region of a tap that times nothing."""


class Tap:
    """The null tap (see the module docstring); subclasses record."""

    def count(self, op: str, nbytes: int, p: int) -> None:
        """Collective ``op`` of nccl-tests size ``nbytes`` over ``p`` ranks was started."""

    def wait(self, op: str) -> contextlib.AbstractContextManager[None]:
        """The region spent waiting for a started collective ``op`` (bytes counted at start)."""
        return NOTHING

    def blocked(self, op: str, nbytes: int, p: int) -> contextlib.AbstractContextManager[None]:
        """The region of a blocking collective ``op`` of ``nbytes`` over ``p`` ranks."""
        return NOTHING

    def product(self) -> contextlib.AbstractContextManager[None]:
        """The region of one local product (or other local work)."""
        return NOTHING


NULL_TAP = Tap()
"""The tap every operator and local work holds until a measurement attaches another."""
