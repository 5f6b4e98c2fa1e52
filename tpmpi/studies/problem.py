"""The workload the benchmarks run and the cost model prices: a :class:`Problem` is plain data
(sizes, dtype, pass, scheme options) with no layers, grids or MPI behind it, so that the model
(:mod:`tpmpi.studies.costmodel`) and the runnable schemes (:mod:`tpmpi.studies.schemes`) share one
description and neither depends on the other."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional


TRANSFORMER = ("attention", "block", "gpt")
"""The schemes of a transformer's parts: the attention sub-layer, one block, the whole GPT."""


def options_label(options: Mapping) -> str:
    """Scheme options as plan, tables and reports print them: ``name=value`` pairs sorted by
    name, comma-separated ("" without any)."""
    return ",".join(f"{k}={v}" for k, v in sorted(options.items()))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One configuration: ``Y = X @ W`` with X (m, k), W (k, n); ``hidden`` for the MLP.

    The transformer schemes (:data:`TRANSFORMER`: "attention", "block", "gpt") read ``k`` as
    the model width d, ``m`` as the tokens ``batch x seq`` of sequences of ``seq`` tokens,
    ``heads`` / ``kv_heads`` query and key-value heads, ``vocab`` and ``layers`` (gpt) and
    option ``sequence_parallel``; :mod:`tpmpi.studies.transformer` holds their shapes."""

    scheme: str = "column"
    m: int = 1024
    k: int = 1024
    n: int = 1024
    hidden: Optional[int] = None
    dtype: str = "float32"
    backward: bool = False
    options: tuple = ()  # sorted (name, value) pairs of scheme options (panel, chunks, ...)
    replica: int = 0  # data-parallel replica: each draws its own X and dY (seeds offset)
    heads: Optional[int] = None  # transformer schemes: query heads
    kv_heads: Optional[int] = None  # key/value heads (None: heads)
    seq: Optional[int] = None  # tokens per sequence (m = batch x seq)
    vocab: Optional[int] = None  # gpt: vocabulary size
    layers: Optional[int] = None  # gpt: blocks

    @property
    def opts(self) -> dict:
        """The scheme options as a dict."""
        return dict(self.options)

    @property
    def d_hidden(self) -> int:
        """The FFN's hidden size in effect: ``hidden``, else 4·k (scheme "mlp")."""
        return self.hidden if self.hidden is not None else 4 * self.k

    @property
    def longest_sum(self) -> int:
        """Terms of the longest dot product behind the outputs (and, with ``backward``, the
        gradients): the ``k`` of :func:`tpmpi.core.dtypes.tolerance`."""
        dims = [self.k] + ([self.d_hidden] if self.scheme == "mlp" else [])
        if self.scheme in TRANSFORMER:  # the FFN's 4 d, the context's T, the head's vocab
            dims += [4 * self.k, self.seq or 0, self.vocab or 0]
        if self.backward:
            dims += [self.m, self.n]
        return max(dims)


@dataclasses.dataclass(frozen=True)
class RecordedRun:
    """What a ``run`` / ``bench`` record measured: the ``problem``, the TP ``grid``, ``dp``
    replicas and the DP ``bucket_bytes`` (None: the default)."""

    problem: Problem
    grid: tuple[int, int]
    dp: int = 1
    bucket_bytes: Optional[int] = None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> RecordedRun:
        """The run of ``record`` (its scheme, sizes, dtype, pass, options, grid and mesh)."""
        problem = Problem(scheme=record["scheme"], m=record["m"], k=record["k"], n=record["n"],
                          hidden=record["hidden"], dtype=record["dtype"],
                          backward=bool(record.get("backward")),
                          options=tuple(sorted((record.get("options") or {}).items())))
        rows, cols = (int(g) for g in record["grid"].split("x"))
        mesh = record.get("mesh") or {}
        return cls(problem, (rows, cols), int(mesh.get("dp", 1)), mesh.get("bucket_bytes"))
