"""The GPT assembled from tpmpi's kernels, partitions and dropout source over a simulated TP
group (tests/kit_model.py: each rank's blocks only, collectives as NumPy sums) equals the
independent float64 reference -- loss and every gradient -- for the configurations of the
transformer issue: MHA and GQA with n_kv_head below, equal to and above the TP size, n_head not
divisible by or smaller than TP, vocabularies not divisible by TP, bias on and off, sequence
parallelism on and off, dropout 0 and > 0 (the serial run's masks), meshes 1x4, 2x2 and 4x1;
and the collective counts per step are those of the design."""
from types import SimpleNamespace

import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from kit_model import KitGPT
from tpmpi.core.dropout import Site, keep_mask

SITES = {"embedding": Site.EMBEDDING, "attention": Site.ATTENTION,
         "attention_output": Site.ATTENTION_OUTPUT, "mlp_output": Site.MLP_OUTPUT}
SEED, CALL = 11, 4
# name: (n_head, n_kv_head, vocab, bias)
CONFIGS = {"mha": (4, 4, 13, True), "gqa_kv2": (4, 2, 13, False), "mqa": (4, 1, 10, True),
           "uneven_heads": (6, 3, 11, True), "few_heads": (3, 3, 7, False),
           "gqa_kv_above_tp": (8, 8, 13, True)}


def config(n_head, n_kv_head, vocab, bias, layers=2, hd=2):
    return SimpleNamespace(vocab_size=vocab, block_size=8, n_layer=layers, n_head=n_head,
                           n_embd=n_head * hd, n_kv_head=n_kv_head, bias=bias)


def serial_masks(p, *, seed=SEED, call=CALL):
    """The reference's dropout: the whole masks of the global batch from the same source."""
    if p == 0:
        return None

    def mask(site, layer, shape):
        keep = keep_mask(p, seed=seed, call=call, layer=layer, site=SITES[site],
                         sample_shape=shape[1:], samples=(0, shape[0]))
        return keep / (1 - p)
    return mask


def compare(cfg, *, tp, sp=False, dp=1, p=0.0, smoothing=0.0, B=2, T=6, tol=1e-12):
    sd = ref.random_state_dict(cfg, seed=5)
    rng = np.random.default_rng(6)
    idx = rng.integers(0, cfg.vocab_size, (B * dp, T))
    targets = rng.integers(0, cfg.vocab_size, (B * dp, T))
    if dp == 1 and targets.size > 1:
        targets[0, -1] = -100
    want_loss, _, want = ref.forward_backward(sd, cfg, idx, targets, mask=serial_masks(p),
                                              label_smoothing=smoothing)
    model = KitGPT(sd, cfg, tp=tp, sequence_parallel=sp, dp=dp, label_smoothing=smoothing)
    loss, grads = model.step(idx, targets, p=p, seed=SEED, call=CALL)
    assert abs(loss - want_loss) <= tol * abs(want_loss)
    assert set(grads) == set(want)
    for key in want:
        assert rel_err(grads[key], want[key]) <= tol, key
    if tp > 1:  # no rank ever held the full (tokens, vocab) logits
        assert max(s[1] for s in model.logit_shapes) < cfg.vocab_size
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_tp_sizes_match_the_serial_reference(name, tp, sp, p):
    compare(config(*CONFIGS[name]), tp=tp, sp=sp, p=p, smoothing=0.1 if p else 0.0)


@pytest.mark.parametrize("dp,tp", [(1, 4), (2, 2), (4, 1)])
@pytest.mark.parametrize("sp", [False, True])
def test_meshes_match_the_serial_reference_on_the_global_batch(dp, tp, sp):
    compare(config(*CONFIGS["gqa_kv2"]), tp=tp, dp=dp, sp=sp, p=0.2, B=1)


def test_edge_shapes():
    compare(config(*CONFIGS["mqa"], layers=1), tp=4, sp=True, p=0.3, B=1, T=1)
    compare(config(*CONFIGS["few_heads"], layers=1), tp=4, p=0.3, B=1, T=5)


def test_collective_counts_per_step():
    """Megatron's counts (Korthikanti et al. 2022) for L layers, plus the loss's two."""
    L = 2
    plain = compare(config(*CONFIGS["mha"], layers=L), tp=2).collectives
    # forward: embedding + 2 per layer; loss: MAX + one SUM; backward: head input + 2 per layer
    assert dict(plain) == {"allreduce": (1 + 2 * L) + 1 + (1 + 2 * L), "allreduce_max": 1}
    sp = compare(config(*CONFIGS["mha"], layers=L), tp=2, sp=True).collectives
    # forward: RS (embedding), per layer AG + RS twice, AG before the head; backward mirrors it
    assert sp["reduce_scatter"] == (1 + 2 * L) + (1 + 2 * L)
    assert sp["allgather"] == (2 * L + 1) + (2 * L + 1)
    # the loss's SUM plus one Allreduce per replicated gradient SP leaves partial (ln_1, ln_2
    # and the two row biases per layer with bias, ln_f, wpe): bucketed into one in the layers
    assert sp["allreduce"] == 1 + (6 * L + 2 + 1) and sp["allreduce_max"] == 1
