"""Cluster presets: a named GPU cluster as data -- its device, NVLink and network -- read from the
JSON files shipped in ``tpmpi/studies/presets/`` (every number with its public source in the
file's ``sources``; docs/planning.md lists them), and what the device takes for local work.

A preset file holds ``name``, ``description``, ``gpus_per_node``, ``device`` (``name``, ``arch``
of NCCL's constants, ``sms``, ``peak_tflops`` and ``gemm_efficiency`` per dtype, ``gemm_tile``,
``hbm_gbps``, ``hbm_efficiency``, ``memory_gib``), ``nvlink`` (``ring_busbw_gbps``, optional
``nvls_allreduce_algbw_gbps``), ``network`` (``nics_per_node``, ``nic_gbps``) and ``sources``
(dotted field -> where the number comes from). ``load_cluster`` also takes the path of such a
file (a user's own cluster).

Local work on the device (one documented curve, nothing fitted per workload):

* a product ``batch x (m, k) @ (k, n)`` is the slower of its math and its memory traffic,
  ``max(F_q / (peak x e), (m k + k n + m n) b batch / (hbm x e_hbm))``, where ``e`` is the
  best fraction of peak cuBLAS reaches (a published measurement per device) and ``F_q`` the
  flops of the tiles the GPU actually runs: the output is cut into ``gemm_tile`` tiles (the
  last ones padded: tile quantization) that run in waves of one tile per SM (the last wave
  partly idle: wave quantization), the two effects NVIDIA's Matrix Multiplication Background
  guide describes; of the two orientations of the tile, the cheaper. A product with fewer
  tiles than SMs has its K dimension split over the idle SMs (cuBLAS's split-K kernels, at
  most one slice per 256 of K), so that a few-token product is bound by its operands' bytes;
* element-wise work streams its bytes at ``hbm x e_hbm`` (or its flops at the float32 peak,
  whichever is slower).

No per-kernel launch time is added: it matters only for per-rank problems far smaller than the
ones a cluster preset is for.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Union

from .nccl import ARCHS

GIB = 2**30
SPLIT_K_DEPTH = 256
"""The shallowest K slice a split-K product gives one SM."""
PRESET_DIR = "presets"
REQUIRED = ("gpus_per_node", "device.sms", "device.peak_tflops", "device.gemm_efficiency",
            "device.gemm_tile", "device.hbm_gbps", "device.hbm_efficiency", "device.memory_gib",
            "nvlink.ring_busbw_gbps", "network.nics_per_node", "network.nic_gbps")


@dataclasses.dataclass(frozen=True)
class Device:
    """One GPU: ``peak`` and ``gemm_efficiency`` per dtype (flop/s, fraction), ``tile`` (the
    output tile of one SM's GEMM work), ``hbm_bw`` (bytes/s), ``hbm_efficiency``,
    ``memory_bytes``."""

    name: str
    arch: str
    sms: int
    peak: Mapping[str, float]
    gemm_efficiency: Mapping[str, float]
    tile: tuple[int, int]
    hbm_bw: float
    hbm_efficiency: float
    memory_bytes: int

    def peak_flops(self, dtype: str) -> float:
        """Dense peak (flop/s) in ``dtype``; ValueError naming the dtypes the device has."""
        if dtype not in self.peak:
            raise ValueError(f"dtype={dtype!r}: the {self.name} has no {dtype} rate (it has "
                             f"{', '.join(sorted(self.peak))})")
        return self.peak[dtype]

    def _quantized_flops(self, m: int, k: int, n: int, batch: int) -> float:
        """Flops of the tiles run, padded to whole tiles and whole waves of ``sms`` tiles (K
        split over the SMs a small product leaves idle)."""
        best = math.inf
        for tm, tn in (self.tile, self.tile[::-1]):
            tiles = batch * math.ceil(m / tm) * math.ceil(n / tn)
            split = max(1, min(self.sms // tiles, math.ceil(k / SPLIT_K_DEPTH)))
            waves = math.ceil(tiles * split / self.sms)
            best = min(best, 2.0 * waves * self.sms * tm * tn * math.ceil(k / split))
        return best

    def product_s(self, m: int, k: int, n: int, batch: int, dtype: str, itemsize: int) -> float:
        """Seconds of ``batch`` products ``(m, k) @ (k, n)`` (see the module docstring)."""
        if min(m, k, n, batch) <= 0:
            return 0.0
        rate = self.peak_flops(dtype) * self.gemm_efficiency[dtype]
        math_s = self._quantized_flops(m, k, n, batch) / rate
        memory_s = batch * (m * k + k * n + m * n) * itemsize / self.stream_bw
        return max(math_s, memory_s)

    @property
    def stream_bw(self) -> float:
        """Bytes/s element-wise work streams at."""
        return self.hbm_bw * self.hbm_efficiency

    def pointwise_s(self, nbytes: float, flops: float = 0.0) -> float:
        """Seconds of element-wise work moving ``nbytes`` (and doing ``flops``)."""
        compute = flops / self.peak["float32"] if flops and "float32" in self.peak else 0.0
        return max(nbytes / self.stream_bw, compute)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A GPU cluster preset: ``gpus_per_node`` devices joined by NVLink (``nvlink_busbw``,
    bytes/s of NCCL's ring; ``nvls_algbw``, NVLink SHARP all-reduce, None without), nodes by
    ``nics_per_node`` NICs of ``nic_bw`` bytes/s each; ``sources`` maps each dotted field of the
    file to its public source."""

    name: str
    description: str
    gpus_per_node: int
    device: Device
    nvlink_busbw: float
    nics_per_node: int
    nic_bw: float
    nvls_algbw: Union[float, None] = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _number(origin: str, field: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
        raise ValueError(f"cluster preset {origin}: {field}={value!r}: expected a number > {low}")
    return float(value)


def _rates(origin: str, field: str, value: Any, high: float = math.inf) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"cluster preset {origin}: {field}={value!r}: expected "
                         "{dtype: number}")
    out = {str(k): _number(origin, f"{field}.{k}", v) for k, v in value.items()}
    bad = {k: v for k, v in out.items() if v > high}
    if bad:
        raise ValueError(f"cluster preset {origin}: {field}={bad!r}: expected values <= {high}")
    return out


def cluster_from_dict(data: Mapping[str, Any], origin: str = "<dict>") -> Cluster:
    """The :class:`Cluster` a preset file describes; ValueError naming the file, the field, its
    value and what was expected (a missing field or a field without a source included)."""
    missing = [f for f in REQUIRED if _lookup(data, f) is None]
    if missing:
        raise ValueError(f"cluster preset {origin}: missing {', '.join(missing)}")
    sources = data.get("sources") or {}
    unsourced = [f for f in REQUIRED + ("nvlink.nvls_allreduce_algbw_gbps",)
                 if _lookup(data, f) is not None and f not in sources]
    if unsourced:
        raise ValueError(f"cluster preset {origin}: no source for {', '.join(unsourced)} "
                         "(sources: {field: where the number comes from})")
    dev, num = data["device"], _number
    arch = dev.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"cluster preset {origin}: device.arch={arch!r}: expected one of "
                         f"{', '.join(ARCHS)}")
    peak = {k: v * 1e12 for k, v in _rates(origin, "device.peak_tflops", dev["peak_tflops"])
            .items()}
    eff = _rates(origin, "device.gemm_efficiency", dev["gemm_efficiency"], 1.0)
    if set(eff) != set(peak):
        raise ValueError(f"cluster preset {origin}: device.gemm_efficiency has dtypes "
                         f"{sorted(eff)}: expected those of device.peak_tflops {sorted(peak)}")
    tile = dev["gemm_tile"]
    if not (isinstance(tile, list) and len(tile) == 2):
        raise ValueError(f"cluster preset {origin}: device.gemm_tile={tile!r}: expected [m, n]")
    nvls = _lookup(data, "nvlink.nvls_allreduce_algbw_gbps")
    device = Device(
        name=str(dev.get("name", "gpu")), arch=arch, sms=int(num(origin, "device.sms", dev["sms"])),
        peak=peak, gemm_efficiency=eff,
        tile=(int(num(origin, "device.gemm_tile", tile[0])),
              int(num(origin, "device.gemm_tile", tile[1]))),
        hbm_bw=num(origin, "device.hbm_gbps", dev["hbm_gbps"]) * 1e9,
        hbm_efficiency=min(num(origin, "device.hbm_efficiency", dev["hbm_efficiency"]), 1.0),
        memory_bytes=int(num(origin, "device.memory_gib", dev["memory_gib"]) * GIB))
    return Cluster(
        name=str(data.get("name", origin)), description=str(data.get("description", "")),
        gpus_per_node=int(num(origin, "gpus_per_node", data["gpus_per_node"])), device=device,
        nvlink_busbw=num(origin, "nvlink.ring_busbw_gbps", data["nvlink"]["ring_busbw_gbps"])
        * 1e9,
        nvls_algbw=None if nvls is None else
        num(origin, "nvlink.nvls_allreduce_algbw_gbps", nvls) * 1e9,
        nics_per_node=int(num(origin, "network.nics_per_node",
                              data["network"]["nics_per_node"])),
        nic_bw=num(origin, "network.nic_gbps", data["network"]["nic_gbps"]) * 1e9,
        sources=dict(sources))


def preset_names() -> list[str]:
    """Names of the presets shipped with tpmpi."""
    folder = resources.files(__package__).joinpath(PRESET_DIR)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_cluster(name: str) -> Cluster:
    """The preset ``name`` (see :func:`preset_names`) or the preset file at path ``name``."""
    if name in preset_names():
        text = resources.files(__package__).joinpath(PRESET_DIR).joinpath(f"{name}.json") \
            .read_text()
        origin = f"{name!r}"
    elif name.endswith(".json") and Path(name).is_file():
        text, origin = Path(name).read_text(), name
    else:
        raise ValueError(f"cluster={name!r}: expected one of {', '.join(preset_names())} or "
                         "the path of a preset .json file")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"cluster preset {origin}: {exc}") from None
    return cluster_from_dict(data, origin)
