"""Loading any layer or composite from a checkpoint: :func:`load_checkpoint`
(``tpmpi.load_checkpoint``), the reading of :mod:`tpmpi.checkpoint.read` over every tpmpi layer
class (and the ones a program defines), with the leaf layers found by :func:`layers_of`. A
layer class loads its own kind with its classmethod (``ColumnParallelLinear.load_checkpoint``),
which calls the same reading."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

from ..core.grid import ProcessGrid
from ..layers.base import ParallelLinear
from ..layers.module import Composite, named_layers
from .read import read_checkpoint


def layers_of(obj: Any) -> list[tuple[str, ParallelLinear]]:
    """The named leaf layers of a layer or composite (:func:`tpmpi.layers.named_layers`);
    ValueError unless every one is a ParallelLinear."""
    found = named_layers(obj)
    for name, layer in found:
        if not isinstance(layer, ParallelLinear):
            raise ValueError(f"{name or type(obj).__name__} is a {type(layer).__name__}: "
                             "expected a ParallelLinear (or a composite of them)")
    return found


def load_checkpoint(path: Union[str, os.PathLike[str]], grid: Optional[ProcessGrid] = None, *,
                    cls: Optional[type] = None, into: Any = None, verify: bool = True,
                    **options: Any) -> Any:
    """The layer saved in ``path``, re-sharded onto ``grid`` (default: 1D over COMM_WORLD; any
    size and shape). ``cls`` requires the saved class; ``options`` override saved constructor
    options (``dtype`` casts; a cast that overflows raises). ``into``: read into an existing
    layer or composite instead (its grid is used; ``grid``, if given, must be it). ``verify``
    recomputes the checksums. Collective: every argument agreed, the manifest checked on rank
    0 and broadcast, each rank ``Read_all``s its block; errors are raised on every rank
    (:func:`tpmpi.checkpoint.read.read_checkpoint`)."""
    return read_checkpoint(path, grid, roots=(ParallelLinear, Composite), leaves=layers_of,
                           cls=cls, into=into, verify=verify, options=options)
