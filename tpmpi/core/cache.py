"""The package's two caches, each written once.

* :class:`LRU` -- a bounded, least-recently-used map whose evicted values are handed to a
  callback (the MPI datatypes of :mod:`tpmpi.core.comm` are freed there).
* :func:`comm_cache` -- a dict kept on a communicator as an MPI attribute: what was decided
  once per communicator (its device facts, its topology-free duplicate) lives and dies with it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Callable, Generic, Optional, TypeVar

from mpi4py import MPI

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` values by key, the least recently used evicted first and passed to
    ``evict`` (e.g. to free what it owns). Local, no communication."""

    def __init__(self, size: int, evict: Optional[Callable[[V], None]] = None) -> None:
        self.size, self._evict = int(size), evict
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def find(self, key: Hashable) -> Optional[V]:
        """The value of ``key`` (now the most recently used), or None when there is none."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` under ``key`` (the most recently used), evicting the least recently
        used beyond ``size``; returns ``value``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            old = self._items.popitem(last=False)[1]
            if self._evict is not None:
                self._evict(old)
        return value

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` (and stored) at its first request."""
        value = self.find(key)
        return value if value is not None else self.put(key, make())

    def __len__(self) -> int:
        return len(self._items)


def _free_communicators(_comm: MPI.Comm, _key: int, cache: Any) -> None:
    """The attribute's delete callback: communicators cached on a communicator die with it."""
    for value in cache.values():
        if isinstance(value, MPI.Comm) and value != MPI.COMM_NULL:
            value.Free()


_KEYVAL: list[int] = []  # the MPI attribute key of :func:`comm_cache` (created at first use)


def comm_cache(comm: MPI.Comm) -> dict:
    """A dict cached on ``comm`` as an MPI attribute: freed with the communicator (the
    communicators among its values freed with it), not copied to new ones (Split,
    Create_cart, Sub and Dup start empty). No communication."""
    if not _KEYVAL:
        _KEYVAL.append(MPI.Comm.Create_keyval(delete_fn=_free_communicators))
    cache = comm.Get_attr(_KEYVAL[0])
    if not isinstance(cache, dict):  # None: not set on this communicator yet
        cache = {}
        comm.Set_attr(_KEYVAL[0], cache)
    return cache
