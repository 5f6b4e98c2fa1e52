"""Collective argument agreement: before any collective that could block, every rank learns
whether any rank saw a bad argument or a differing value, and all raise the same ValueError.

* :func:`agree` -- the primitive: one small Allreduce decides whether any rank reports an error
  or a differing value; only then are the details gathered (one allgather). It is an
  ``Iallreduce`` (:func:`start_agree`), so that a layer can run its local product while the
  ranks agree and pay their skew once (:class:`Settle`).
* :func:`agree_checks` -- run a rank's local checks (functions named ``check_*`` in tpmpi
  raise on the rank that calls them), then :func:`agree` on their outcome, on the given values
  and on the one setting that changes how collectives are cut, ``TPMPI_MAX_MESSAGE_BYTES``
  (:func:`max_message_bytes`, parsed here so that a bad value on one rank is an error on
  every rank).

Naming across tpmpi: ``check_*`` raises on this rank only (no communication); ``agree_*`` is
collective and raises the same ValueError on every rank.
"""
from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from .args import parse_int


class Same:
    """A value for :func:`agree` with its own ending of the mismatch message, e.g.
    ``Same(call, "every rank must call the same layers in the same order")``."""

    __slots__ = ("value", "must")

    def __init__(self, value: Any, must: str):
        self.value, self.must = value, must


class Text(str):
    """A string :func:`agree` reports without quotes (e.g. a call's description)."""

    def __repr__(self) -> str:
        return str(self)


class Counted:
    """A :class:`Text` and a count, reported as ``"<text> [operation <count>]"`` (a layer's
    call and how many it made). The text's fingerprint is computed once and the count folded
    in, so an agreement per call hashes no new string."""

    __slots__ = ("text", "count")

    def __init__(self, text: str, count: int) -> None:
        self.text, self.count = text, count

    def __repr__(self) -> str:
        return f"{self.text} [operation {self.count}]"


SAME_VALUE = "every rank must pass the same value"
CALL_ORDER = "every rank must make the same tpmpi calls in the same order (each is collective)"


_PLAIN = (int, str, float, bool, type(None), Text)
_EXACT = (int, str, type(None), Text)
"""Types whose equality is equality of ``repr``: their fingerprints may be cached by value."""


