"""NCCL's own cost model of a collective on a GPU cluster, for the cluster presets.

NCCL picks, for each collective and size, the (algorithm, protocol) pair of least predicted time
``latency + S / algbw`` (``ncclTopoTuneModel`` / ``ncclTopoGetAlgoTime`` in NVIDIA/nccl
src/graph/tuning.cc, NCCL 2.30). This module ports that model with the bandwidths of a preset
(the published nccl-tests bus bandwidths) in place of NCCL's topology search:

* **ring** (every collective): bus bandwidth ``min(NVLink ring busbw, the group's NIC bandwidth
  per node)`` across nodes, the NVLink one inside a node; ``algbw = busbw * n / nsteps``
  (nsteps = 2(n-1) all-reduce, n-1 all-gather / reduce-scatter, n broadcast), which is the
  nccl-tests bus factor: ``t = lat + S * factor / busbw``;
* **tree** (all-reduce across nodes): NCCL's double binary tree moves ``2 S`` through each
  node's NICs (``S`` on two nodes), so ``algbw = 0.92 * NIC bandwidth / 2`` (not halved on two
  nodes), times NCCL's tree correction factor at medium sizes;
* **NVLS** (all-reduce inside a Hopper node with NVLink SHARP): the published algorithm
  bandwidth, whatever the group size;
* protocols: Simple (full bandwidth), LL128 (x 0.92 ring, x 120/128 tree) and LL (x 0.5 ring,
  / 3.8 tree, capped at NCCL's ``llMaxBw``), each with NCCL's latencies: ``base + hops x
  per-hop`` (NVLink hops inside a node, NET hops across, NCCL's network post overhead, the
  1.4x "plateau" of multi-node Simple rings; tree ``2 ((ppn - 1) intra + log2(nodes) inter)``).

Across nodes, concurrent groups of the same kind (all the TP groups, all the DP groups) share the
node's NICs evenly: a group with ``g`` of a node's ``G`` GPUs gets ``g / G`` of its NICs. That is
exact on a non-blocking rail-optimised fat tree (the DGX SuperPOD's) and what a flow-level
simulation gives there (:mod:`tpmpi.studies.simnet`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

ARCHS = ("volta", "ampere", "hopper")
PROTOCOLS = ("LL", "LL128", "Simple")

# tuning.cc's ncclTunerConstantsDefaults (microseconds; LL, LL128, Simple)
BASE_LATENCY_US = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4)}
NVLINK_HOP_US = {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4)}
NET_HOP_US = {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0)}
NVLS_NVLINK_US = 25.0
NET_OVERHEAD_US = 1.0  # getNetOverhead on an Intel x86 host; x 3 for Simple
# llMaxBws (GB/s): one node by GPU architecture, several nodes by CPU (Intel) and node count
LL_MAX_BW_ONE_NODE = {"volta": 39.0, "ampere": 87.7, "hopper": 141.0}
LL_MAX_BW_NODES = (39.0, 39.0, 20.4)  # 1, 2, more nodes
RING_PLATEAU = {"volta": 1.9, "ampere": 1.4, "hopper": 1.4}
TREE_CORRECTION = (  # treeCorrectionFactor[protocol][log2(S / 64)], S from 64 B to 256 MiB
    (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0,
     1.0, 1.0, 1.0, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9,
     1.0, 1.0, 1.0),
    (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9,
     .9, .9),
)
STEPS = {"allreduce": lambda n: 2 * (n - 1), "allgather": lambda n: n - 1,
         "reduce_scatter": lambda n: n - 1, "bcast": lambda n: n}


@dataclasses.dataclass(frozen=True)
class Choice:
    """NCCL's pick for one collective: predicted ``seconds``, ``algorithm`` and ``protocol``."""

    seconds: float
    algorithm: str
    protocol: str


@dataclasses.dataclass(frozen=True)
class Fabric:
    """What one group of ``ranks`` sees: ``nodes`` it spans, ``arch`` (NCCL's constants),
    ``nvlink_busbw`` (bytes/s, NVLink ring bus bandwidth), ``nic_bw`` (bytes/s, its share of
    each node's NICs; unused inside a node) and ``nvls_algbw`` (bytes/s, NVLink SHARP all-reduce
    algorithm bandwidth; None without)."""

    ranks: int
    nodes: int
    arch: str
    nvlink_busbw: float
    nic_bw: float = 0.0
    nvls_algbw: Optional[float] = None

    @property
    def per_node(self) -> float:
        """Ranks per node (NCCL's ``ppn``)."""
        return self.ranks / self.nodes


