"""A layer's schedule: the ordered local work and collectives of one forward (and backward) for a
problem size, as the layer runs them. It is plain data (no arrays, no communicators), computed
from the layer's declared layouts and its operators for any group size without building the
layer, so that the cost model (:mod:`tpmpi.studies.costmodel`) prices what the layers actually
do -- on this machine or on a cluster preset -- and never describes a layer a second time.

A step is one of:

* :class:`Product`: a local GEMM (``batch`` independent ``(m, k) @ (k, n)`` products);
* :class:`Pointwise`: element-wise, memory-bound work (activations, LayerNorm, softmax, bias
  and residual adds, dropout), priced by the bytes it streams;
* :class:`Collective`: one communication operator, with the nccl-tests size ``S`` of its
  collective (:mod:`tpmpi.core.colltable`), the communicator it runs on and the steps it
  overlaps (it is started before the first of ``during`` and waited for after the last);
* :class:`GradsReady`: gradients that are final at this point of backward (what data
  parallelism can start all-reducing), in backward order.

Step names are the layer's own: a product ``"fc1.dW"``, an operator attribute ``"fc2.reduce_y"``
(composites prefix their children's steps with the child's name).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Union


@dataclasses.dataclass(frozen=True)
class Product:
    """``batch`` local products ``(m, k) @ (k, n)`` in ``dtype``."""

    name: str
    m: int
    k: int
    n: int
    dtype: str
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


@dataclasses.dataclass(frozen=True)
class Pointwise:
    """Element-wise work that reads and writes ``nbytes`` in all (``flops`` arithmetic, for the
    rare case that is not memory-bound)."""

    name: str
    nbytes: int
    dtype: str
    flops: int = 0


@dataclasses.dataclass(frozen=True)
class Collective:
    """Collective ``op`` (a :data:`tpmpi.core.colltable.TABLE` name) of nccl-tests size
    ``nbytes`` over ``size`` ranks of communicator ``group`` ("tp", "row", "col" of a tile grid,
    or "dp"); ``during``: the names of the steps it overlaps (empty: blocking). ``name`` is the
    operator's attribute name in the layer."""

    name: str
    op: str
    group: str
    size: int
    nbytes: int
    dtype: str
    during: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GradsReady:
    """Gradients of ``nbytes`` per rank (``names``, in the order data parallelism buckets them)
    of ``dtype`` are final at this point of backward."""

    names: tuple[str, ...]
    nbytes: int
    dtype: str = "float32"


Step = Union[Product, Pointwise, Collective, GradsReady]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The steps of one forward and one backward on one rank (the rank holding the largest
    blocks), and what that rank holds: ``param_bytes`` (its parameter shards) and
    ``saved_bytes`` (what forward keeps for backward)."""

    forward: tuple[Step, ...] = ()
    backward: tuple[Step, ...] = ()
    param_bytes: int = 0
    saved_bytes: int = 0

    def steps(self, backward: bool = True) -> Iterator[Step]:
        """Forward's steps, then (with ``backward``) backward's."""
        yield from self.forward
        if backward:
            yield from self.backward

    def prefixed(self, prefix: str) -> Schedule:
        """The same schedule with every step name (and ``during`` reference) under
        ``prefix + "."``: a child's schedule as its composite lists it."""
        def rename(step: Step) -> Step:
            if isinstance(step, GradsReady):
                return dataclasses.replace(step, names=tuple(f"{prefix}.{n}" for n in step.names))
            if isinstance(step, Collective):
                return dataclasses.replace(step, name=f"{prefix}.{step.name}",
                                           during=tuple(f"{prefix}.{d}" for d in step.during))
            return dataclasses.replace(step, name=f"{prefix}.{step.name}")
        return Schedule(tuple(map(rename, self.forward)), tuple(map(rename, self.backward)),
                        self.param_bytes, self.saved_bytes)


def chain(parts: Iterable[Schedule]) -> Schedule:
    """The schedule of sub-layers run one after another: forwards in order, backwards in
    reverse order; parameters and saved bytes add up."""
    parts = list(parts)
    return Schedule(tuple(s for p in parts for s in p.forward),
                    tuple(s for p in reversed(parts) for s in p.backward),
                    sum(p.param_bytes for p in parts), sum(p.saved_bytes for p in parts))
