"""tpmpi/studies/machine.py: where each group of a placement runs (TP ranks contiguous, DP
groups across nodes), the NIC share of concurrent groups, NCCL's choice for a group, and the
calibrated (CPU) cluster pricing steps with its calibration."""
import json

import pytest

from tpmpi.core.schedule import Collective, Pointwise, Product
from tpmpi.studies.cluster import load_cluster
from tpmpi.studies.costmodel import CalibratedMachine, Calibration
from tpmpi.studies.machine import ClusterMachine, Placement, calibrated_cluster, machine_for


@pytest.mark.parametrize(("tp", "dp", "group", "size", "span"), [
    (8, 16, "tp", 8, (8, 1)),     # a TP group fills a node
    (8, 16, "dp", 16, (1, 16)),   # its DP group has one rank per node
    (2, 8, "dp", 8, (4, 2)),      # 4 replicas of a 2-rank group share a node
    (2, 2, "dp", 2, (2, 1)),      # the whole job inside one node
    (16, 4, "tp", 16, (8, 2)),    # a TP group spanning two nodes
    (16, 4, "row", 4, (4, 1)),    # a 4 x 4 tile grid: a row is 4 contiguous ranks
    (16, 4, "col", 4, (2, 2)),    # a column is every 4th rank: two nodes
])
def test_ranks_fill_nodes_in_mesh_order(tp, dp, group, size, span):
    assert Placement(tp, dp, 8).span(group, size) == span


def test_placement_rejects_bad_sizes_and_groups():
    with pytest.raises(ValueError, match=r"dp=0: expected a positive integer"):
        Placement(2, 0, 8)
    with pytest.raises(ValueError, match=r"group='pp': expected one of tp, row, col, dp"):
        Placement(2, 2, 8).span("pp", 2)
    assert Placement(4, 3, 8).nodes == 2 and Placement(4, 3, 8).ranks == 12


def test_concurrent_dp_groups_share_a_node_s_nics():
    """DGX A100, TP 8 x DP 16: each DP group has one GPU per node and gets one NIC (24 GB/s);
    TP 2 x DP 16: four ranks per node and four NICs; DGX-2H, TP 8: two ranks per node of 16
    GPUs share one of its 8 EDR NICs."""
    a100 = load_cluster("dgx-a100")
    fab = ClusterMachine(a100, Placement(8, 16, 8)).fabric("dp", 16)
    assert (fab.nodes, fab.per_node, fab.nic_bw) == (16, 1, pytest.approx(24e9))
    assert ClusterMachine(a100, Placement(2, 16, 8)).fabric("dp", 16).nic_bw == \
        pytest.approx(96e9)
    v100 = load_cluster("dgx-2h")
    assert ClusterMachine(v100, Placement(8, 8, 16)).fabric("dp", 8).nic_bw == \
        pytest.approx(12.2e9)


def test_collectives_follow_nccl_on_their_tier():
    a100 = load_cluster("dgx-a100")
    m = ClusterMachine(a100, Placement(8, 16, 8))
    tp = Collective("y", "allreduce", "tp", 8, 8 << 30, "float16")
    dp = Collective("g", "allreduce", "dp", 16, 8 << 30, "float16")
    assert (m.tier(tp), m.tier(dp)) == ("nvlink", "network")
    def busbw(step):
        return step.nbytes / m.collective_s(step) * 2 * (step.size - 1) / step.size
    assert busbw(tp) == pytest.approx(230e9, rel=0.01)
    assert busbw(dp) == pytest.approx(24e9, rel=0.1)  # one NIC per DP group and node
    assert m.choice(dp).algorithm in ("ring", "tree")


def test_local_work_is_the_device_s():
    a100 = load_cluster("dgx-a100")
    m = ClusterMachine(a100, Placement(1, 1, 8))
    assert m.product_s(Product("p", 4096, 4096, 4096, "bfloat16", 2)) == \
        a100.device.product_s(4096, 4096, 4096, 2, "bfloat16", 2)
    assert m.pointwise_s(Pointwise("x", 2039 * 10**6, "bfloat16")) == pytest.approx(1e-3 / 0.88)


def _calibration(tmp_path):
    cal = Calibration(alpha={"allreduce": {"2": 1e-5, "4": 2e-5}},
                      beta={"allreduce": {"2": 1e-9, "4": 2e-9}},
                      rates={"numpy:float32": {"thin": 5e9, "small": 2e10, "medium": 4e10,
                                               "large": 5e10}},
                      machine={"source": "calibrate", "ranks": 4})
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(cal.to_json()))
    return cal, str(path)


def test_a_calibration_file_is_a_cpu_cluster_preset(tmp_path):
    cal, path = _calibration(tmp_path)
    cpu = calibrated_cluster(path, memory_bytes=64 << 30)
    assert (cpu.gpus_per_node, cpu.device.memory_bytes) == (4, 16 << 30)
    assert cpu.device.peak_flops("float32") == pytest.approx(5e10)
    assert cpu.device.peak_flops("bfloat16") == pytest.approx(5e10)  # float32 BLAS
    m = machine_for(cpu, Placement(2, 2, 4))
    assert isinstance(m, CalibratedMachine)
    p = Product("p", 1024, 1024, 1024, "float32", batch=3)
    assert m.product_s(p) == pytest.approx(3 * cal.gemm(1024, 1024, 1024, "float32"))
    assert m.pointwise_s(Pointwise("x", 5e9, "float32")) == pytest.approx(1.0)
    c = Collective("y", "allreduce", "tp", 4, 1 << 20, "float32")
    assert m.collective_s(c) == pytest.approx(6 * 2e-5 + 1.5 * (1 << 20) * 2e-9)
    assert calibrated_cluster(path, ranks_per_node=2).gpus_per_node == 2
