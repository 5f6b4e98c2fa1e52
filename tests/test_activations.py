"""tpmpi.layers.activations: exact erf, each activation's derivative against a central
difference, GELU's values, and half-precision inputs evaluated in float32 and rounded once."""
import math

import numpy as np
import pytest

from problems import HALFS
from tpmpi.layers import activations
from tpmpi.layers.activations import (ACTIVATIONS, erf, gelu_erf_and_cdf, gelu_erf_backward,
                                      get_activation, normal_cdf)


def exact_gelu_erf(x):
    """(Phi, x Phi, Phi + x phi) in float64 from math.erf, element by element."""
    phi = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    x64 = x.astype(np.float64)
    return phi, x64 * phi, phi + x64 * np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)


def test_float32_gelu_erf_within_float32_rounding():
    """The in-place float32 path (rational erf) errs by at most 4 float32 epsilons times
    max(1, |x|) -- the rounding of Phi near 1 or 0.5, scaled by x -- over the range where erf
    bends and beyond its clamp, and agrees with the float64 path to that bound."""
    x = np.concatenate([np.linspace(-12, 12, 48001), [0.0, -0.0, 5.65685, -5.65686]]
                       ).astype(np.float32)
    bound = 4 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(x.astype(np.float64)))
    f, df = get_activation("gelu_erf")
    for fn, want in zip((normal_cdf, f, df), exact_gelu_erf(x)):
        got = fn(x)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()
        assert np.all(np.abs(got - fn(x.astype(np.float64))) <= bound)


def test_float32_chunks_are_independent(monkeypatch):
    """Every shape (empty, strided, not a multiple of the chunk) gives the values of one
    whole-array evaluation, bit for bit."""
    x = np.random.default_rng(0).standard_normal((7, 13, 5)).astype(np.float32) * 3
    f, df = get_activation("gelu_erf")
    whole = [fn(x) for fn in (f, df, normal_cdf)]
    monkeypatch.setattr(activations, "_CHUNK", 17)
    for fn, want in zip((f, df, normal_cdf), whole):
        assert np.array_equal(fn(x), want)
        assert np.array_equal(fn(x[:, ::2]), want[:, ::2])
        assert fn(np.empty((0, 4), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_and_cdf_and_the_backward_from_the_cdf(dtype, monkeypatch):
    """``gelu_erf_and_cdf`` is (x Phi, Phi) and ``gelu_erf_backward`` is dh (Phi + x phi)
    against math.erf in float64, across chunk boundaries (a chunk of 17 elements: the last one
    short), for a strided input, into given arrays (dh itself for the gradient), and into new
    arrays where the given ones do not fit."""
    monkeypatch.setattr(activations, "_CHUNK", 17)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((9, 11)) * 3).astype(dtype)
    dh = rng.standard_normal((9, 11)).astype(dtype)
    phi, gelu, grad = (a.reshape(x.shape) for a in exact_gelu_erf(x.reshape(-1)))
    bound = 4 * np.finfo(dtype).eps * np.maximum(1.0, np.abs(x.astype(np.float64)))
    out, cdf = np.empty_like(x), np.empty_like(x)
    y, c = gelu_erf_and_cdf(x, out, cdf)
    assert y is out and c is cdf and y.dtype == c.dtype == dtype
    assert np.all(np.abs(c - phi) <= bound) and np.all(np.abs(y - gelu) <= bound)
    d = dh.copy()
    g = gelu_erf_backward(d, x, c, out=d)
    assert g is d and g.dtype == dtype
    assert np.all(np.abs(g - dh * grad) <= bound * (1 + np.abs(dh)))
    wide = np.concatenate([x, x], axis=1)[:, ::2]  # strided, not C-contiguous
    y2, c2 = gelu_erf_and_cdf(wide, np.empty((2, 2), dtype), np.empty((9, 11), np.float16))
    assert y2.shape == c2.shape == wide.shape and np.array_equal(y2, gelu_erf_and_cdf(
        np.ascontiguousarray(wide))[0])
    g2 = gelu_erf_backward(dh, x, c)
    assert g2 is not dh and np.array_equal(g2, g)
    empty = np.empty((0, 3), dtype)
    assert gelu_erf_and_cdf(empty)[0].shape == gelu_erf_backward(empty, empty, empty).shape


def test_erf_is_exact():
    x = np.linspace(-6, 6, 10001)
    exact = np.array([math.erf(v) for v in x])
    assert np.all(np.abs(erf(x) - exact) <= 2 * np.spacing(np.abs(exact) + 1e-300))
    assert erf(x.astype(np.float32)).dtype == np.float32
    assert erf(np.empty((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives(name):
    f, df = get_activation(name)
    x = np.linspace(-4, 4, 801) + 1e-3  # avoid relu's kink at 0
    eps = 1e-6
    numeric = (f(x + eps) - f(x - eps)) / (2 * eps)
    assert np.abs(df(x) - numeric).max() < 1e-7
    x32 = x.astype(np.float32)
    assert f(x32).dtype == np.float32 and df(x32).dtype == np.float32


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    exact = x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.allclose(get_activation("gelu_erf")[0](x), exact, rtol=0, atol=1e-15)
    assert np.abs(get_activation("gelu")[0](x) - exact).max() < 1e-3  # tanh approximation
    assert np.array_equal(get_activation("relu")[0](x), np.maximum(x, 0))
    with pytest.raises(ValueError, match="activation='swish': expected one of gelu"):
        get_activation("swish")


@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_keep_half_dtypes(dtype, name):
    f, df = ACTIVATIONS[name]
    x = np.linspace(-3, 3, 41).astype(dtype)
    for fn in (f, df, normal_cdf):
        y = fn(x)
        assert y.dtype == np.dtype(dtype)
        assert np.array_equal(y.view(np.uint16),
                              fn(x.astype(np.float32)).astype(dtype).view(np.uint16))
