"""tpmpi.layers.module: one protocol for layers and composites (children(), named_layers)."""
import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from tpmpi.layers import Composite, named_layers


class Block(Composite):
    """A composite of an MLP and a layer: names nest."""

    def __init__(self, grid):
        self.grid = grid
        self.ffn = tpmpi.ParallelMLP(4, 8, grid=grid, dtype="float64")
        self.head = tpmpi.RowParallelLinear(4, 2, grid=grid, dtype="float64")

    def children(self):
        return [("ffn", self.ffn), ("head", self.head)]


def test_leaves_composites_and_their_parameters():
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        layer = tpmpi.ColumnParallelLinear(3, 4, grid=grid)
        assert layer.children() == [] and named_layers(layer) == [("", layer)]
        block = Block(grid)
        assert named_layers(block) == [("ffn.fc1", block.ffn.fc1), ("ffn.fc2", block.ffn.fc2),
                                       ("head", block.head)]
        names = [name for name, _, _ in block.parameters()]
        assert names == ["ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
                         "head.weight", "head.bias"]
        for _, _, grad in block.parameters():
            grad[...] = 1
        block.zero_grad()
        assert all(not np.any(grad) for _, _, grad in block.parameters())


def test_what_is_not_a_module():
    with pytest.raises(ValueError, match="dict is not a tpmpi layer or composite"):
        named_layers({})

    class Empty(Composite):
        def children(self):
            return []

    with pytest.raises(ValueError, match="Empty holds no layers"):
        named_layers(Empty())


def test_checkpoints_follow_children_into_nested_composites(tmp_path):
    """A composite of composites saves every leaf under its dotted name and loads back."""
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        block = Block(grid)
        tpmpi.save_checkpoint(str(tmp_path), block)
        fresh = Block(grid)
        for _, value, _ in fresh.parameters():
            value[...] = 0
        tpmpi.load_checkpoint(str(tmp_path), into=fresh)
        for (name, a, _), (other, b, _) in zip(block.parameters(), fresh.parameters()):
            assert name == other and np.array_equal(a, b), name
