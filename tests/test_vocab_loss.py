"""tpmpi.VocabParallelLoss at world sizes 1-4 against the serial cross-entropy of
tests/gpt_reference.py: loss, dx and the tied head's gradient, with ignored targets and label
smoothing (whose mean runs over the full vocabulary), with and without sequence parallelism;
no rank holds more than its vocabulary block of the logits; logits() gathers them all."""
import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from tpmpi.core.backend import get_backend
from tpmpi.core.partition import block_range
from tpmpi.layers.embedding import VocabParallelEmbedding
from tpmpi.layers.vocab_loss import VocabParallelLoss
from tpmpi.models import GPTConfig

NUMPY = get_backend("numpy")


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_the_serial_loss(grid, sp, smoothing):
    V, d, B, T = 11, 4, 2, 3
    rng = np.random.default_rng(4)
    wte, x = rng.standard_normal((V, d)), rng.standard_normal((B * T, d))
    targets = rng.integers(0, V, B * T)
    targets[2] = -100
    z = ref.Dims(GPTConfig(V, T, 1, 1, d), B, T)
    logits = x @ wte.T
    want, dz = ref.cross_entropy(logits, targets, z, -100, smoothing)
    emb = VocabParallelEmbedding(V, d, grid=grid, backend=NUMPY, dtype="float64",
                                 sequence_parallel=sp, dense=wte)
    loss_layer = VocabParallelLoss(emb, sequence_parallel=sp, label_smoothing=smoothing)
    a, b = block_range(B * T, grid.size, grid.comm.Get_rank()) if sp else (0, B * T)
    loss = loss_layer.forward(x[a:b].copy(), targets)
    assert abs(loss - want) <= 1e-13 * abs(want)
    assert loss_layer._saved[1].shape == (B * T, emb.stop - emb.start)
    dx = loss_layer.backward()
    assert rel_err(dx, (dz @ wte)[a:b]) <= 1e-13
    assert rel_err(emb.grad_weight, (dz.T @ x)[emb.start:emb.stop]) <= 1e-13
    assert rel_err(loss_layer.logits(x[a:b].copy(), B * T), logits) <= 1e-15


def test_all_targets_ignored_give_nan_and_no_gradient(grid):
    emb = VocabParallelEmbedding(5, 2, grid=grid, backend=NUMPY, dtype="float64",
                                 dense=np.ones((5, 2)))
    loss_layer = VocabParallelLoss(emb)
    assert np.isnan(loss_layer.forward(np.ones((3, 2)), np.full(3, -100)))
    assert not loss_layer.backward().any() and not emb.grad_weight.any()
