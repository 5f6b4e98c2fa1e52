"""float16 and bfloat16 on the CPU: local products in float32 rounded once (bounded workspace),
float32 column sums, activations that keep the dtype, the tolerance formula, and every scheme
against the float64 reference at world sizes 1-4."""
import numpy as np
import pytest

import tpmpi
from tpmpi.core import gemm
from tpmpi.layers.activations import ACTIVATIONS
from tpmpi.core.dtypes import UNIT_ROUNDOFF, tolerance
from tpmpi.core.grid import factorisations
from tpmpi.studies.schemes import Problem, build

try:
    import ml_dtypes  # noqa: F401
    HALFS = ["float16", "bfloat16"]
except ImportError:
    HALFS = ["float16", pytest.param("bfloat16", marks=pytest.mark.skip(
        reason="bfloat16 needs the ml_dtypes package (not installed)"))]


def _operands(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)


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


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_keep_half_dtypes(dtype, name):
    f, df = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 41).astype(dtype)
    for fn in (f, df):
        y = fn(x)
        assert y.dtype == np.dtype(dtype)
        assert np.array_equal(y.view(np.uint16),
                              fn(x.astype(np.float32)).astype(dtype).view(np.uint16))


def test_tolerance_follows_unit_roundoff_and_k():
    for dtype, acc in [("float64", "float64"), ("float32", "float32"),
                       ("float16", "float32"), ("bfloat16", "float32")]:
        u, ua = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[acc]
        assert tolerance(dtype, 1000) == pytest.approx(8 * u + 2000 * ua)
        assert tolerance(dtype, 4096) > tolerance(dtype, 1024)
    assert UNIT_ROUNDOFF["bfloat16"] == 2.0**-8 and UNIT_ROUNDOFF["float16"] == 2.0**-11
    assert Problem(scheme="mlp", m=9, k=5, n=5, backward=True).longest_sum == 20  # hidden 4k
    assert Problem(m=9000, k=5, n=7).longest_sum == 5  # forward: K only
    assert Problem(m=9000, k=5, n=7, backward=True).longest_sum == 9000  # dW sums over M


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("scheme", ["column", "row", "mlp", "tile2d"])
@pytest.mark.parametrize("m,k,n", [(40, 24, 24), (7, 5, 3)])
def test_every_scheme_in_half_precision(world, scheme, dtype, m, k, n):
    """Forward and backward of every scheme (tile2d on every grid, gather and panel forms)
    within the tolerance of the float64 reference."""
    if not world.member:
        return
    if scheme == "mlp":
        n = k
    shapes = factorisations(world.size) if scheme == "tile2d" else [(1, world.size)]
    for shape in shapes:
        for options in ([(), (("panel", 2),)] if scheme == "tile2d" else [()]):
            p = Problem(scheme=scheme, m=m, k=k, n=n, hidden=3, dtype=dtype, backward=True,
                        options=options)
            with tpmpi.ProcessGrid(world.comm, shape=shape, blas_threads=None) as grid:
                case = build(p, grid, tpmpi.core.backend.get_backend("numpy"))
                err = case.verify()
            assert err <= tolerance(dtype, p.longest_sum), (shape, options, err)
            assert err > 0  # really computed in half precision
