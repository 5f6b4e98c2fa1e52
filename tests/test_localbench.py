"""tpmpi.studies.localbench: the micro-benchmarks of local work that calibrate runs -- a rank
per core measures, the others wait without polling; a fresh calibration's file prices a
transformer block from its own curves (structure and monotonicity, not timing values)."""
import json

import numpy as np
import pytest
from mpi4py import MPI

from tpmpi.core.backend import get_backend
from tpmpi.core.schedule import Pointwise, Product
from tpmpi.layers.block import TransformerBlock
from tpmpi.studies import collbench, localbench
from tpmpi.studies.localbench import measuring_ranks, node_facts
from tpmpi.studies.machine import Placement, calibrated_cluster, machine_for
from tpmpi.studies.pricing import price


@pytest.mark.mpi
def test_node_facts_count_the_node_s_cores_and_ranks(world):
    facts = node_facts(world.comm)
    assert facts["ranks_per_node"] == world.size  # one node
    assert facts["cores_per_node"] >= 1


@pytest.mark.mpi
def test_a_rank_per_core_measures(world):
    backend = get_backend("numpy")
    with measuring_ranks(world.comm, backend, 1) as sub:
        measures = sub != MPI.COMM_NULL
        if measures:
            assert sub.Get_size() == 1
    assert measures == (world.comm.Get_rank() == 0)


@pytest.mark.mpi
@pytest.mark.world_sizes(2)
def test_a_fresh_calibration_prices_a_block_from_its_own_curves(world, tmp_path, monkeypatch):
    monkeypatch.setattr(localbench, "GRID_DIMS", {"cpu": (16, 64, 256), "gpu": (16, 64, 256)})
    monkeypatch.setattr(localbench, "POINTWISE_SIZES", (4096, 65536, 1 << 20))
    backend = get_backend("numpy")
    cal = collbench.calibrate(world.comm, backend, ops=("allreduce",), sizes=[64, 4096],
                              iters=2)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_json()))
    target = calibrated_cluster(str(path))
    curves = target.device.calibration.curves("float32")
    assert curves is not None and curves.dims == (16, 64, 256)
    assert np.asarray(curves.gemm_s).shape == (3, 3, 3) and curves.overhead_s > 0
    assert len(curves.pointwise_bytes) == 3 and min(curves.pointwise_spb) > 0
    assert target.gpus_per_node == 2 and target.device.cores >= 1
    same = world.comm.allgather(cal.to_json()["local"])
    assert all(c == same[0] for c in same)  # every rank prices alike

    machine = machine_for(target, Placement(2, 1, 2))
    small = TransformerBlock.schedule_for(2, 32, 64, 4, 2, backward=True)
    large = TransformerBlock.schedule_for(4, 64, 128, 4, 2, backward=True)
    for step in small.steps():
        if isinstance(step, Product):
            assert machine.product_s(step) > curves.overhead_s
        elif isinstance(step, Pointwise):
            assert machine.pointwise_s(step) > curves.overhead_s
    a, b = price(small, machine), price(large, machine)
    assert 0 < a.product_s < a.compute_s <= a.time_s
    assert b.product_s > a.product_s and b.compute_s - b.product_s > a.compute_s - a.product_s
    assert b.time_s > a.time_s
    # four ranks to each of the node's cores: each runs its local work on a quarter of one
    cores = target.device.cores
    crowded = calibrated_cluster(str(path), ranks_per_node=4 * cores)
    slow = price(small, machine_for(crowded, Placement(2, 2 * cores, 4 * cores)))
    assert slow.compute_s == pytest.approx(a.compute_s * 4 / max(1.0, 2 / cores))
