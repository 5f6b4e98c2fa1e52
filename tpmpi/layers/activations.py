"""Element-wise activations and their derivatives, on NumPy or CuPy arrays.

* ``"gelu"`` (the default of :class:`tpmpi.ParallelMLP`): the tanh approximation
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2, Megatron's ``openai_gelu``);
  pure array arithmetic, fast on every backend.
* ``"gelu_erf"``: the exact ``x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))`` (PyTorch's default
  GELU and nanoGPT's). ``erf`` is vectorised: ``scipy.special.erf`` on NumPy arrays,
  ``cupyx.scipy.special.erf`` on CuPy arrays, never a Python call per element (``math.erf``
  through ``np.frompyfunc`` took 655 ms on 4M float32 elements on a 2-core machine, SciPy's
  ufunc 75 ms; within 2 ulp of ``math.erf``).
* ``"relu"``: ``max(x, 0)``, derivative 0 at 0.

Each entry of :data:`ACTIVATIONS` is ``(f, df)``; both take the pre-activation array and return
a new array of its dtype. float16 and bfloat16 inputs are evaluated in float32 and rounded once
(:func:`in_float32`): the formulas' Python-float constants would otherwise promote bfloat16 to
float32 (ml_dtypes' promotion rules) and float16 loses accuracy in ``tanh``/``exp``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from scipy.special import erf as scipy_erf

from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.gemm import HALF

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = 0.044715

Activation = Callable[[Array], Array]


def erf(x: Array) -> Array:
    """Element-wise error function in ``x``'s dtype (see the module docstring)."""
    if backend_of(x).is_gpu:
        from cupyx.scipy.special import erf as cupy_erf

        return cupy_erf(x)
    return scipy_erf(x)


def gelu(x: Array) -> Array:
    """GELU, tanh approximation."""
    xp = backend_of(x).xp
    return 0.5 * x * (1 + xp.tanh(_SQRT_2_OVER_PI * (x + _C * x * x * x)))


def gelu_grad(x: Array) -> Array:
    """Derivative of :func:`gelu`."""
    xp = backend_of(x).xp
    t = xp.tanh(_SQRT_2_OVER_PI * (x + _C * x * x * x))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _C * x * x)


def gelu_erf(x: Array) -> Array:
    """Exact GELU ``x Phi(x)``."""
    return 0.5 * x * (1 + erf(x * _INV_SQRT_2))


def gelu_erf_grad(x: Array) -> Array:
    """Derivative of :func:`gelu_erf`: ``Phi(x) + x phi(x)``."""
    xp = backend_of(x).xp
    return 0.5 * (1 + erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x)


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