def _ring_latency_us(op: str, f: Fabric, p: int) -> float:
    n, nodes = f.ranks, f.nodes
    steps = STEPS[op](n)
    if op == "bcast":  # NCCL: nsteps x the (tree Simple) per-hop latency, not sameChannels
        hop = (NVLINK_HOP_US if nodes == 1 else NET_HOP_US)["tree" if p == 2 else "ring"][p]
        return BASE_LATENCY_US["ring"][p] + steps * hop
    inter_steps = 0 if nodes == 1 else (2 * (nodes - 1) if op == "allreduce" else nodes - 1)
    intra = NVLINK_HOP_US["ring"][p]
    if nodes > 1:
        intra = max(intra, NET_OVERHEAD_US * (3 if p == 2 else 1))
    inter = NET_HOP_US["tree" if f.per_node == 1 else "ring"][p]
    return BASE_LATENCY_US["ring"][p] + (steps - inter_steps) * intra + inter_steps * inter


def _tree_latency_us(f: Fabric, p: int) -> float:
    inter = NET_HOP_US["tree"][p]
    hops = (f.per_node - 1) * NVLINK_HOP_US["tree"][p] + int(math.log2(f.nodes)) * inter
    return BASE_LATENCY_US["tree"][p] + 2 * hops


def _ll_cap(f: Fabric) -> float:
    if f.nodes == 1:
        return LL_MAX_BW_ONE_NODE[f.arch] * 1e9
    return LL_MAX_BW_NODES[min(f.nodes, 3) - 1] * 1e9


def _candidates(op: str, f: Fabric, nbytes: float) -> list[Choice]:
    """Every (algorithm, protocol) NCCL would consider, with its predicted time."""
    n = f.ranks
    ring_bus = f.nvlink_busbw if f.nodes == 1 else min(f.nvlink_busbw, f.nic_bw)
    out = []
    for p, proto in enumerate(PROTOCOLS):
        bus = (min(_ll_cap(f), 0.5 * ring_bus), 0.92 * ring_bus, ring_bus)[p]
        lat = _ring_latency_us(op, f, p)
        if proto == "Simple" and op == "allreduce" and f.nodes > 1:
            lat *= RING_PLATEAU[f.arch]
        algbw = bus * n / STEPS[op](n)
        out.append(Choice(lat * 1e-6 + nbytes / algbw, "ring", proto))
    if op == "allreduce" and f.nodes > 1:
        tree_bus = 0.92 * min(f.nvlink_busbw, f.nic_bw / (1 if f.nodes == 2 else 2))
        size_class = int(math.log2(max(nbytes, 1.0) / 64)) if nbytes >= 64 else -1
        for p, proto in enumerate(PROTOCOLS):
            algbw = (min(tree_bus / 3.8, _ll_cap(f)), tree_bus * 120 / 128, tree_bus)[p]
            if 0 <= size_class < len(TREE_CORRECTION[p]):
                algbw *= TREE_CORRECTION[p][size_class]
            out.append(Choice(_tree_latency_us(f, p) * 1e-6 + nbytes / algbw, "tree", proto))
    if op == "allreduce" and f.nodes == 1 and f.nvls_algbw:
        out.append(Choice(NVLS_NVLINK_US * 1e-6 + nbytes / f.nvls_algbw, "nvls", "Simple"))
    return out


def collective(op: str, fabric: Fabric, nbytes: float) -> Choice:
    """NCCL's choice and predicted time for ``op`` of nccl-tests size ``nbytes`` over the
    group ``fabric`` describes (no time for one rank or no bytes)."""
    if op not in STEPS:
        raise ValueError(f"collective={op!r}: expected one of {', '.join(STEPS)}")
    if fabric.arch not in ARCHS:
        raise ValueError(f"arch={fabric.arch!r}: expected one of {', '.join(ARCHS)}")
    if fabric.ranks <= 1 or nbytes <= 0:
        return Choice(0.0, "none", "none")
    return min(_candidates(op, fabric, float(nbytes)), key=lambda c: c.seconds)


def bus_bandwidth(op: str, fabric: Fabric, nbytes: float) -> float:
    """The nccl-tests bus bandwidth (bytes/s) the model predicts for ``op`` at ``nbytes``:
    ``S / t`` times the bus factor (2(n-1)/n all-reduce, (n-1)/n all-gather and reduce-scatter,
    1 broadcast)."""
    n = fabric.ranks
    factor = {"allreduce": 2 * (n - 1) / n, "bcast": 1.0}.get(op, (n - 1) / n)
    return nbytes / collective(op, fabric, nbytes).seconds * factor
