"""tpmpi.studies.pricing: the one timeline every schedule is priced on -- products and element-wise
steps in order, blocking collectives waited for, overlapped ones hidden behind the steps they
name, one group's collectives one after another, other groups' at once, exposure charged to
the group -- on a machine with round numbers (any object with the three methods)."""
import pytest

from tpmpi.core.schedule import Collective, GradsReady, Pointwise, Product, Schedule
from tpmpi.studies.pricing import Breakdown, price


class Machine:
    """Products: m seconds; element-wise steps: nbytes / 1000 s; collectives: nbytes s."""

    def product_s(self, step):
        return float(step.m)

    def pointwise_s(self, step):
        return step.nbytes / 1000

    def collective_s(self, step):
        return float(step.nbytes)


def coll(name, nbytes, group="tp", during=(), size=2):
    return Collective(name, "allreduce", group, size, nbytes, "float32", during)


def gemm(name, seconds):
    return Product(name, seconds, 1, 1, "float32")


def test_blocking_steps_add_up():
    s = Schedule((gemm("y", 3), coll("reduce_y", 2), Pointwise("bias", 1000, "float32")))
    b = price(s, Machine(), backward=False)
    assert b == Breakdown(6.0, 4.0, {"tp": 2.0}, {"tp": 2.0}, 2 * 2 * 0.5)
    assert b.comm_s == 2.0


def test_an_overlapped_collective_hides_behind_the_steps_it_names():
    bwd = (gemm("dX", 1), coll("reduce_dx", 5, during=("dW", "db")), gemm("dW", 3),
           Pointwise("db", 1000, "float32"), GradsReady(("weight",), 8))
    b = price(Schedule((), bwd), Machine())
    assert (b.time_s, b.compute_s, b.exposed_s) == (6.0, 5.0, {"tp": 1.0})  # 5 - (3 + 1) shown
    hidden = price(Schedule((), bwd[:1] + (coll("reduce_dx", 2, during=("dW", "db")),)
                            + bwd[2:]), Machine())
    assert hidden.time_s == hidden.compute_s == 5.0 and hidden.collective_s == {"tp": 2.0}


def test_forward_only_leaves_backward_out():
    s = Schedule((gemm("y", 2),), (gemm("dX", 7), coll("reduce_dx", 1)))
    assert price(s, Machine(), backward=False).time_s == 2.0
    assert price(s, Machine()).time_s == 10.0


def test_one_groups_collectives_queue_and_others_run_at_once():
    """Two chunks' gathers in one group: the second starts when the first ends; a collective
    of another group at the same time is not delayed by them."""
    fwd = (gemm("y[0]", 1), coll("g0", 4, during=("y[1]",)), gemm("y[1]", 1),
           coll("g1", 4), coll("other", 4, group="dp"))
    b = price(Schedule(fwd), Machine(), backward=False)
    # g0: 1..5; y[1]: 1..2, waited for g0 until 5; g1: 5..9; "dp": 9..13 (after g1's wait)
    assert b.time_s == 13.0 and b.exposed_s == {"tp": 7.0, "dp": 4.0}


def test_what_runs_past_the_last_step_is_exposed_in_its_group():
    """A data-parallel bucket started mid-backward, overlapping the rest of it."""
    bwd = (gemm("fc2.dW", 2), GradsReady(("fc2.weight",), 8),
           coll("allreduce_grads[0]", 6, group="dp", during=("fc1.dX", "fc1.dW")),
           gemm("fc1.dX", 2), gemm("fc1.dW", 2))
    b = price(Schedule((), bwd), Machine())
    assert (b.time_s, b.exposed_s, b.collective_s) == (8.0, {"dp": 2.0}, {"dp": 6.0})


def test_one_rank_and_overlaps_not_in_the_pass_cost_nothing_extra():
    s = Schedule((coll("none", 100, size=1), gemm("y", 1),
                  coll("late", 3, during=("dX",))), (gemm("dX", 1),))
    fwd = price(s, Machine(), backward=False)
    assert fwd.time_s == 4.0 and fwd.sent_bytes == pytest.approx(3 * 2 * 0.5)  # waited at end
    assert price(s, Machine()).time_s == 4.0  # hidden 1 s behind dX: 1 + 3
