"""Machines that price a schedule's steps for one placement of a job on a cluster.

A machine answers three questions about the steps of :mod:`tpmpi.core.schedule`, in seconds:
``product_s(Product)``, ``pointwise_s(Pointwise)`` and ``collective_s(Collective)`` -- the
:class:`tpmpi.studies.pricing.Machine` protocol of the one pricer,
:func:`tpmpi.studies.pricing.price`. Two kinds:

* :class:`ClusterMachine`: a GPU cluster preset (:mod:`tpmpi.studies.cluster`) and a
  :class:`Placement`. Ranks are numbered ``dp_index * tp + tp_index`` (the mesh's order) and
  filled node by node, so a TP group of at most ``gpus_per_node`` ranks stays inside a node
  (NVLink) and a DP group crosses nodes once ``dp * tp`` exceeds a node; a group that spans nodes
  is priced on the network with its share of each node's NICs (:mod:`tpmpi.studies.nccl`).
* :class:`CalibratedCluster`: a cluster described by a ``calibrate`` file
  (:class:`tpmpi.studies.costmodel.Calibration`: the measured curves of local work, alpha/beta
  per collective and communicator size), so a user's own CPU cluster is one calibration away.
  Its machine is the cost model's own :class:`tpmpi.studies.costmodel.CalibratedMachine` (the
  one ``plan`` prices single layers with): products and element-wise work at the calibrated
  curves (each step's overhead included), a collective with the alpha/beta fitted at the
  nearest communicator size (a calibration run across nodes thus carries the network; one run
  inside a node does not know it). A placement with more ranks on a node than the node has
  cores (``cores_per_node`` of the calibration) runs each rank on its share of a core: local
  work takes ``ranks / cores`` times as long, and the collectives keep the alpha and beta fitted
  with a core per rank -- the time a rank waits for a descheduled peer is another rank's work
  on that core, which the scaled local work already counts.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Union

from ..core.args import check_int
from ..core.dtypes import resolve_dtype
from ..core.schedule import Collective, Pointwise, Product
from .cluster import Cluster
from .costmodel import CLASS_SHAPES, CalibratedMachine, Calibration, load_calibration
from .nccl import Choice, Fabric, collective
from .pricing import Machine


@dataclasses.dataclass(frozen=True)
class Placement:
    """``dp`` replicas of a TP group of ``tp`` ranks (TP ranks contiguous), ``per_node`` ranks
    to a node."""

    tp: int
    dp: int
    per_node: int

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "per_node"):
            check_int(name, getattr(self, name), 1)

    @property
    def ranks(self) -> int:
        return self.tp * self.dp

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.per_node)

    def members(self, group: str, size: int) -> list[int]:
        """Global ranks of the first group of kind ``group``: "tp" (the TP group), "row" and
        "col" (a row and a column of a tile grid of ``size`` columns, resp. rows, laid row-major
        over the TP group), "dp" (one rank of each replica)."""
        if group == "tp":
            return list(range(self.tp))
        if group == "row":
            return list(range(size))
        if group == "col":
            return [i * (self.tp // size) for i in range(size)]
        if group == "dp":
            return [d * self.tp for d in range(self.dp)]
        raise ValueError(f"group={group!r}: expected one of tp, row, col, dp")

    def span(self, group: str, size: int) -> tuple[int, int]:
        """``(ranks per node, nodes)`` of the first group of kind ``group`` (at most)."""
        counts: dict[int, int] = {}
        for rank in self.members(group, size)[:size]:
            node = rank // self.per_node
            counts[node] = counts.get(node, 0) + 1
        return max(counts.values()), len(counts)


class ClusterMachine:
    """A GPU cluster preset priced for one :class:`Placement`. The seconds of a step depend on
    its shape, not its name: they are kept per shape (a model repeats its blocks' steps)."""

    def __init__(self, cluster: Cluster, placement: Placement):
        self.cluster, self.placement = cluster, placement
        self._seconds: dict[tuple, float] = {}

    def product_s(self, step: Product) -> float:
        key = ("product", step.m, step.k, step.n, step.batch, step.dtype)
        if key not in self._seconds:
            self._seconds[key] = self.cluster.device.product_s(
                step.m, step.k, step.n, step.batch, step.dtype,
                resolve_dtype(step.dtype).itemsize)
        return self._seconds[key]

    def pointwise_s(self, step: Pointwise) -> float:
        return self.cluster.device.pointwise_s(step.nbytes, step.flops)

    def fabric(self, group: str, size: int) -> Fabric:
        """What a group of kind ``group`` and ``size`` ranks sees: the nodes it spans and, across
        nodes, its share of each node's NICs (concurrent groups share them evenly)."""
        c = self.cluster
        per_node, nodes = self.placement.span(group, size)
        share = c.nics_per_node * c.nic_bw * min(1.0, per_node / c.gpus_per_node)
        return Fabric(ranks=size, nodes=nodes, arch=c.device.arch, nvlink_busbw=c.nvlink_busbw,
                      nic_bw=share, nvls_algbw=c.nvls_algbw)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (a machine lives for one configuration)
    def _choice(self, op: str, group: str, size: int, nbytes: int) -> Choice:
        return collective(op, self.fabric(group, size), nbytes)

    def choice(self, step: Collective) -> Choice:
        """NCCL's algorithm, protocol and time for ``step``."""
        return self._choice(step.op, step.group, step.size, step.nbytes)

    def collective_s(self, step: Collective) -> float:
        return self.choice(step).seconds

    def tier(self, step: Collective) -> str:
        """"nvlink" or "network": where ``step`` runs."""
        return "nvlink" if self.fabric(step.group, step.size).nodes == 1 else "network"


@dataclasses.dataclass(frozen=True)
class CalibratedDevice:
    """The one rank of a calibrated cluster: its ``memory_bytes`` and its measured GEMM rate of
    the "large" shape class as its peak."""

    name: str
    memory_bytes: int
    calibration: Calibration
    backend: str = "numpy"

    @property
    def cores(self) -> Optional[int]:
        """The cores of its node as the calibration recorded them (None: unknown, a
        calibration from before they were recorded: one per rank)."""
        cores = self.calibration.machine.get("cores_per_node")
        return int(cores) if cores else None

    def peak_flops(self, dtype: str) -> float:
        n = CLASS_SHAPES["large"][0]
        return 2.0 * n**3 / self.calibration.gemm(n, n, n, dtype, self.backend)


@dataclasses.dataclass(frozen=True)
class CalibratedCluster:
    """A cluster of ranks described by a calibration file: ``gpus_per_node`` ranks to a node
    (the ranks ``calibrate`` ran on, by default), each with ``device.memory_bytes``."""

    name: str
    gpus_per_node: int
    device: CalibratedDevice


def physical_memory() -> int:
    """Bytes of RAM of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrated_cluster(path: str, *, ranks_per_node: Optional[int] = None,
                       memory_bytes: Optional[int] = None,
                       backend: str = "numpy") -> CalibratedCluster:
    """The CPU cluster preset of calibration file ``path``: ``ranks_per_node`` (default: the
    ranks per node it was calibrated with) sharing ``memory_bytes`` of a node (default: this
    machine's RAM) evenly and its ``cores_per_node``."""
    cal = load_calibration(path)
    per_node = int(ranks_per_node or cal.machine.get("ranks_per_node")
                   or cal.machine.get("ranks") or 1)
    if per_node < 1:
        raise ValueError(f"ranks_per_node={ranks_per_node!r}: expected an integer >= 1")
    node_memory = int(memory_bytes or physical_memory())
    device = CalibratedDevice(name=f"rank of {path}", memory_bytes=node_memory // per_node,
                              calibration=cal, backend=backend)
    return CalibratedCluster(name=f"calibrated:{path}", gpus_per_node=per_node, device=device)


Target = Union[Cluster, CalibratedCluster]


def machine_for(target: Target, placement: Placement) -> Machine:
    """The machine pricing ``placement`` on ``target`` (either kind implements the pricer's
    :class:`~tpmpi.studies.pricing.Machine` protocol, which mypy checks here)."""
    if isinstance(target, CalibratedCluster):
        dev = target.device
        on_node = min(placement.ranks, target.gpus_per_node)
        return CalibratedMachine(dev.calibration, dev.backend,
                                 oversubscription=on_node / dev.cores if dev.cores else 1.0)
    return ClusterMachine(target, placement)
