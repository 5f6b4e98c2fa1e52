"""The runnable schemes by name: an explicit table (a new scheme adds its case class here;
nothing in the CLI or the benchmark changes)."""
from __future__ import annotations

from typing import Callable

from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ..problem import Problem
from .base import Case
from .column import ColumnCase
from .mlp import MLPCase
from .row import RowCase
from .tile2d import TileCase
from .transformer import TransformerCase

SchemeBuilder = Callable[[Problem, ProcessGrid, Backend], Case]
REGISTRY: dict[str, SchemeBuilder] = {"column": ColumnCase, "row": RowCase, "mlp": MLPCase,
                                      "tile2d": TileCase, "attention": TransformerCase,
                                      "block": TransformerCase, "gpt": TransformerCase}
KNOWN = tuple(REGISTRY)


def available() -> list[str]:
    """Names of the schemes that can run."""
    return sorted(REGISTRY)


def build(problem: Problem, grid: ProcessGrid, backend: Backend) -> Case:
    """The :class:`~tpmpi.studies.schemes.base.Case` of ``problem``; ValueError for an
    unknown scheme."""
    if problem.scheme not in REGISTRY:
        raise ValueError(f"scheme={problem.scheme!r} is unknown; available: "
                         f"{', '.join(available())}")
    return REGISTRY[problem.scheme](problem, grid, backend)
