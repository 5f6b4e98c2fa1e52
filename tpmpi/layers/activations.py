"""Element-wise activations and their derivatives, on NumPy or CuPy arrays.

* ``"gelu"`` (the default of :class:`tpmpi.ParallelMLP`): the tanh approximation
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2, Megatron's ``openai_gelu``);
  pure array arithmetic, fast on every backend.
* ``"gelu_erf"``: the exact ``x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))`` (PyTorch's default
  GELU and nanoGPT's). ``erf`` is vectorised, never a Python call per element: on float32
  NumPy arrays the rational approximation of Eigen and XLA (``x P(x^2) / Q(x^2)``, the argument
  clamped where erf is +-1 in float32; within 8 ulp of the exact erf) evaluated in place, a
  cache-sized chunk at a time (:func:`normal_cdf`), about 3 ns an element where SciPy's ufunc
  takes 14 ns (it computes each float32 element in double precision through a scalar routine);
  ``scipy.special.erf`` for float64 (within 2 ulp of ``math.erf``) and
  ``cupyx.scipy.special.erf`` on CuPy arrays (one fused kernel).
* ``"relu"``: ``max(x, 0)``, derivative 0 at 0.

Each entry of :data:`ACTIVATIONS` is ``(f, df)``; both take the pre-activation array and return
a new array of its dtype. float16 and bfloat16 inputs are evaluated in float32 and rounded once
(:func:`in_float32`): the formulas' Python-float constants would otherwise promote bfloat16 to
float32 (ml_dtypes' promotion rules) and float16 loses accuracy in ``tanh``/``exp``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
from scipy.special import erf as scipy_erf

from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.gemm import HALF

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = 0.044715

# Eigen's float32 erf(u) = u P(u^2) / Q(u^2) on |u| <= 4, lowest power last; folded here for
# Phi(x) = 0.5 + 0.5 erf(x / sqrt 2) = 0.5 + x P'(x^2) / Q'(x^2) on |x| <= 4 sqrt 2
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)
_PHI_P = tuple(np.float32(c * _INV_SQRT_2 / 2 / 2.0**(len(_ERF_P) - 1 - i))
               for i, c in enumerate(_ERF_P))
_PHI_Q = tuple(np.float32(c / 2.0**(len(_ERF_Q) - 1 - i)) for i, c in enumerate(_ERF_Q))
_PHI_CLAMP = np.float32(4.0 * math.sqrt(2.0))
_CHUNK = 1 << 15  # elements a pass: a chunk's four float32 temporaries stay in L2 (512 KiB)

Activation = Callable[[Array], Array]


def erf(x: Array) -> Array:
    """Element-wise error function in ``x``'s dtype (see the module docstring)."""
    if backend_of(x).is_gpu:
        from cupyx.scipy.special import erf as cupy_erf

        return cupy_erf(x)
    return scipy_erf(x)


def _horner(x2: np.ndarray, coefs: tuple[np.float32, ...], out: np.ndarray) -> None:
    np.multiply(x2, coefs[0], out=out)
    out += coefs[1]
    for c in coefs[2:]:
        out *= x2
        out += c


def _phi_chunk(x: np.ndarray, out: np.ndarray, xc: np.ndarray, x2: np.ndarray,
               q: np.ndarray) -> None:
    """``out = Phi(x)`` for a float32 chunk, in place over the scratch ``xc, x2, q``."""
    np.clip(x, -_PHI_CLAMP, _PHI_CLAMP, out=xc)
    np.multiply(xc, xc, out=x2)
    _horner(x2, _PHI_P, out)
    out *= xc
    _horner(x2, _PHI_Q, q)
    out /= q
    out += np.float32(0.5)


def _float32_map(body: Callable[..., None], inputs: tuple[np.ndarray, ...],
                 outputs: tuple[np.ndarray, ...]) -> None:
    """``body(*input chunks, *output chunks, xc, x2, q)`` over cache-sized flat chunks of
    same-shaped float32 arrays (``outputs`` C-contiguous), with three scratch chunks."""
    flat_in = [np.ascontiguousarray(a).reshape(-1) for a in inputs]
    flat_out = [o.reshape(-1) for o in outputs]
    size = flat_in[0].size
    n = max(1, min(_CHUNK, size))
    scratch = np.empty((3, n), dtype=np.float32)
    for i in range(0, size, n):
        j = min(size, i + n)
        body(*(a[i:j] for a in flat_in), *(o[i:j] for o in flat_out),
             *(w[:j - i] for w in scratch))


def _float32_chunks(x: np.ndarray, finish: Callable[..., None]) -> np.ndarray:
    """``Phi`` of each chunk of float32 ``x``, then ``finish(x, out, xc, x2, q)`` on it (the
    scratch free to reuse): a new array of ``x``'s shape."""
    out = np.empty(x.shape, dtype=np.float32)

    def body(xi: np.ndarray, oi: np.ndarray, *work: np.ndarray) -> None:
        _phi_chunk(xi, oi, *work)
        finish(xi, oi, *work)
    _float32_map(body, (x,), (out,))
    return out


def _fast_erf(x: Array) -> bool:
    """Whether ``x`` takes the in-place float32 path (float32 NumPy arrays)."""
    return isinstance(x, np.ndarray) and x.dtype == np.float32


def _normal_cdf(x: Array) -> Array:
    """``Phi(x)`` of float32 or float64 ``x`` (:data:`normal_cdf` for every dtype)."""
    if _fast_erf(x):
        return _float32_chunks(x, lambda *_: None)
    return 0.5 * (1 + erf(x * _INV_SQRT_2))


