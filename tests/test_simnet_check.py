"""scripts/simnet_check.py: the rings it simulates stay on their rails and send one chunk per
rank and channel, its platforms are valid XML; with SimGrid (Debian's python3-simgrid on the
path; skipped otherwise) the simulated ring steps equal the analytic ones on a non-blocking
rail-optimised fabric and are slowed by the oversubscription when rings cross racks."""
import collections
import xml.etree.ElementTree as ET

import pytest

from conftest import load_script
from tpmpi.studies.cluster import load_cluster

simnet = load_script("simnet_check")


def _node_rail(gpu):
    node, rail = gpu[1:].split("g")
    return int(node), int(rail)


@pytest.mark.parametrize(("groups", "per_node"), [
    ([[r, 0, 1, 2, 3] for r in range(8)], 1),
    ([[0, 0, 1, 2, 3], [4, 0, 1, 2, 3]], 4),
    ([[0, 0, 1], [0, 2, 3]], 8),
])
def test_rings_cross_nodes_on_one_rail_and_every_rank_sends_once_per_channel(groups, per_node):
    flows = simnet.ring_flows(groups, per_node)
    for a, b in flows:
        (na, ra), (nb, rb) = _node_rail(a), _node_rail(b)
        assert na == nb or ra == rb
    sends = collections.Counter(a for a, _ in flows)
    assert set(sends.values()) == {per_node}
    assert sends == collections.Counter(b for _, b in flows)


@pytest.mark.parametrize("options", [{}, {"rack": 4, "oversubscription": 2.0}])
def test_platforms_are_well_formed(options):
    root = ET.fromstring(simnet.platform_xml(load_cluster("dgx-a100"), 8, **options))
    zone = root.find("zone")
    hosts = zone.findall("host")
    assert len(hosts) == 64 and len(zone.findall("route")) == 2 * 64 + (8 if not options else 2)
    tags = [child.tag for child in zone]
    assert tags.index("route") > max(i for i, t in enumerate(tags) if t != "route")


def test_simgrid_agrees_on_rails_and_sees_oversubscription():
    pytest.importorskip("simgrid")
    rows = {name: sim / analytic
            for name, analytic, sim in simnet.check(load_cluster("dgx-a100"), 8, 64 * 2**20)}
    for name, ratio in rows.items():
        expect = 2.0 if "scattered" in name and "2:1" in name else \
            4.0 if "scattered" in name else 1.0
        assert ratio == pytest.approx(expect, rel=1e-3), name
