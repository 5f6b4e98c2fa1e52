"""tpmpi/studies/nccl.py: NCCL's tuner model against hand computations and against the bus
bandwidths NCCL's maintainers and users published (nccl-tests issues 149, 212, 290, 100/175,
29; nccl issue 1455), at the sizes they were measured."""
import math

import pytest

from tpmpi.studies.nccl import Fabric, bus_bandwidth, collective

GB = 1e9
A100 = Fabric(ranks=8, nodes=1, arch="ampere", nvlink_busbw=230 * GB)
H100 = Fabric(ranks=8, nodes=1, arch="hopper", nvlink_busbw=370 * GB, nvls_algbw=275 * GB)


def test_large_ring_all_reduce_is_latency_plus_bus_factor_over_busbw():
    """8 GB on 8 A100s: NCCL's ring Simple latency (8.4 + 14 hops x 3.4 us) plus
    S x 2(n-1)/n / busbw."""
    s = 8e9
    choice = collective("allreduce", A100, s)
    assert (choice.algorithm, choice.protocol) == ("ring", "Simple")
    assert choice.seconds == pytest.approx((8.4 + 14 * 3.4) * 1e-6 + s * 2 * 7 / 8 / (230 * GB))


def test_a100_all_reduce_reproduces_230_gbps_at_8_gb():
    """nccl-tests #149: about 230 GB/s bus bandwidth at 8 GB on 8 x A100."""
    assert bus_bandwidth("allreduce", A100, 8e9) == pytest.approx(230 * GB, rel=0.01)


def test_h100_picks_nvls_for_all_reduce_and_ring_for_the_others():
    """nccl-tests #212: NVLS all-reduce about 480 GB/s bus bandwidth, ring collectives about
    370 GB/s, on 8 x H100."""
    assert collective("allreduce", H100, 8e9).algorithm == "nvls"
    assert bus_bandwidth("allreduce", H100, 8e9) == pytest.approx(480 * GB, rel=0.01)
    for op in ("allgather", "reduce_scatter"):
        assert bus_bandwidth(op, H100, 8e9) == pytest.approx(370 * GB, rel=0.01)


@pytest.mark.parametrize(("n", "measured"), [(2, 370), (3, 370), (4, 370), (5, 420),
                                             (6, 440), (7, 460), (8, 480)])
def test_h100_all_reduce_by_gpu_count_follows_the_published_curve(n, measured):
    """nccl #1455: ring 365-370 GB/s for 2-4 GPUs, NVLS about 420/440/460/480 for 5-8: the
    model (NVLS at constant algorithm bandwidth, or the ring when faster) within 12 %."""
    f = Fabric(ranks=n, nodes=1, arch="hopper", nvlink_busbw=370 * GB, nvls_algbw=275 * GB)
    assert bus_bandwidth("allreduce", f, 8e9) == pytest.approx(measured * GB, rel=0.12)


def test_two_nodes_of_four_hdr_nics_ring_near_the_published_86_to_91():
    """nccl-tests #100/#175: 2 nodes x 4 HDR NICs, 86-91 GB/s bus bandwidth against 100
    theoretical; the model: 4 x 24 GB/s = 96 (the ring is NIC-bound)."""
    f = Fabric(ranks=16, nodes=2, arch="ampere", nvlink_busbw=230 * GB, nic_bw=4 * 24 * GB)
    ring = next(c for c in _all(f, 8e9) if c.algorithm == "ring" and c.protocol == "Simple")
    busbw = 8e9 / ring.seconds * 2 * 15 / 16
    assert 86 * GB * 0.9 < busbw < 91 * GB * 1.1


def test_two_node_tree_exceeds_the_network_rate():
    """nccl-tests #196 / nccl #812: on two nodes NCCL's tree gets a bus bandwidth above the
    network's (each node sends S, not 2 S)."""
    f = Fabric(ranks=16, nodes=2, arch="ampere", nvlink_busbw=230 * GB, nic_bw=8 * 24 * GB)
    choice = collective("allreduce", f, 8e9)
    assert choice.algorithm == "tree"
    assert bus_bandwidth("allreduce", f, 8e9) > 8 * 24 * GB


def test_one_edr_nic_per_gpu_rank_runs_at_the_nic_rate():
    """nccl-tests #29: 12.2 GB/s per EDR NIC; one GPU per node, one NIC each: the ring's bus
    bandwidth is the NIC's."""
    f = Fabric(ranks=4, nodes=4, arch="volta", nvlink_busbw=120 * GB, nic_bw=12.2 * GB)
    for op in ("allgather", "reduce_scatter"):
        assert bus_bandwidth(op, f, 4e9) == pytest.approx(12.2 * GB, rel=0.01)


def test_small_messages_take_low_latency_protocols_and_trees_at_scale():
    inside = collective("allreduce", A100, 1024)
    assert inside.protocol == "LL"
    ll_bus = min(87.7 * GB, 0.5 * 230 * GB)  # NCCL's llMaxBw caps LL on one Ampere node
    assert inside.seconds == pytest.approx((6.6 + 14 * 0.6) * 1e-6 + 1024 / (ll_bus * 8 / 14),
                                           rel=1e-6)
    many = Fabric(ranks=512, nodes=64, arch="ampere", nvlink_busbw=230 * GB, nic_bw=192 * GB)
    assert collective("allreduce", many, 1 << 16).algorithm == "tree"
    tree = min((c for c in _all(many, 1 << 16) if c.algorithm == "tree"), key=lambda c: c.seconds)
    ring = min((c for c in _all(many, 1 << 16) if c.algorithm == "ring"), key=lambda c: c.seconds)
    assert tree.seconds < ring.seconds  # log2(64) network hops instead of 2 x 63


def test_tree_latency_is_logarithmic_in_nodes():
    """NCCL: tree all-reduce latency base + 2 ((ppn - 1) intra + log2(nodes) inter)."""
    f = Fabric(ranks=64, nodes=8, arch="ampere", nvlink_busbw=230 * GB, nic_bw=192 * GB)
    tiny = next(c for c in _all(f, 64) if (c.algorithm, c.protocol) == ("tree", "LL"))
    algbw = min(0.92 * min(230 * GB, 96 * GB) / 3.8, 20.4 * GB)
    latency = (6.8 + 2 * (7 * 0.6 + math.log2(8) * 5.0)) * 1e-6
    assert tiny.seconds == pytest.approx(latency + 64 / algbw, rel=1e-6)


def test_nothing_to_do_and_bad_names():
    assert collective("allreduce", Fabric(1, 1, "ampere", 1.0), 1e9).seconds == 0.0
    assert collective("allgather", A100, 0).seconds == 0.0
    with pytest.raises(ValueError, match="collective='alltoall'"):
        collective("alltoall", A100, 8)
    with pytest.raises(ValueError, match="arch='pascal'"):
        collective("allreduce", Fabric(8, 1, "pascal", 1.0), 8)


def _all(fabric, nbytes):
    from tpmpi.studies.nccl import _candidates

    return _candidates("allreduce", fabric, float(nbytes))
