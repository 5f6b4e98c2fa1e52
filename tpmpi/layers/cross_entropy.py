"""The local pieces of the vocabulary-parallel cross-entropy: each rank holds the logits of its
vocabulary block ``(N, V_p)`` (columns ``[start, start + V_p)`` of the ``(N, V)`` logits, from
the tied ``lm_head`` block), and no rank ever forms the full logits. The parallel loss is

1. ``m = local_max(logits)``, then an Allreduce(MAX) over the group -> the row maxima ``(N,)``;
2. ``s = local_sums(logits, start, targets, m, ...)``, then one Allreduce(SUM) of the stacked
   ``(2, N)`` (``(3, N)`` with label smoothing) -> :class:`Sums`;
3. ``loss, count = finish_loss(sums, targets, V, ...)`` on every rank, and in backward
   ``logits_grad(logits, start, targets, m, sums, V, ..., scale=dloss / count)``, the gradient
   of the local logits block with no communication.

The loss is PyTorch's ``cross_entropy(..., ignore_index, label_smoothing=a)``: per target
``(1 - a) (lse - z_t) + a (lse - mean_v z_v)`` averaged over the targets that are not
``ignore_index`` (NaN when there are none, with a zero gradient, as torch). The smoothing term
needs the mean of the logits over the *full* vocabulary, hence the third agreed row (and the
full ``V`` in both the loss and its gradient): using the local block's size and mean makes the
loss depend on the TP size (Megatron-LM #737). Values are shifted by the agreed maximum before
any exponential; float16/bfloat16 logits are computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from ..core.arrays import Array
from ..core.backend import backend_of
from .functional import accumulation_dtype

IGNORE_INDEX = -100
"""Targets equal to this contribute nothing (torch's default)."""


def check_targets(targets: Array, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> None:
    """ValueError (naming ``targets``) unless every target is an integer in ``[0, vocab_size)``
    or ``ignore_index``; local (the layer agrees on the outcome before its collectives)."""
    xp = backend_of(targets).xp
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets.dtype={targets.dtype.name}: expected an integer dtype")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(xp.any(bad)):
        first = int(targets[bad].reshape(-1)[0])
        raise ValueError(f"targets contain {first}: expected ids in [0, {vocab_size}) or "
                         f"ignore_index={ignore_index}")


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected 0 <= label_smoothing "
                         "<= 1")
    return float(label_smoothing)


def _targets_here(targets: Array, start: int, rows: int, ignore_index: int
                  ) -> tuple[Array, Array]:
    """(row indices, local columns) of the non-ignored targets inside the block."""
    xp = backend_of(targets).xp
    local = targets.reshape(-1) - start
    here = xp.flatnonzero((targets.reshape(-1) != ignore_index) & (local >= 0) & (local < rows))
    return here, local[here]


def local_max(logits: Array) -> Array:
    """Per-row maximum of the block ``(N, V_p)`` -> ``(N,)`` in the compute type; ``-inf`` for an
    empty block. The group agrees with an Allreduce(MAX)."""
    xp = backend_of(logits).xp
    acc = accumulation_dtype(logits.dtype)
    if logits.shape[1] == 0:
        return xp.full(logits.shape[0], -math.inf, dtype=acc)
    return logits.max(axis=1).astype(acc)


@dataclasses.dataclass
class Sums:
    """The agreed sums over the full vocabulary, per row (``(N,)`` each, shifted by the agreed
    row maximum ``m``): ``exp`` = ``sum_v exp(z_v - m)``, ``target`` = ``z_t - m`` (0 for an
    ignored target), ``logits`` = ``sum_v (z_v - m)`` (None without label smoothing)."""

    exp: Array
    target: Array
    logits: Optional[Array]

    @classmethod
    def from_rows(cls, rows: Array) -> Sums:
        """From the agreed ``(2, N)`` or ``(3, N)`` array of :func:`local_sums`' layout."""
        return cls(rows[0], rows[1], rows[2] if rows.shape[0] == 3 else None)


def local_sums(logits: Array, start: int, targets: Array, row_max: Array, *,
               label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> Array:
    """This block's share of :class:`Sums`, stacked ``(2, N)`` -- ``sum exp(z - m)``, ``z_t -
    m`` where the target is in the block (else 0) -- plus ``sum (z - m)`` as a third row when
    ``label_smoothing > 0``. ``row_max`` is the agreed ``(N,)`` maximum. The group adds the
    rows with one Allreduce(SUM)."""
    smoothing = _check_smoothing(label_smoothing)
    xp = backend_of(logits).xp
    acc = accumulation_dtype(logits.dtype)
    n, rows = logits.shape
    shifted = xp.subtract(logits, row_max[:, None], dtype=acc)
    out = xp.zeros((3 if smoothing > 0 else 2, n), dtype=acc)
    if smoothing > 0:
        out[2] = shifted.sum(axis=1)
    here, cols = _targets_here(targets, start, rows, ignore_index)
    out[1, here] = shifted[here, cols]
    xp.exp(shifted, out=shifted)
    out[0] = shifted.sum(axis=1)
    return out


def finish_loss(sums: Sums, targets: Array, vocab_size: int, *, label_smoothing: float = 0.0,
                ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """``(mean loss, count)`` over the ``count`` targets that are not ``ignore_index``, from the
    agreed sums; NaN when ``count`` is 0. The same on every rank of the group."""
    smoothing = _check_smoothing(label_smoothing)
    xp = backend_of(sums.exp).xp
    valid = targets.reshape(-1) != ignore_index
    count = int(xp.count_nonzero(valid))
    if count == 0:
        return math.nan, 0
    log_sum = xp.log(sums.exp[valid])
    loss = (1.0 - smoothing) * (log_sum - sums.target[valid])
    if smoothing > 0:
        assert sums.logits is not None, "label smoothing needs the agreed sum of logits"
        loss += smoothing * (log_sum - sums.logits[valid] / vocab_size)
    return float(loss.sum(dtype=np.float64)) / count, count


def logits_grad(logits: Array, start: int, targets: Array, row_max: Array, sums: Sums,
                vocab_size: int, *, scale: float, label_smoothing: float = 0.0,
                ignore_index: int = IGNORE_INDEX) -> Array:
    """Gradient of ``scale x`` the summed loss with respect to this block of logits (``(N,
    V_p)``, ``logits``' dtype): ``softmax - (1 - a) onehot(target) - a / V`` on the rows whose
    target is not ignored, 0 elsewhere; ``scale`` is ``dloss / count`` for the mean. Local:
    no communication (the agreed ``row_max`` and ``sums`` are all it needs)."""
    smoothing = _check_smoothing(label_smoothing)
    xp = backend_of(logits).xp
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[1]
    grad = xp.subtract(logits, row_max[:, None], dtype=acc)
    xp.exp(grad, out=grad)
    grad /= sums.exp[:, None]
    if smoothing > 0:
        grad -= smoothing / vocab_size
    here, cols = _targets_here(targets, start, rows, ignore_index)
    grad[here, cols] -= 1.0 - smoothing
    grad *= ((targets.reshape(-1) != ignore_index) * scale).astype(acc)[:, None]
    return grad.astype(logits.dtype, copy=False)
