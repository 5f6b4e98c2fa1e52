"""Parallel linear layers: forward and backward on a ProcessGrid."""
from .base import ParallelLinear
from .column import ColumnParallelLinear
from .mlp import ParallelMLP
from .row import RowParallelLinear

__all__ = ["ParallelLinear", "ColumnParallelLinear", "ParallelMLP", "RowParallelLinear"]
