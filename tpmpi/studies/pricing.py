"""The price of a schedule (:mod:`tpmpi.core.schedule`) on a machine: one function,
:func:`price`, for every layer and composite, on this machine (the calibrated
:class:`tpmpi.studies.costmodel.CalibratedMachine`) or on any other that implements the three
methods of :class:`Machine` (e.g. a preset of a named GPU cluster).

The steps run on one timeline (forward, then backward):

* a :class:`~tpmpi.core.schedule.Product` or :class:`~tpmpi.core.schedule.Pointwise` advances
  the clock by its time;
* a blocking :class:`~tpmpi.core.schedule.Collective` (empty ``during``) starts when the clock
  reaches it and its group's earlier collectives are done, and the clock waits for its end;
* a collective with ``during`` starts the same way but the clock goes on through the steps it
  overlaps; it is waited for right after the last of them (``during`` lists them in schedule
  order), so only what runs past them is exposed;
* collectives of one group (communicator) run one after another, as one MPI communicator
  progresses them; those of different groups (a tile grid's rows and columns, data and tensor
  parallelism) at once;
* :class:`~tpmpi.core.schedule.GradsReady` costs nothing (data parallelism's collectives are
  placed after it: :meth:`tpmpi.DataParallel.schedule_for`).

A collective's time is exposed in the group it belongs to, so the tensor-parallel and the
data-parallel parts of the communication come apart; the :class:`Breakdown` also keeps each
collective's own time and exposure (:class:`CollectiveCost`) and the products' share of the
compute, which the training-step model (:mod:`tpmpi.studies.trainstep`) reports.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from ..core.colltable import sent_bytes
from ..core.schedule import Collective, GradsReady, Pointwise, Product, Schedule


class Machine(Protocol):
    """Seconds of each kind of step on one rank of a machine."""

    def product_s(self, step: Product) -> float:
        """Seconds of a local product."""

    def pointwise_s(self, step: Pointwise) -> float:
        """Seconds of element-wise work."""

    def collective_s(self, step: Collective) -> float:
        """Seconds of a collective (started to completed, nothing overlapping it)."""


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
    """One collective of a priced schedule: its ``seconds`` (started to completed) and the part
    of them the timeline waited for (``exposed_s``)."""

    step: Collective
    seconds: float
    exposed_s: float


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """One rank's price of a schedule: ``time_s`` end to end, ``compute_s`` in products and
    element-wise work (``product_s`` of it in products), and per group ``exposed_s`` (what the
    timeline waited for its collectives) and ``collective_s`` (their whole time, hidden or
    not); ``sent_bytes``: bytes the rank sends; ``collectives``: each collective's cost, in
    schedule order."""

    time_s: float
    compute_s: float
    exposed_s: dict[str, float]
    collective_s: dict[str, float]
    sent_bytes: float
    product_s: float = dataclasses.field(default=0.0, compare=False)
    collectives: tuple[CollectiveCost, ...] = dataclasses.field(default=(), compare=False)

    @property
    def comm_s(self) -> float:
        """Exposed communication, all groups."""
        return self.time_s - self.compute_s


def price(schedule: Schedule, machine: Machine, *, backward: bool = True) -> Breakdown:
    """The :class:`Breakdown` of ``schedule``'s forward (and with ``backward`` its backward)
    on ``machine`` (see the module docstring). Pure: no MPI, nothing measured."""
    clock = compute = products = sent = 0.0
    free: dict[str, float] = {}  # when each group's last collective ends
    waits: dict[str, list[tuple[float, int]]] = {}  # step name -> (end, cost index) to wait for
    exposed: dict[str, float] = {}
    busy: dict[str, float] = {}
    costs: list[list] = []  # [collective, seconds, exposed seconds]

    def wait_for(end: float, index: int) -> None:
        nonlocal clock
        if end > clock:
            group = costs[index][0].group
            exposed[group] = exposed.get(group, 0.0) + end - clock
            costs[index][2] += end - clock
            clock = end

    for step in schedule.steps(backward):
        if isinstance(step, GradsReady):
            continue
        if isinstance(step, Collective):
            took = machine.collective_s(step) if step.size > 1 else 0.0
            busy[step.group] = busy.get(step.group, 0.0) + took
            sent += sent_bytes(step.op, step.size, step.nbytes)
            end = max(clock, free.get(step.group, 0.0)) + took
            free[step.group] = end
            costs.append([step, took, 0.0])
            if step.during:
                waits.setdefault(step.during[-1], []).append((end, len(costs) - 1))
            else:
                wait_for(end, len(costs) - 1)
        else:
            if isinstance(step, Product):
                took = machine.product_s(step)
                products += took
            else:
                took = machine.pointwise_s(step)
            clock += took
            compute += took
        for end, index in waits.pop(step.name, []):
            wait_for(end, index)
    for pending in waits.values():  # overlapped steps not in this pass: waited at its end
        for end, index in pending:
            wait_for(end, index)
    return Breakdown(clock, compute, exposed, busy, sent, products,
                     tuple(CollectiveCost(*c) for c in costs))
