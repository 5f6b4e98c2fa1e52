"""Every backend through the same correctness test, and tpmpi.core.backend's choice of one.

* ``xb`` (conftest): column layer forward/backward against a float64 reference on each backend
  ("numpy" always, "cupy" where CuPy and a device exist), world sizes 1-4.
* the request of a backend by name and by ``TPMPI_BACKEND``.
(The backends' own methods: test_arraylib.py; the GPU-aware probe: test_devices.py; host
staging: test_staging.py; GPU binding: test_gpubind.py; per-communicator decisions on nested
and overlapping communicators: test_subcomm.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

import tpmpi
from conftest import rel_err
from problems import HALFS, linear_problem
from tpmpi.core import backend as backend_mod
from tpmpi.core.dtypes import tolerance


# --------------------------------------------------------------------------- every backend


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("m,k,n", [(6, 5, 7), (3, 0, 4), (4, 2, 1)])
def test_column_matches_reference_on_backend(grid, xb, dtype, m, k, n):
    X, W, b, dY = linear_problem(m, k, n, dtype)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, backend=xb)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    cols, tol = layer.shard[1], tolerance(dtype)
    y = layer(xb.asarray(X))
    assert xb.owns(y) and y.dtype == np.dtype(dtype) and y.shape == (m, n)
    assert rel_err(xb.to_host(y), X64 @ W64 + b64) <= tol
    dx = layer.backward(xb.asarray(dY))
    assert rel_err(xb.to_host(dx), dY64 @ W64.T) <= tol
    assert rel_err(xb.to_host(layer.grad_weight), (X64.T @ dY64)[:, cols]) <= tol
    assert rel_err(xb.to_host(layer.grad_bias), dY64.sum(0)[cols]) <= tol


def test_cupy_backend_request_is_clear_without_a_gpu():
    if backend_mod.cupy_usable():
        pytest.skip("a GPU is present: this checks the error without one")
    with pytest.raises(ValueError, match="CuPy is not installed or no CUDA device"):
        backend_mod.get_backend("cupy")


def test_auto_backend_follows_env(monkeypatch):
    monkeypatch.setenv("TPMPI_BACKEND", "numpy")
    assert backend_mod.get_backend("auto").name == "numpy"
    monkeypatch.setenv("TPMPI_BACKEND", "torch")
    with pytest.raises(ValueError, match="TPMPI_BACKEND='torch'"):
        backend_mod.get_backend("auto")
