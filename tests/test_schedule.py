"""tpmpi/core/schedule.py: steps as data, a child's schedule renamed under its composite,
sub-layers chained (forwards in order, backwards reversed)."""
from tpmpi.core.schedule import Collective, GradsReady, Pointwise, Product, Schedule, chain


def _layer(tag: str) -> Schedule:
    fwd = (Product("y", 8, 4, 2, "float32"), Pointwise("act", 64, "float32"))
    bwd = (Product("dX", 8, 2, 4, "float32"), Product("dW", 4, 8, 2, "float32"),
           Collective("reduce_dx", "allreduce", "tp", 2, 128, "float32", during=("dW",)),
           GradsReady(("weight",), 32))
    return Schedule(fwd, bwd, param_bytes=32, saved_bytes=128 if tag == "a" else 64)


def test_product_flops_count_every_batch():
    assert Product("s", 3, 5, 7, "float64", batch=4).flops == 2 * 4 * 3 * 5 * 7


def test_prefixed_renames_steps_and_their_overlap_references():
    s = _layer("a").prefixed("fc1")
    assert [step.name for step in s.forward] == ["fc1.y", "fc1.act"]
    coll = s.backward[2]
    assert isinstance(coll, Collective)
    assert (coll.name, coll.during) == ("fc1.reduce_dx", ("fc1.dW",))
    assert s.backward[3] == GradsReady(("fc1.weight",), 32)


def test_chain_runs_forwards_in_order_and_backwards_reversed():
    a, b = _layer("a").prefixed("fc1"), _layer("b").prefixed("fc2")
    s = chain([a, b])
    assert [step.name for step in s.forward] == ["fc1.y", "fc1.act", "fc2.y", "fc2.act"]
    assert s.backward[0].name == "fc2.dX" and s.backward[4].name == "fc1.dX"
    assert (s.param_bytes, s.saved_bytes) == (64, 192)
    assert list(s.steps(backward=False)) == list(s.forward)
    assert len(list(s.steps())) == 12
