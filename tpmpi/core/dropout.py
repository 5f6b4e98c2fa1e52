"""Layout-invariant dropout masks (counter-based, like :mod:`tpmpi.core.init`).

The mask of one dropout site in one forward call is a function of global coordinates only:
element ``e`` (C order within one sample's ``sample_shape``) of global sample ``s`` has the
index ``i = s * prod(sample_shape) + e``; it is kept when the 32-bit word ``i % 2`` (0: the low
half) of the raw 64-bit draw ``i // 2`` of the Philox4x64 stream keyed by ``(seed,
DROPOUT_STREAM)``, in the counter range of ``(call, layer, site)``, is at least ``ceil(p *
2**32)`` -- a uniform number in ``[0, 1)`` compared with ``p`` to 2**-32 (two elements a draw
halve the generator's cost, the larger part of a mask's). Any block of a mask -- a rank's
heads, a token shard under sequence parallelism, a data-parallel replica's samples -- is
therefore generated alone and is bit-identical to the same block of the serial run's whole
mask, and a backward pass regenerates the forward's mask with no saved state.

Coordinates: ``call`` counts the forward calls that apply dropout (training steps), ``layer`` is
the transformer block (0 for the embedding), ``site`` one of :class:`Site`; the sample shapes
the model uses are ``(T, n_embd)`` for the hidden sites and ``(n_head, T, T)`` (query head,
query position, key position) for the attention probabilities, with ``T`` the sequence length
of the call and the head index global.

Kept elements are scaled by ``1 / (1 - p)`` (inverted dropout), so the expectation is unchanged
and evaluation needs no rescaling: :func:`keep_scale`.
"""
from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

from .arrays import Array, DTypeLike
from .backend import Backend, backend_of, get_backend
from .init import block_runs, philox_draws

DROPOUT_STREAM = 0x44524F504F555400
"""Second key word of every dropout stream ("DROPOUT" in ASCII): weights use small streams."""
_WORD = 1 << 64


class Site(enum.IntEnum):
    """The dropout sites of a GPT block (nanoGPT's): after the token + position embedding sum,
    on the attention probabilities, after the attention's ``c_proj`` and after the MLP's."""

    EMBEDDING = 0
    ATTENTION = 1
    ATTENTION_OUTPUT = 2
    MLP_OUTPUT = 3


Span = Union[slice, tuple[int, int]]


def check_probability(p: Any, name: str = "dropout") -> float:
    """``p`` as a float in ``[0, 1)``; ValueError naming ``name`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}={p!r}: expected a number with 0 <= {name} < 1")
    return float(p)


def _coordinate(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= int(value) < _WORD:
        raise ValueError(f"{name}={value!r}: expected an integer in [0, 2**64)")
    return int(value)


def _span(name: str, s: Span, n: Optional[int]) -> tuple[int, int]:
    if isinstance(s, slice):
        if s.step not in (None, 1) or (n is None and (s.start is None or s.stop is None)):
            raise ValueError(f"{name}={s!r}: expected a contiguous slice with bounds")
        start, stop, _ = s.indices(n) if n is not None else (s.start, s.stop, 1)
    else:
        start, stop = s
    if not 0 <= start <= stop or (n is not None and stop > n):
        raise ValueError(f"{name}={s!r}: expected 0 <= start <= stop" +
                         (f" <= {n}" if n is not None else ""))
    return int(start), int(stop)


def keep_mask(p: float, *, seed: int, call: int, layer: int, site: int,
              sample_shape: Sequence[int], samples: Span, block: Sequence[Span] = (),
              backend: Union[str, Backend, None] = None) -> Array:
    """Boolean keep mask of global ``samples`` (a range of sample indices) and, within each
    sample, the ``block`` (one span per leading axis of ``sample_shape``; missing axes whole).

    Returns shape ``(n_samples, *block sizes)`` on ``backend`` (default NumPy); ``True`` where
    the element is kept. ``p == 0`` keeps everything without drawing. No communication.
    """
    p = check_probability(p, "p")
    key_words = [_coordinate(n, v) for n, v in
                 (("seed", seed), ("call", call), ("layer", layer), ("site", site))]
    sample_shape = tuple(int(n) for n in sample_shape)
    if min(sample_shape, default=0) < 0:
        raise ValueError(f"sample_shape={sample_shape}: expected sizes >= 0")
    if len(block) > len(sample_shape):
        raise ValueError(f"block={tuple(block)}: expected at most {len(sample_shape)} spans")
    s0, s1 = _span("samples", samples, None)
    spans = [(s0, s1)] + [_span("block", b, n) for b, n in zip(block, sample_shape)]
    spans += [(0, n) for n in sample_shape[len(block):]]
    if s1 * math.prod(sample_shape) > 4 * _WORD:
        raise ValueError(f"samples={samples!r}, sample_shape={sample_shape}: expected fewer "
                         "than 2**66 elements up to the last sample")
    threshold = math.ceil(p * 2.0**32)
    out = np.full([stop - start for start, stop in spans], threshold < 2**32, dtype=bool)
    if 0 < threshold < 2**32:
        seed_, call_, layer_, site_ = key_words
        key = np.array([seed_, DROPOUT_STREAM], dtype=np.uint64)
        base = (call_ * _WORD + layer_) * _WORD ** 2 + site_ * _WORD
        flat = out.reshape(-1)
        for offset, first, count in block_runs((s1,) + sample_shape, spans):
            d0 = first // 2
            raw = philox_draws(key, d0, (first + count + 1) // 2 - d0, base)
            words = raw.astype("<u8", copy=False).view("<u4")[first % 2:first % 2 + count]
            np.greater_equal(words, np.uint32(threshold), out=flat[offset:offset + count])
    return get_backend(backend or "numpy").asarray(out)


def keep_scale(keep: Array, p: float, dtype: DTypeLike) -> Array:
    """The multiplier of inverted dropout: ``1 / (1 - p)`` where ``keep``, else 0, as
    ``dtype`` (the caller's compute type: float32 for 2-byte activations, so the scale is not
    rounded to half precision)."""
    p = check_probability(p, "p")
    return backend_of(keep).xp.multiply(keep, 1.0 / (1.0 - p), dtype=dtype)


def attention_keep(p: float, *, seed: int, call: int, layer: int, n_head: int, seq: int,
                   q_head0: int = 0, sample0: int = 0,
                   backend: Union[str, Backend, None] = None) -> Callable[[int, int, int], Array]:
    """The keep-mask source of the attention probabilities of a rank whose first query head is
    global head ``q_head0`` and whose first sample is global sample ``sample0``: ``keep(head,
    b0, b1)`` returns the ``(b1 - b0, seq, seq)`` mask of its local query head ``head`` for its
    samples ``b0 .. b1 - 1`` (site :attr:`Site.ATTENTION`, sample shape ``(n_head, seq, seq)``),
    what :func:`tpmpi.layers.attention_core.causal_attention` asks for, one head at a time."""
    def keep(head: int, b0: int, b1: int) -> Array:
        h = q_head0 + head
        return keep_mask(p, seed=seed, call=call, layer=layer, site=Site.ATTENTION,
                         sample_shape=(n_head, seq, seq), samples=(sample0 + b0, sample0 + b1),
                         block=[(h, h + 1)], backend=backend)[:, 0]
    return keep