def gelu(x: Array) -> Array:
    """GELU, tanh approximation."""
    xp = backend_of(x).xp
    return 0.5 * x * (1 + xp.tanh(_SQRT_2_OVER_PI * (x + _C * x * x * x)))


def gelu_grad(x: Array) -> Array:
    """Derivative of :func:`gelu`."""
    xp = backend_of(x).xp
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _C * x * x * x))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _C * x * x)


def _times_x(x: np.ndarray, out: np.ndarray, *_: np.ndarray) -> None:
    out *= x


def _x_pdf(x: Array, out: Array) -> Array:
    """``out = x phi(x)`` (``out`` an array of ``x``'s shape and dtype, e.g. a chunk's
    scratch), in place; returns ``out``."""
    xp = backend_of(x).xp
    xp.multiply(x, x, out=out)
    out *= -0.5
    xp.exp(out, out=out)
    out *= x
    out *= _INV_SQRT_2PI
    return out


def _plus_x_pdf(x: np.ndarray, out: np.ndarray, t: np.ndarray, *_: np.ndarray) -> None:
    out += _x_pdf(x, t)


def gelu_erf(x: Array) -> Array:
    """Exact GELU ``x Phi(x)``."""
    if _fast_erf(x):
        return _float32_chunks(x, _times_x)
    return x * _normal_cdf(x)


def gelu_erf_grad(x: Array) -> Array:
    """Derivative of :func:`gelu_erf`: ``Phi(x) + x phi(x)``."""
    if _fast_erf(x):
        return _float32_chunks(x, _plus_x_pdf)
    g = _x_pdf(x, backend_of(x).xp.empty_like(x))
    g += _normal_cdf(x)
    return g


def _fresh(out: Optional[Array], like: Array) -> Array:
    """``out`` when it is a C-contiguous array of ``like``'s shape and dtype, else a new one."""
    if out is not None and out.shape == like.shape and out.dtype == like.dtype \
            and out.flags.c_contiguous:
        return out
    return backend_of(like).xp.empty(like.shape, dtype=like.dtype)


def gelu_erf_and_cdf(x: Array, out: Optional[Array] = None, cdf: Optional[Array] = None
                     ) -> tuple[Array, Array]:
    """``(x Phi(x), Phi(x))`` of float32 or float64 ``x``: the exact GELU and the normal CDF
    that :func:`gelu_erf_backward` reuses (one ``erf`` a step). Written into ``out`` and
    ``cdf`` when they fit (C-contiguous, ``x``'s shape and dtype: a caller's reused
    workspace), else new arrays. Float32 NumPy: one sweep over cache-sized chunks."""
    out, cdf = _fresh(out, x), _fresh(cdf, x)
    if _fast_erf(x):
        def body(xi: np.ndarray, yi: np.ndarray, ci: np.ndarray, *work: np.ndarray) -> None:
            _phi_chunk(xi, ci, *work)
            np.multiply(xi, ci, out=yi)
        _float32_map(body, (x,), (out, cdf))
        return out, cdf
    xp = backend_of(x).xp
    xp.multiply(x, _INV_SQRT_2, out=cdf)
    cdf[...] = erf(cdf)
    cdf += 1.0
    cdf *= 0.5
    xp.multiply(x, cdf, out=out)
    return out, cdf


def gelu_erf_backward(dh: Array, x: Array, cdf: Array, out: Optional[Array] = None) -> Array:
    """``dh (Phi(x) + x phi(x))``, the exact GELU's input gradient from the forward's
    ``cdf = Phi(x)`` (:func:`gelu_erf_and_cdf`), into ``out`` when it fits (``dh`` itself
    allowed), else a new array. Float32 NumPy: one sweep over cache-sized chunks."""
    out = _fresh(out, x)
    if _fast_erf(x) and dh.dtype == np.float32:
        def body(xi: np.ndarray, ci: np.ndarray, di: np.ndarray, oi: np.ndarray,
                 t: np.ndarray, *_: np.ndarray) -> None:
            _x_pdf(xi, t)
            t += ci
            np.multiply(t, di, out=oi)
        _float32_map(body, (x, cdf, dh), (out,))
        return out
    xp = backend_of(x).xp
    g = _x_pdf(x, xp.empty_like(x))
    g += cdf
    return xp.multiply(g, dh, out=out)


def relu(x: Array) -> Array:
    """``max(x, 0)``."""
    return backend_of(x).xp.maximum(x, 0)


def relu_grad(x: Array) -> Array:
    """Derivative of :func:`relu` (0 at 0)."""
    return (x > 0).astype(x.dtype)


def in_float32(fn: Activation) -> Activation:
    """``fn`` evaluated in float32 for float16/bfloat16 input, the result rounded once to the
    input's dtype; other dtypes pass through."""
    @functools.wraps(fn)
    def wrapped(x: Array) -> Array:
        if x.dtype.name in HALF:
            return fn(x.astype(np.float32)).astype(x.dtype)
        return fn(x)
    return wrapped


normal_cdf = in_float32(_normal_cdf)
"""``Phi(x) = 0.5 (1 + erf(x / sqrt 2))`` in ``x``'s dtype (see the module docstring)."""

ACTIVATIONS: dict[str, tuple[Activation, Activation]] = {
    name: (in_float32(f), in_float32(df)) for name, (f, df) in {
        "gelu": (gelu, gelu_grad),
        "gelu_erf": (gelu_erf, gelu_erf_grad),
        "relu": (relu, relu_grad),
    }.items()}


def get_activation(name: str) -> tuple[Activation, Activation]:
    """``(f, df)`` for ``name``; ValueError listing the choices otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
