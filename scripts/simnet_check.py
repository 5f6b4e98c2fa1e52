"""Where do the planner's analytic network tiers run out? One ring step of every concurrent group,
simulated with SimGrid's flow-level network model, against tpmpi.studies.nccl's bandwidth term.

Each scenario builds a cluster as a SimGrid platform -- per node an NVSwitch (a router) with one
full-duplex link per GPU at the preset's NVLink ring bus bandwidth, one full-duplex NIC link per
GPU at its share of the node's NICs, and either rail switches (NIC i of every node on rail i,
the DGX SuperPOD's rail-optimised fabric) or top-of-rack switches of ``rack`` nodes with uplinks
to one spine, oversubscribed ``k``:1 -- then starts, all at once, the flows of one step of every
group's ring (each rank sends its chunk to the next rank of its ring; a group of ``g`` GPUs per
node runs ``g`` channels, each crossing between nodes on its own rail) and takes the simulated
time of the slowest. The analytic step is the chunk over the bus bandwidth
:func:`tpmpi.studies.nccl.collective` uses (NVLink inside a node; across nodes its share of the
NICs). Latency is left out of both (zero-latency links): this compares bandwidth and contention.

SimGrid: Debian's ``python3-simgrid`` (``apt-get install python3-simgrid``; bookworm's 3.32 runs
under CPython 3.11): ``PYTHONPATH=/usr/lib/python3/dist-packages python scripts/simnet_check.py``.
The network model is pinned to CM02 without cross-traffic (SimGrid's default LV08 applies TCP
calibration factors that do not describe NVLink or InfiniBand RDMA).

Usage: ``python scripts/simnet_check.py [--cluster dgx-a100] [--nodes 32] [--mib 1024]``
prints one row per scenario: analytic and simulated step (ms) and their ratio.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Optional

from tpmpi.core.args import int_flag
from tpmpi.studies.cluster import Cluster, load_cluster

Flow = tuple[str, str]


def _gpu(node: int, index: int) -> str:
    return f"n{node}g{index}"


def platform_xml(cluster: Cluster, nodes: int, rack: Optional[int] = None,
                 oversubscription: float = 1.0) -> str:
    """A SimGrid platform of ``nodes`` nodes of ``cluster`` (see the module docstring): rails,
    or racks of ``rack`` nodes behind ``oversubscription``:1 uplinks."""
    g = cluster.gpus_per_node
    nic = cluster.nic_bw * cluster.nics_per_node / g
    lines = ['<?xml version="1.0"?>',
             '<!DOCTYPE platform SYSTEM "https://simgrid.org/simgrid.dtd">',
             '<platform version="4.1">', '<zone id="cluster" routing="Floyd">',
             '<router id="spine"/>']
    routes = []  # after every host, router and link (SimGrid's DTD)

    def link(name: str, bw: float, a: str, b: str) -> None:
        lines.append(f'<link id="{name}" bandwidth="{bw:.6g}Bps" latency="0" '
                     'sharing_policy="SPLITDUPLEX"/>')
        routes.append(f'<route src="{a}" dst="{b}"><link_ctn id="{name}" direction="UP"/>'
                      '</route>')

    switches = [f"rail{i}" for i in range(g)] if rack is None else \
        [f"rack{r}" for r in range(-(-nodes // rack))]
    for name in switches:
        lines.append(f'<router id="{name}"/>')
    for n in range(nodes):
        lines.append(f'<router id="nvswitch{n}"/>')
        for i in range(g):
            lines.append(f'<host id="{_gpu(n, i)}" speed="1Gf"/>')
            link(f"nvl{n}_{i}", cluster.nvlink_busbw, _gpu(n, i), f"nvswitch{n}")
            link(f"nic{n}_{i}", nic, _gpu(n, i), f"rail{i}" if rack is None else
                 f"rack{n // rack}")
    below = nodes * nic if rack is None else rack * g * nic  # one switch's NIC bandwidth
    for name in switches:
        link(f"up_{name}", below / oversubscription, name, "spine")
    lines += [*routes, "</zone>", "</platform>"]
    return "\n".join(lines)


def ring_flows(groups: Sequence[Sequence[int]], per_node: int) -> list[Flow]:
    """One step of each group's rings: a group lists its nodes in ring order and holds GPUs
    ``per_node`` of each (rails ``r .. r + per_node - 1`` of its first GPU ``r``); channel
    ``c`` walks a node's GPUs up from rail ``c`` and the next node's down, so that every hop
    between nodes stays on one rail (for an even number of nodes)."""
    flows = []
    for nodes_and_rail in groups:
        rail0, nodes = nodes_and_rail[0], nodes_and_rail[1:]
        for c in range(per_node):
            ring = []
            for k, node in enumerate(nodes):
                local = [rail0 + (c + j) % per_node for j in range(per_node)]
                ring += [(node, r) for r in (local if k % 2 == 0 else local[::-1])]
            for (n0, r0), (n1, r1) in zip(ring, ring[1:] + ring[:1]):
                if (n0, r0) != (n1, r1):
                    flows.append((_gpu(n0, r0), _gpu(n1, r1)))
    return flows


def _simulate(xml: str, flows: Sequence[Flow], nbytes: float) -> float:
    import simgrid

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "platform.xml")
        with open(path, "w") as fh:
            fh.write(xml)
        engine = simgrid.Engine([sys.argv[0], "--cfg=network/model:CM02",
                                 "--cfg=network/crosstraffic:0", "--log=root.thres:critical"])
        engine.load_platform(path)
        done: list[float] = []

        def start() -> None:
            comms = [simgrid.Comm.sendto_async(simgrid.Host.by_name(a),
                                               simgrid.Host.by_name(b), int(nbytes))
                     for a, b in flows]
            for comm in comms:
                comm.wait()
            done.append(simgrid.Engine.clock)

        simgrid.Actor.create("rings", simgrid.Host.by_name(flows[0][0]), start)
        engine.run()
    return done[0]


def simulate(xml: str, flows: Sequence[Flow], nbytes: float) -> float:
    """Simulated seconds until every flow of ``nbytes`` has arrived (all started at once), in a
    process of its own (SimGrid's engine is one per process)."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return float(pool.apply(_simulate, (xml, list(flows), nbytes)))


def scenarios(cluster: Cluster, nodes: int) -> list[tuple[str, dict, list[list[int]], int]]:
    """(name, platform options, groups, GPUs per node of a group) of each scenario."""
    g = cluster.gpus_per_node
    ordered = list(range(nodes))
    scattered = [n for start in range(4) for n in range(start, nodes, 4)]  # one per rack
    half = g // 2
    return [
        (f"tp={g} dp={nodes}: {g} DP rings, one GPU per node, rails", {},
         [[r, *ordered] for r in range(g)], 1),
        (f"tp={g // half} dp={half * nodes}: DP rings of {half} GPUs per node, rails", {},
         [[0, *ordered], [half, *ordered]], half),
        (f"tp={2 * g} dp={nodes // 2}: TP groups over 2 nodes, rails", {},
         [[0, 2 * k, 2 * k + 1] for k in range(nodes // 2)], g),
        (f"tp={g} dp={nodes}: racks of 4 nodes 2:1, nodes in order",
         {"rack": 4, "oversubscription": 2.0}, [[r, *ordered] for r in range(g)], 1),
        (f"tp={g} dp={nodes}: racks of 4 nodes 2:1, nodes scattered over racks",
         {"rack": 4, "oversubscription": 2.0}, [[r, *scattered] for r in range(g)], 1),
        (f"tp={g} dp={nodes}: racks of 4 nodes 4:1, nodes scattered over racks",
         {"rack": 4, "oversubscription": 4.0}, [[r, *scattered] for r in range(g)], 1),
    ]


def analytic_step(cluster: Cluster, per_node: int, nodes_in_ring: int, chunk: float) -> float:
    """The bandwidth term of a ring step as tpmpi.studies.nccl prices it: the rank's chunk over
    the ring's bus bandwidth (NVLink inside a node; across nodes the group's NIC share)."""
    share = cluster.nics_per_node * cluster.nic_bw * per_node / cluster.gpus_per_node
    busbw = cluster.nvlink_busbw if nodes_in_ring == 1 else min(cluster.nvlink_busbw, share)
    return chunk * per_node / busbw


def check(cluster: Cluster, nodes: int, nbytes: float) -> list[tuple[str, float, float]]:
    """(scenario, analytic s, SimGrid s) of one ring step of an all-reduce of ``nbytes``."""
    rows = []
    for name, options, groups, per_node in scenarios(cluster, nodes):
        ranks = per_node * (len(groups[0]) - 1)
        chunk = nbytes / ranks / per_node           # one channel's share of a rank's chunk
        xml = platform_xml(cluster, nodes, **options)
        sim = simulate(xml, ring_flows(groups, per_node), chunk)
        rows.append((name, analytic_step(cluster, per_node, len(groups[0]) - 1, chunk), sim))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default="dgx-a100")
    parser.add_argument("--nodes", type=int_flag(1), default=32)
    parser.add_argument("--mib", type=float, default=1024.0,
                        help="all-reduce size per group (MiB)")
    args = parser.parse_args(argv)
    cluster = load_cluster(args.cluster)
    print(f"{cluster.name}, {args.nodes} nodes, one ring step of a {args.mib:g} MiB all-reduce")
    print("| scenario | analytic (ms) | SimGrid (ms) | SimGrid / analytic |")
    print("|---|---:|---:|---:|")
    for name, analytic, sim in check(cluster, args.nodes, args.mib * 2**20):
        print(f"| {name} | {analytic * 1e3:.3f} | {sim * 1e3:.3f} | {sim / analytic:.2f} |")


if __name__ == "__main__":
    main()
