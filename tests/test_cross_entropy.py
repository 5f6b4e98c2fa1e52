"""tpmpi.layers.cross_entropy: the vocabulary-parallel loss assembled from its local pieces
(per-block max -> MAX over blocks, per-block sums -> SUM over blocks, local finish) equals the
independent reference's mean cross-entropy and its gradient, for every block partition of the
vocabulary (uneven, empty blocks), with ignore_index and label smoothing (over the full
vocabulary, unlike Megatron-LM #737), in every dtype; no block ever sees the full logits."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from problems import HALFS
from tpmpi.core.dtypes import tolerance
from tpmpi.core.heads import vocab_block
from tpmpi.layers.cross_entropy import (Sums, check_targets, finish_loss, local_max, local_sums,
                                        logits_grad)


def parallel_loss(logits, targets, tp, *, smoothing=0.0, ignore_index=-100, dloss=1.0):
    """What the parallel layer does, with the two Allreduces simulated over ``tp`` blocks."""
    V = logits.shape[1]
    blocks = [vocab_block(V, tp, r) for r in range(tp)]
    row_max = np.max([local_max(logits[:, a:b]) for a, b in blocks], axis=0)
    rows = sum(local_sums(logits[:, a:b], a, targets, row_max, label_smoothing=smoothing,
                          ignore_index=ignore_index) for a, b in blocks)
    sums = Sums.from_rows(rows)
    loss, count = finish_loss(sums, targets, V, label_smoothing=smoothing,
                              ignore_index=ignore_index)
    scale = dloss / count if count else 0.0
    grad = np.concatenate([logits_grad(logits[:, a:b], a, targets, row_max, sums, V,
                                       scale=scale, label_smoothing=smoothing,
                                       ignore_index=ignore_index) for a, b in blocks], axis=1)
    return loss, count, grad


def reference(logits, targets, smoothing, ignore_index=-100):
    N, V = logits.shape
    z = ref.Dims(SimpleNamespace(n_head=1, n_kv_head=1, n_embd=1, vocab_size=V), 1, N)
    loss, dz = ref.cross_entropy(logits.astype(np.float64)[None], targets[None], z,
                                 ignore_index, smoothing)
    return loss, dz[0]


def problem(N, V, dtype="float64", ignore=True, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((N, V))).astype(dtype)
    targets = rng.integers(0, V, N)
    if ignore and N > 2:
        targets[[0, N // 2]] = -100
    return logits, targets


@pytest.mark.parametrize("V,tp", [(11, 1), (11, 2), (11, 3), (11, 4), (3, 4), (1, 2), (7, 8)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", [False, True])
def test_matches_the_reference_for_every_vocab_partition(V, tp, smoothing, ignore):
    logits, targets = problem(9, V, ignore=ignore)
    loss, count, grad = parallel_loss(logits, targets, tp, smoothing=smoothing)
    want_loss, want_grad = reference(logits, targets, smoothing)
    assert count == int((targets != -100).sum())
    assert abs(loss - want_loss) <= 1e-14 * abs(want_loss)
    assert rel_err(grad, want_grad) <= 1e-14
    assert not np.any(grad[targets == -100])


def test_the_loss_does_not_depend_on_the_tp_size():
    """The smoothing term uses the full vocabulary's mean log-probability: the same loss at
    every TP size (Megatron-LM #737 smooths with the local block's size and mean)."""
    logits, targets = problem(16, 10)
    losses = [parallel_loss(logits, targets, tp, smoothing=0.2)[0] for tp in (1, 2, 3, 4, 7)]
    assert max(losses) - min(losses) <= 1e-14 * losses[0]
    # what a per-block smoothing would give instead: a TP-dependent loss
    V = logits.shape[1]
    blocks = [vocab_block(V, 4, r) for r in range(4)]
    lse = np.log(np.exp(logits).sum(1))
    local = np.mean([(lse - logits[:, a:b].mean(1)) for a, b in blocks], axis=0)
    assert abs(local[targets != -100].mean() - (lse - logits.mean(1))[targets != -100].mean()) \
        > 1e-3


def test_ignore_index_inside_the_vocabulary_and_all_ignored():
    logits, _ = problem(6, 5, ignore=False)
    targets = np.array([1, 0, 2, 3, 0, 4])  # ignore_index=0 is an id of block 0: still skipped
    loss, count, grad = parallel_loss(logits, targets, 2, smoothing=0.1, ignore_index=0)
    want_loss, want_grad = reference(logits, targets, 0.1, ignore_index=0)
    assert count == 4 and abs(loss - want_loss) <= 1e-14 * want_loss
    assert rel_err(grad, want_grad) <= 1e-14
    loss, count, grad = parallel_loss(logits, np.full(6, -100), 3)
    assert math.isnan(loss) and count == 0 and not np.any(grad)


def test_large_logits_and_dloss():
    logits, targets = problem(8, 6, scale=1e4)
    loss, _, grad = parallel_loss(logits, targets, 3, smoothing=0.1, dloss=2.5)
    want_loss, want_grad = reference(logits, targets, 0.1)
    assert math.isfinite(loss) and abs(loss - want_loss) <= 1e-12 * want_loss
    assert rel_err(grad, 2.5 * want_grad) <= 1e-14


@pytest.mark.parametrize("dtype", ["float32", *HALFS])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_low_precision_logits(dtype, smoothing):
    V = 50
    logits, targets = problem(12, V, dtype=dtype)
    loss, _, grad = parallel_loss(logits, targets, 3, smoothing=smoothing)
    want_loss, want_grad = reference(logits.astype(np.float64), targets, smoothing)
    assert grad.dtype == np.dtype(dtype)
    assert local_max(logits).dtype == np.float32
    assert abs(loss - want_loss) <= tolerance("float32", V) * want_loss
    assert rel_err(grad, want_grad) <= tolerance(dtype, V)


def test_piece_shapes():
    logits, targets = problem(4, 6)
    m = local_max(logits[:, :0])
    assert m.shape == (4,) and np.all(m == -np.inf)
    rows = local_sums(logits[:, 2:2], 2, targets, logits.max(1))
    assert rows.shape == (2, 4) and not np.any(rows)
    assert local_sums(logits, 0, targets, logits.max(1), label_smoothing=0.1).shape == (3, 4)
    assert logits_grad(logits[:, 3:3], 3, targets, logits.max(1),
                       Sums.from_rows(np.ones((2, 4))), 6, scale=1.0).shape == (4, 0)


def test_bad_targets_and_smoothing():
    check_targets(np.array([0, 4, -100]), 5)
    with pytest.raises(ValueError, match=r"targets contain 5: expected ids in \[0, 5\) or "
                                         r"ignore_index=-100"):
        check_targets(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="targets contain -1"):
        check_targets(np.array([-1, 2]), 5)
    with pytest.raises(ValueError, match=r"targets\.dtype=float64: expected an integer dtype"):
        check_targets(np.array([1.0]), 5)
    with pytest.raises(ValueError, match=r"label_smoothing=1\.5: expected 0 <= label_smoothing"):
        local_sums(np.zeros((1, 2)), 0, np.array([0]), np.zeros(1), label_smoothing=1.5)


def test_on_the_backend(xb):
    logits, targets = problem(6, 7)
    xl, xt = xb.asarray(logits), xb.asarray(targets)
    m = local_max(xl)
    sums = Sums.from_rows(local_sums(xl, 0, xt, m, label_smoothing=0.1))
    loss, _ = finish_loss(sums, xt, 7, label_smoothing=0.1)
    grad = logits_grad(xl, 0, xt, m, sums, 7, scale=1 / 4, label_smoothing=0.1)
    want_loss, want_grad = reference(logits, targets, 0.1)
    assert abs(loss - want_loss) <= 1e-14 * want_loss
    assert rel_err(xb.to_host(grad), want_grad) <= 1e-14


@pytest.mark.mpi
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_over_mpi_one_allreduce_each(world, smoothing):
    """The layer's recipe with real collectives: each rank holds its vocabulary block only; an
    Allreduce(MAX) of (N,) and one Allreduce(SUM) of (2 or 3, N), then a local finish."""
    from mpi4py import MPI

    comm = world.comm
    V = 7
    logits, targets = problem(10, V)
    v0, v1 = vocab_block(V, comm.Get_size(), comm.Get_rank())
    block = np.ascontiguousarray(logits[:, v0:v1])
    row_max = local_max(block)
    comm.Allreduce(MPI.IN_PLACE, row_max, op=MPI.MAX)
    rows = local_sums(block, v0, targets, row_max, label_smoothing=smoothing)
    comm.Allreduce(MPI.IN_PLACE, rows, op=MPI.SUM)
    sums = Sums.from_rows(rows)
    loss, count = finish_loss(sums, targets, V, label_smoothing=smoothing)
    grad = logits_grad(block, v0, targets, row_max, sums, V, scale=1 / count,
                       label_smoothing=smoothing)
    want_loss, want_grad = reference(logits, targets, smoothing)
    assert len(set(comm.allgather(loss))) == 1
    assert abs(loss - want_loss) <= 1e-14 * want_loss
    assert rel_err(np.concatenate(comm.allgather(grad), axis=1), want_grad) <= 1e-14
