"""Parallel linear layers: forward and backward on a ProcessGrid."""
from .base import ParallelLinear
from .column import ColumnParallelLinear
from .mlp import ParallelMLP
from .row import RowParallelLinear
from .tile2d import TileParallelLinear

__all__ = ["ParallelLinear", "ColumnParallelLinear", "ParallelMLP", "RowParallelLinear",
           "TileParallelLinear"]
