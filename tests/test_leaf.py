"""tpmpi.layers.leaf: a ParameterLeaf's protocol (parameters, zero_grad, operators), its saved
pieces as views at their placements, gradients accumulated directly or as shares, and
PartialGrads summing the shares over the group once per backward."""
import numpy as np

from tpmpi.core.backend import get_backend
from tpmpi.layers.leaf import ParameterLeaf, PartialGrads, Placement


def make(grid, bias=True):
    w, b = np.arange(6.0).reshape(2, 3), (np.ones(3) if bias else None)
    halves = Placement((2, 6), lambda r: ((0, 2), (3 * (r % 2), 3 * (r % 2) + 3)))
    pieces = [("weight.left", "weight", slice(0, 2), Placement((2, 2), lambda r: ((0, 2), (0, 2)))),
              ("weight.right", "weight", slice(2, 3), halves)]
    return ParameterLeaf(grid, get_backend("numpy"), "Test", w, b,
                         {"bias": Placement.replicated((3,))}, pieces)


def test_protocol_and_pieces(grid):
    leaf = make(grid)
    assert leaf.children() == [] and leaf.operators() == {}
    assert [n for n, _, _ in leaf.parameters()] == ["weight", "bias"]
    blocks = leaf.parameter_blocks()
    assert [n for n, *_ in blocks] == ["weight.left", "weight.right"]
    assert np.shares_memory(blocks[0][1], leaf.weight) and blocks[1][1].shape == (2, 1)
    assert blocks[1][3](1) == ((0, 2), (3, 6))
    leaf.accumulate(np.ones((2, 3)), np.ones(3))
    grads = leaf.parameter_blocks(grads=True)
    assert np.shares_memory(grads[0][1], leaf.grad_weight) and grads[0][1].sum() == 4
    leaf.zero_grad()
    assert not leaf.grad_weight.any() and not leaf.grad_bias.any()
    assert "leaf #" in leaf.identity


def test_state_arrays_cut_like_the_pieces(grid):
    """An optimizer's moments of the leaf's weight and bias, cut into the saved pieces as views
    (the names a checkpoint's state= takes); checkpoint.params.state_by_piece keys a whole
    model's state that way."""
    from tpmpi.checkpoint.params import state_by_piece

    leaf = make(grid)
    m = {"weight": np.arange(6.0).reshape(2, 3) + 10, "bias": np.zeros(3)}
    cut = leaf.blocks_of(m)
    assert list(cut) == ["weight.left", "weight.right"]  # the bias is not saved in pieces
    assert np.shares_memory(cut["weight.right"], m["weight"])
    assert cut["weight.right"].tolist() == [[12.0], [15.0]]
    state = state_by_piece([("blk.ln", leaf), ("other", object())],
                           {"adam.m": {"blk.ln.weight": m["weight"], "other.weight": m["bias"]}})
    assert list(state["adam.m"]) == ["other.weight", "blk.ln.weight.left", "blk.ln.weight.right"]
    assert state["adam.m"]["other.weight"] is m["bias"]


def test_partial_grads_sum_once_per_backward(grid):
    leaves = [make(grid), make(grid, bias=False)]
    shares = PartialGrads(leaves, grid.comm, None)
    for _ in range(2):  # two backwards: each share summed once, then accumulated
        shares.start()
        for leaf in leaves:
            leaf.accumulate(np.full((2, 3), grid.comm.Get_rank() + 1.0),
                            np.ones(3) if leaf.bias is not None else None)
        shares.finish()
    total = sum(range(1, grid.size + 1))
    assert np.all(leaves[0].grad_weight == 2 * total) and np.all(leaves[1].grad_weight == 2 * total)
    assert np.all(leaves[0].grad_bias == 2 * grid.size)
