"""Runnable schemes for the CLI and the benchmarks.

A scheme turns a :class:`~tpmpi.studies.problem.Problem` (global sizes, dtype, options) into a
:class:`Case`: its layer(s) on a grid, deterministic inputs in the layer's input layout,
``forward()`` / ``backward()`` (the timed units), and ``verify()`` (max relative error against a
float64 reference). The schemes are listed in :data:`tpmpi.studies.schemes.registry.REGISTRY`.
"""
from ..problem import Problem
from .base import (Case, LayerCase, bare_products, bias64, collective_rel_err, host64,
                   inputs, shard_pairs)
from .registry import KNOWN, REGISTRY, available, build

__all__ = ["Problem", "Case", "LayerCase", "bare_products", "bias64", "collective_rel_err",
           "host64", "inputs", "shard_pairs", "KNOWN", "REGISTRY", "available", "build"]
