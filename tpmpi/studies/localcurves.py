"""Local work on a calibrated machine as measured curves (:class:`LocalCurves`), the part of a
``calibrate`` file (field ``local``, per ``backend:dtype``) that prices a schedule's products
and element-wise steps. Pure: the measurements are :mod:`tpmpi.studies.localbench`'s.

A local step costs one ``overhead_s`` -- the Python and dispatch time of one local operation,
measured as the time of a tiny product -- plus its work:

* a :class:`~tpmpi.core.schedule.Product` of ``batch`` products ``(m, k) @ (k, n)`` takes
  ``batch x t(m, k, n)``, where ``t`` is the time of one product measured on a grid of shapes
  (every ``(m, k, n)`` of ``dims`` cubed, each timed inside a batched call as the attention
  core runs its per-head products, so the call's own dispatch is spread over the batch). Between
  grid points the *rate* ``2 m k n / t`` is interpolated linearly in ``(log m, log k, log n)``
  (a BLAS's efficiency changes smoothly with each dimension's logarithm); outside the grid the
  rate at the nearest grid shape applies (the rate of the largest shapes is the sustained one);
* a :class:`~tpmpi.core.schedule.Pointwise` of ``nbytes`` takes ``nbytes x spb(nbytes)``, where
  ``spb`` (seconds per byte, beyond the step's overhead) is measured at a sweep of sizes on the
  layers' own element-wise kernels -- each counted at the bytes of its inputs and outputs, the
  schedule's convention, so the passes and temporaries a kernel makes beyond that are in the
  rate -- and interpolated linearly in ``log nbytes`` (in cache at the small sizes, from memory
  at the large ones), clamped at the ends of the sweep.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.args import is_number


def _axis(dims: np.ndarray, x: float) -> tuple[int, float]:
    """``(i, w)``: ``x`` lies at ``(1 - w) dims[i] + w dims[i + 1]`` in log space, clamped to
    the grid (a grid of one point: ``(0, 0)``)."""
    if len(dims) == 1:
        return 0, 0.0
    lx = math.log(min(max(x, dims[0]), dims[-1]))
    i = max(min(int(np.searchsorted(dims, x, side="right")) - 1, len(dims) - 2), 0)
    lo, hi = math.log(dims[i]), math.log(dims[i + 1])
    return i, (lx - lo) / (hi - lo)


@dataclasses.dataclass(frozen=True)
class LocalCurves:
    """Measured local work of one ``backend:dtype`` (see the module docstring): ``overhead_s``
    (seconds per local step), ``dims`` (the grid's sizes, increasing), ``gemm_s[i][j][l]``
    (seconds of one ``(dims[i], dims[j]) @ (dims[j], dims[l])`` product), ``pointwise_bytes``
    (increasing) and ``pointwise_spb`` (seconds per byte at each)."""

    overhead_s: float
    dims: tuple[int, ...]
    gemm_s: tuple
    pointwise_bytes: tuple[float, ...]
    pointwise_spb: tuple[float, ...]

    @functools.cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        """The grid's sizes and the log of its rates (computed once: a schedule prices many
        products)."""
        d = np.asarray(self.dims, dtype=np.float64)
        flops = 2.0 * d[:, None, None] * d[None, :, None] * d[None, None, :]
        return d, np.log(flops / np.asarray(self.gemm_s, dtype=np.float64))

    def rate(self, m: int, k: int, n: int) -> float:
        """Interpolated flop/s of one ``(m, k) @ (k, n)`` product."""
        dims, logs = self._grid
        (i, wi), (j, wj), (q, wq) = (_axis(dims, x) for x in (m, k, n))
        total = 0.0
        for di, fi in ((0, 1 - wi), (1, wi)):
            for dj, fj in ((0, 1 - wj), (1, wj)):
                for dq, fq in ((0, 1 - wq), (1, wq)):
                    weight = fi * fj * fq
                    if weight > 0:
                        total += weight * logs[i + di, j + dj, q + dq]
        return math.exp(total)

    def product_s(self, m: int, k: int, n: int, batch: int = 1) -> float:
        """Seconds of a step of ``batch`` products ``(m, k) @ (k, n)``: 0 when empty."""
        if min(m, k, n, batch) <= 0:
            return 0.0
        return self.overhead_s + batch * 2.0 * m * k * n / self.rate(m, k, n)

    def seconds_per_byte(self, nbytes: float) -> float:
        """Interpolated seconds per byte of element-wise work of ``nbytes``."""
        return float(np.interp(math.log(max(nbytes, 1.0)), np.log(self.pointwise_bytes),
                               self.pointwise_spb))

    def pointwise_s(self, nbytes: float) -> float:
        """Seconds of an element-wise step moving ``nbytes``: 0 when empty."""
        if nbytes <= 0:
            return 0.0
        return self.overhead_s + nbytes * self.seconds_per_byte(nbytes)

    def to_json(self) -> dict:
        return {"overhead_s": self.overhead_s,
                "gemm": {"dims": list(self.dims), "seconds": self.gemm_s},
                "pointwise": {"bytes": list(self.pointwise_bytes),
                              "seconds_per_byte": list(self.pointwise_spb)}}

    @classmethod
    def from_json(cls, data: Any, where: str) -> LocalCurves:
        """The curves of one ``local`` entry, checked: ValueError ``"<where>: field
        'gemm.seconds' is ...: expected ..."`` for the first field that is not what
        :meth:`to_json` writes."""
        def bad(field: str, value: Any, expected: str) -> ValueError:
            shown = repr(value)
            shown = shown if len(shown) < 80 else shown[:77] + "..."
            return ValueError(f"{where}: field {field!r} is {shown}: expected {expected}")

        def get(obj: Any, field: str) -> Any:
            node = obj
            for part in field.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    raise bad(field, None, "present")
                node = node[part]
            return node

        def increasing(field: str, value: Any) -> list:
            if not (isinstance(value, list) and value and all(
                    is_number(v) and v > 0 for v in value)
                    and all(a < b for a, b in zip(value, value[1:]))):
                raise bad(field, value, "a non-empty increasing list of positive numbers")
            return value

        overhead = get(data, "overhead_s")
        if not (is_number(overhead) and overhead >= 0):
            raise bad("overhead_s", overhead, "seconds >= 0")
        dims = increasing("gemm.dims", get(data, "gemm.dims"))
        seconds = get(data, "gemm.seconds")
        try:
            grid = np.asarray(seconds, dtype=np.float64)
        except (TypeError, ValueError):
            grid = np.zeros(0)
        if grid.shape != (len(dims),) * 3 or not np.all(np.isfinite(grid)) or \
                not np.all(grid > 0):
            raise bad("gemm.seconds", seconds, f"a {len(dims)}x{len(dims)}x{len(dims)} nested "
                      "list of positive seconds (one per shape of gemm.dims)")
        sizes = increasing("pointwise.bytes", get(data, "pointwise.bytes"))
        spb = get(data, "pointwise.seconds_per_byte")
        if not (isinstance(spb, list) and len(spb) == len(sizes)
                and all(is_number(v) and v > 0 for v in spb)):
            raise bad("pointwise.seconds_per_byte", spb,
                      f"{len(sizes)} positive numbers (one per pointwise.bytes)")
        return cls(float(overhead), tuple(int(d) for d in dims), tuple(grid.tolist()),
                   tuple(float(b) for b in sizes), tuple(float(v) for v in spb))


def curves_from_json(table: Any, where: str) -> dict[str, LocalCurves]:
    """``{"backend:dtype": LocalCurves}`` of a calibration's ``local`` field (``{}`` when
    absent: a calibration from before the curves); ValueError naming the first bad field."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: field 'local' is {table!r}: expected an object "
                         "{'backend:dtype': curves}")
    out = {}
    for key, entry in table.items():
        if not isinstance(key, str) or key.count(":") != 1:
            raise ValueError(f"{where}: field 'local.{key}': expected 'backend:dtype'")
        out[key] = LocalCurves.from_json(entry, f"{where}: local.{key}")
    return out

