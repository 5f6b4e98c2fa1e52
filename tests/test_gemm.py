"""tpmpi.core.gemm: 2-byte float products on NumPy are the float32 product rounded once, with
a bounded workspace (row blocks and column panels, strided operands), edge shapes, other
dtypes through xp.matmul, and column sums accumulated in float32."""
import numpy as np
import pytest

from problems import HALFS, draw
from tpmpi.core import gemm


def _operands(m, k, n, dtype, seed=0):
    return tuple(draw([(m, k), (k, n)], dtype, seed))


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("workspace", [None, 4096], ids=["whole", "panels"])
@pytest.mark.parametrize("transpose", [False, True])
def test_half_matmul_is_the_float32_product_rounded_once(monkeypatch, dtype, workspace,
                                                         transpose):
    if workspace:  # forces row blocks and column panels (and a partial last panel)
        monkeypatch.setattr(gemm, "WORKSPACE_BYTES", workspace)
        monkeypatch.setattr(gemm, "_MIN_PANEL", 3)
    a, b = _operands(37, 11, 29, dtype)
    if transpose:  # strided operands, as in the layers' x.T @ dy and dy @ w.T
        a, b = np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T
    want = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(dtype)
    got = gemm.matmul(np, a, b)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    out = np.empty((37, 29), dtype=dtype)
    assert gemm.matmul(np, a, b, out=out) is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", HALFS)
def test_half_matmul_edge_shapes(dtype):
    a, b = _operands(4, 0, 3, dtype)
    assert np.array_equal(gemm.matmul(np, a, b).astype(np.float64), np.zeros((4, 3)))
    a, b = _operands(0, 5, 3, dtype)
    assert gemm.matmul(np, a, b).shape == (0, 3)


def test_other_dtypes_use_xp_matmul():
    a, b = _operands(6, 5, 4, "float32")
    assert np.array_equal(gemm.matmul(np, a, b), a @ b)


@pytest.mark.parametrize("dtype", HALFS)
def test_column_sums_accumulate_in_float32(dtype):
    # 4096 ones and one 1: a half-precision accumulator stops growing long before
    a = np.ones((4097, 2), dtype=dtype)
    s = gemm.column_sums(a)
    assert s.dtype == np.dtype(dtype)
    assert np.array_equal(s.astype(np.float64), np.full(2, float(np.float32(4097).astype(dtype))))
