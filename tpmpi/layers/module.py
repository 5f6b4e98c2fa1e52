"""One protocol for layers and composites of layers.

A *module* is either a leaf layer (a :class:`~tpmpi.layers.base.ParallelLinear`: its
``children()`` is empty) or a :class:`Composite` (e.g. :class:`~tpmpi.ParallelMLP`) whose
``children()`` names its sub-modules in forward order. A composite's ``parameters()``,
``zero_grad()`` and ``operators()`` follow from its children, and :func:`named_layers` lists the
leaf layers with dotted names (``"fc1"``, ``"fc2"``). Checkpoints, the benchmarks,
:class:`~tpmpi.DataParallel` and the MLP find sub-layers this way only; a measurement attaches
its tap to every operator and local work of a module with :func:`attach_tap`. Both kinds load
themselves from a checkpoint (:class:`Checkpointable`, through the layer-agnostic
:mod:`tpmpi.checkpoint.read`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol, TypeVar, Union

from ..checkpoint.read import read_checkpoint
from ..core.grid import ProcessGrid
from ..core.mappings import Operator
from ..core.tap import Tap

_Module = TypeVar("_Module", bound="Checkpointable")
T = TypeVar("T", bound=Tap)


class Module(Protocol):
    """What checkpoints, benchmarks and DataParallel need of a layer or a composite."""

    def children(self) -> Sequence[tuple[str, Module]]:
        """``(name, sub-module)`` in forward order; ``[]`` for a leaf layer."""

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(dotted name, local parameter, local gradient)`` of every parameter."""

    def zero_grad(self) -> None:
        """Reset the accumulated gradients."""

    def operators(self) -> dict[str, Operator]:
        """The communication operators by (dotted) attribute name."""


class LeafModule:
    """What every leaf of the protocol shares (:class:`~tpmpi.layers.base.ParallelLinear`,
    :class:`~tpmpi.layers.leaf.ParameterLeaf`): a ``weight`` and an optional ``bias`` with
    their gradients ``grad_weight`` / ``grad_bias`` (the attributes DataParallel buckets), no
    sub-modules."""

    weight: Any
    bias: Any
    grad_weight: Any
    grad_bias: Any

    def children(self) -> list:
        """No sub-modules: a leaf of the module protocol."""
        return []

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(name, local parameter, local gradient)``: weight, then bias when there is one."""
        out = [("weight", self.weight, self.grad_weight)]
        if self.bias is not None:
            out.append(("bias", self.bias, self.grad_bias))
        return out

    def zero_grad(self) -> None:
        """Reset the accumulated gradients to zero."""
        self.grad_weight[...] = 0
        if self.grad_bias is not None:
            self.grad_bias[...] = 0


class Checkpointable:
    """What leaf layers (:class:`~tpmpi.layers.base.ParallelLinear`) and composites
    (:class:`Composite`) share: :meth:`load_checkpoint`, for them and every subclass."""

    @classmethod
    def load_checkpoint(cls: type[_Module], path: Union[str, os.PathLike[str]],
                        grid: Optional[ProcessGrid] = None, **options: Any) -> _Module:
        """An object of this class from the checkpoint directory ``path``, re-sharded onto
        ``grid`` (default: 1D over COMM_WORLD; any size and shape); ``options`` override saved
        constructor options (``dtype`` casts). On ``ParallelLinear`` or ``Composite`` itself:
        the saved class of that kind. Collective (:func:`tpmpi.checkpoint.read.read_checkpoint`)."""
        kind = next(k for k in cls.__mro__ if Checkpointable in k.__bases__)
        return read_checkpoint(path, grid, roots=(kind,), leaves=named_layers, cls=cls,
                               options=options)


class Composite(Checkpointable):
    """A module made of named sub-modules: subclasses implement :meth:`children`."""

    def children(self) -> Sequence[tuple[str, Module]]:  # pragma: no cover - abstract
        """``(name, sub-module)`` in forward order."""
        raise NotImplementedError

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(name, local parameter, local gradient)``, named ``child.parameter`` (e.g.
        ``fc1.weight``), children in order."""
        return [(f"{name}.{p}", value, grad) for name, child in self.children()
                for p, value, grad in child.parameters()]

    def zero_grad(self) -> None:
        """Reset the accumulated gradients of every child."""
        for _, child in self.children():
            child.zero_grad()

    def operators(self) -> dict[str, Operator]:
        """The operators of every child, named ``child.attribute`` (e.g. ``fc2.reduce_y``)."""
        return {f"{name}.{attr}": op for name, child in self.children()
                for attr, op in child.operators().items()}


def modules(module: Any) -> Iterator[Any]:
    """``module`` and every sub-module below it (depth first, in forward order). Local."""
    yield module
    for _, child in getattr(module, "children", list)():
        yield from modules(child)


def attach_tap(module: Any, tap: T) -> T:
    """From now on every operator of ``module`` (:meth:`Module.operators`) and the local work
    (``.local``) of it and of its sub-modules report to ``tap`` (e.g. a
    :class:`tpmpi.core.profiler.Profiler`; :data:`tpmpi.core.tap.NULL_TAP` detaches). Returns
    ``tap``. Local."""
    for op in module.operators().values():
        op.tap = tap
    for sub in modules(module):
        local = getattr(sub, "local", None)
        if local is not None:
            local.tap = tap
    return tap


def named_layers(module: Any) -> list[tuple[str, Any]]:
    """The leaf layers of ``module`` in forward order with their dotted names: ``[("", module)]``
    for a leaf layer, ``[("fc1", ...), ("fc2", ...)]`` for a ParallelMLP. ValueError when
    ``module`` has no ``children()`` or a composite holds no layer. Local."""
    children = getattr(module, "children", None)
    if not callable(children):
        raise ValueError(f"{type(module).__name__} is not a tpmpi layer or composite (it has no "
                         "children() method)")
    kids = children()
    if not kids and not isinstance(module, Composite):
        return [("", module)]
    found = [(f"{name}.{sub}" if sub else name, leaf) for name, child in kids
             for sub, leaf in named_layers(child)]
    if not found:
        raise ValueError(f"{type(module).__name__} holds no layers (children() is empty)")
    return found
