"""Parallel linear layers: forward and backward on a ProcessGrid."""
from .base import ParallelLinear
from .column import ColumnParallelLinear

__all__ = ["ParallelLinear", "ColumnParallelLinear"]
