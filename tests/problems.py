"""Inputs and float64 references shared by the test modules.

* :func:`draw`: standard normal arrays of given shapes from one seed.
* :func:`linear_problem`: ``X (m, k), W (k, n), b (n,), dY (m, n)`` of one linear layer;
  :data:`LINEAR_SHAPES` (even, uneven, M = 0, K = 0, N = 1) and :data:`LINEAR_TOL`.
* :func:`mlp_problem` and :func:`mlp_reference`: the FFN sub-layer's inputs and its serial
  forward and backward; :data:`MLP_TOL`.
* :data:`HALFS`: the 2-byte dtypes to parametrise over (bfloat16 skipped without ml_dtypes);
  :func:`float32_sum`: what tpmpi's reductions of them must return.
* :func:`clean_record`: a benchmark run record that raises no flag.
"""
from __future__ import annotations

import numpy as np
import pytest

from tpmpi.layers.activations import get_activation

try:
    import ml_dtypes  # noqa: F401
    HALFS = ["float16", "bfloat16"]
except ImportError:
    HALFS = ["float16", pytest.param("bfloat16", marks=pytest.mark.skip(
        reason="bfloat16 needs the ml_dtypes package (not installed)"))]

# (M, K, N): even, uneven, M = 1, M = 0, N = 1, K < P, K = 0
LINEAR_SHAPES = [(6, 5, 7), (9, 8, 8), (1, 3, 2), (0, 4, 5), (5, 3, 1), (4, 2, 3), (3, 0, 4)]
LINEAR_TOL = {"float64": 1e-12, "float32": 2e-5}
"""Relative error a linear layer's outputs and gradients must stay within, by dtype."""
MLP_TOL = {"float64": 1e-12, "float32": 5e-5}
"""The same for the FFN sub-layer (two products and an activation)."""


def draw(shapes: list, dtype, seed: int) -> list:
    """Standard normal arrays of ``shapes``, drawn in order from ``seed``, cast to ``dtype``."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def linear_problem(m: int, k: int, n: int, dtype="float64", seed: int = 0) -> list:
    """``[X (m, k), W (k, n), b (n,), dY (m, n)]``, drawn in that order (:func:`draw`)."""
    return draw([(m, k), (k, n), (n,), (m, n)], dtype, seed)


def mlp_problem(m: int, d: int, h: int, dtype="float64", seed: int = 0) -> list:
    """``[X (m, d), W1 (d, h), b1 (h,), W2 (h, d), b2 (d,), dY (m, d)]`` of the FFN
    sub-layer, drawn in that order (:func:`draw`)."""
    return draw([(m, d), (d, h), (h,), (h, d), (d,), (m, d)], dtype, seed)


def mlp_reference(X, W1, b1, W2, b2, dY, activation: str = "gelu") -> tuple:
    """Serial float64 forward and backward of ``act(X @ W1 + b1) @ W2 + b2``:
    ``(Y, dX, dW1, db1, dW2, db2)``."""
    f, df = get_activation(activation)
    X, W1, b1, W2, b2, dY = (np.asarray(a, dtype=np.float64) for a in (X, W1, b1, W2, b2, dY))
    pre = X @ W1 + b1
    h = f(pre)
    Y = h @ W2 + b2
    dpre = (dY @ W2.T) * df(pre)
    return Y, dpre @ W1.T, X.T @ dpre, dpre.sum(0), h.T @ dY, dY.sum(0)


def float32_sum(parts, dtype):
    """The float32 sum of ``parts`` in order, rounded once to ``dtype``: what tpmpi's
    reductions of 2-byte floats must return."""
    acc = parts[0].astype(np.float32)
    for part in parts[1:]:
        acc += part
    return acc.astype(dtype)


def clean_record(**kw) -> dict:
    """A benchmark run record that raises no flag (tpmpi.studies.stats.flags), with ``kw``
    replacing its fields."""
    t = {"median": 1e-3, "min": 0.98e-3, "max": 1.05e-3}
    rec = {"scheme": "column", "ranks": 2, "grid": "1x2", "m": 8, "k": 4, "n": 6,
           "hidden": None, "options": {}, "dtype": "float32", "backend": "numpy",
           "threads_per_rank": 1, "iters": 10, "time_s": t, "gemm_s": 6e-4, "comm_s": 3e-4,
           "spread": {"gemm_s": {"median": 6e-4, "min": 5e-4, "max": 7e-4},
                      "comm_s": {"median": 3e-4, "min": 2e-4, "max": 4e-4},
                      "baseline_s": {"median": 2e-3, "min": 1.99e-3, "max": 2.01e-3}},
           "gflops": 1.0, "algbw_gbs": 1.0, "busbw_gbs": 0.5, "mem_peak_bytes": 1 << 20,
           "max_rel_err": 1e-7, "predicted_s": 1e-3, "speedup": 2.0, "efficiency": 1.0,
           "load_per_cpu": 0.5, "oversubscription": 1.0}
    rec.update(kw)
    return rec