def normalise(value: Any) -> Any:
    """``value`` in the form :func:`agree` compares: NumPy scalars as Python numbers
    (``np.int64(3)`` equals ``3``), dtypes by name, lists and tuples as tuples, mappings with
    sorted keys."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is Same:
        return normalise(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), normalise(v)) for k, v in value.items()))
    return value


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _groups(pairs: Iterable[tuple[int, Any]]) -> OrderedDict[Any, list[int]]:
    """``value -> ranks`` in order of first appearance, from ``(rank, value)`` pairs."""
    out: OrderedDict[Any, list[int]] = OrderedDict()
    for rank, value in pairs:
        out.setdefault(value, []).append(rank)
    return out


def _mismatch(infos: list) -> str:
    """The message for the gathered ``(error, [(key, text, must), ...])`` of every rank: a
    differing ``call`` first, then reported errors, then the first differing value.
    Deterministic in ``infos``, hence the same on every rank."""
    table = [{key: (text, must) for key, text, must in fields} for _, fields in infos]
    keys = list(OrderedDict.fromkeys(k for fields in table for k in fields))

    def differs(key: str) -> Optional[str]:
        seen = _groups((r, t[key][0] if key in t else "(another call)")
                       for r, t in enumerate(table))
        if len(seen) == 1:
            return None
        must = next(t[key][1] for t in table if key in t)
        detail = " and ".join(f"{v} on {_ranks(r)}" for v, r in seen.items())
        return f"{key} differs across ranks: {detail}; {must}"

    call = differs("call") if "call" in keys else None
    if call:
        return call
    errors = _groups((r, err) for r, (err, _) in enumerate(infos) if err)
    if errors:
        return "; ".join(f"{msg} ({_ranks(r)})" if len(errors) > 1 or len(r) < len(infos)
                         else msg for msg, r in errors.items())
    found = [msg for msg in map(differs, keys) if msg]
    return found[0] if found else "the ranks are in different calls"


class Agreement:
    """A started :func:`start_agree`: :meth:`wait` completes its Allreduce and raises the agreed
    ValueError on every rank when any rank reported an error or a differing value."""

    __slots__ = ("comm", "error", "values", "both", "request")

    def __init__(self, comm: MPI.Comm, error: Optional[str], values: dict,
                 both: Optional[np.ndarray], request: Optional[MPI.Request]) -> None:
        self.comm, self.error, self.values = comm, error, values
        self.both, self.request = both, request

    def wait(self) -> None:
        """Complete the agreement (collective: the allgather of the details on failure only)."""
        if self.request is None:
            return
        self.request.Wait()
        self.request = None
        both = self.both
        assert both is not None  # set with the request
        if both[0] == 0 and both[1] == -both[2]:
            return
        fields = [(key, repr(normalise(v)), v.must if isinstance(v, Same) else SAME_VALUE)
                  for key, v in self.values.items()]
        raise ValueError(_mismatch(self.comm.allgather((self.error, fields))))


_FINGERPRINTS: dict[tuple, tuple[int, int]] = {}
_FINGERPRINTS_MAX = 4096


def _fingerprint(values: dict[str, Any]) -> int:
    """62 bits of the normalised ``values``, the same on every rank for the same values:
    CRC-32 and Adler-32 of their ``repr`` text, each :class:`Counted` value's count folded in
    after. The text's sums are cached for values of the types in :data:`_EXACT` (whose equal
    values have equal texts), so a repeated call costs a dict lookup."""
    items, counts, cacheable = [], [], True
    for key, value in values.items():
        value = normalise(value)
        kind = type(value)
        if kind is Counted:
            items.append((key, kind, value.text))
            counts.append(value.count)
        else:
            items.append((key, kind, value))
            cacheable = cacheable and kind in _EXACT
    static = tuple(items)
    sums = _FINGERPRINTS.get(static) if cacheable else None
    if sums is None:
        text = repr([(key, kind.__name__, repr(value)) for key, kind, value in static]).encode()
        sums = zlib.crc32(text), zlib.adler32(text)
        if cacheable and len(_FINGERPRINTS) < _FINGERPRINTS_MAX:
            _FINGERPRINTS[static] = sums
    crc, adler = sums
    for count in counts:
        word = int(count).to_bytes(8, "little", signed=True)
        crc, adler = zlib.crc32(word, crc), zlib.adler32(word, adler)
    return crc << 30 | adler >> 2


def start_agree(comm: MPI.Comm, error: Optional[str] = None, **values: Any) -> Agreement:
    """Start :func:`agree`: the Iallreduce is in flight when this returns, and
    :meth:`Agreement.wait` decides. Local work may run in between (the ranks' skew is then paid
    once, at the wait), but no collective on ``comm``: a rank that reported ``error`` only
    waits and raises. Collective."""
    if comm == MPI.COMM_NULL:
        raise ValueError("the communicator is MPI.COMM_NULL (freed, e.g. by grid.free(), or "
                         "this rank is outside it): expected a live communicator")
    if comm.Get_size() == 1:
        if error:
            raise ValueError(error)
        return Agreement(comm, None, {}, None, None)
    code = _fingerprint(values)  # 62 bits, the same on every rank for the same values
    both = np.array([1 if error else 0, code, -code], dtype=np.int64)
    request = comm.Iallreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    return Agreement(comm, error, values, both, request)


def agree(comm: MPI.Comm, error: Optional[str] = None, **values: Any) -> None:
    """Raise the same ValueError on every rank of ``comm`` if any rank reports ``error`` or any
    keyword value differs between ranks (compared after :func:`normalise`; a :class:`Same`
    value ends the message with its own words). Collective: one Iallreduce of 3 int64 whatever
    the values, completed at once, so any two agreements match each other (a rank in another
    tpmpi call is reported, not left hanging; every agreement is non-blocking, as blocking and
    non-blocking collectives never match); an allgather of the details only on failure. A
    ``call`` value (which operation this is) is reported before the others.
    """
    start_agree(comm, error, **values).wait()


def start_checks(comm: MPI.Comm, local_checks: Callable[[], None], **values: Any) -> Agreement:
    """Run ``local_checks`` on every rank, then :func:`start_agree` on its outcome, on ``values``
    and on ``TPMPI_MAX_MESSAGE_BYTES`` (parsed here, so a bad value on one rank is an error on
    every rank). Collective. Any exception of ``local_checks`` becomes the agreed ValueError
    (others than ValueError/TypeError prefixed by their type); a rank whose checks failed waits
    for the agreement here and raises, so no rank goes on with a bad argument while the others
    wait."""
    error, limit = None, None
    try:
        limit = max_message_bytes()
        local_checks()
    except (ValueError, TypeError) as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. AttributeError from a non-array argument
        error = f"{type(exc).__name__}: {exc}"
    agreement = start_agree(comm, error, **values, TPMPI_MAX_MESSAGE_BYTES=limit)
    if error:
        agreement.wait()
    return agreement


def agree_checks(comm: MPI.Comm, local_checks: Callable[[], None], **values: Any) -> None:
    """:func:`start_checks`, completed at once: the same ValueError on every rank, or none."""
    start_checks(comm, local_checks, **values).wait()


class Settle:
    """What a layer's operations share with its operators and local work
    (:class:`tpmpi.layers.base.ParallelLinear`): the agreement of the operation in progress,
    held until its first collective or the end of its first local product, whichever comes
    first (:meth:`settle` completes it), and ``failed``, a failure on this rank between an
    operation's collectives (which still completed them), for the next operation to report on
    every rank."""

    __slots__ = ("agreement", "failed")

    def __init__(self) -> None:
        self.agreement: Optional[Agreement] = None
        self.failed: Optional[str] = None

    def hold(self, agreement: Agreement) -> None:
        """Keep ``agreement`` open (an earlier one is completed first)."""
        self.settle()
        self.agreement = agreement

    def settle(self) -> None:
        """Complete the held agreement, if any: the agreed ValueError on every rank."""
        agreement = self.agreement
        if agreement is not None:
            self.agreement = None
            agreement.wait()


def agree_on_root(comm: MPI.Comm, task: Optional[Callable[[], Any]]) -> Any:
    """Run ``task()`` on rank 0 (other ranks pass anything, e.g. None) and broadcast its result,
    or raise its error on every rank (any exception: nothing escapes on rank 0 alone).
    Collective (one bcast)."""
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            assert task is not None, "rank 0 runs the task"
            result = task()
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    result, error = comm.bcast((result, error), root=0)
    if error:
        raise ValueError(error)
    return result


MAX_MESSAGE_BYTES: int = 2**30
"""Largest payload of one MPI call; bigger collectives are split (env TPMPI_MAX_MESSAGE_BYTES
overrides). Every rank must use the same value: :func:`agree_checks` agrees on it."""


def max_message_bytes() -> int:
    """The chunk limit in bytes in force now: env ``TPMPI_MAX_MESSAGE_BYTES`` (a positive
    decimal integer), else :data:`MAX_MESSAGE_BYTES`. ValueError naming the variable."""
    env = os.environ.get("TPMPI_MAX_MESSAGE_BYTES")
    if env is None or not env.strip():
        return int(MAX_MESSAGE_BYTES)
    return parse_int("TPMPI_MAX_MESSAGE_BYTES", env, 1)
