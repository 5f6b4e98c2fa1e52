"""tpmpi/studies/baregpt.py (the bare nanoGPT code behind the transformer schemes' check and
vs_bare's block) against the independent reference tests/gpt_reference.py: the GPT's loss and
every gradient in float64, grouped-query heads included."""
import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from tpmpi.models import GPTConfig
from tpmpi.studies import baregpt


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_bare_gpt_matches_the_reference(heads, kv):
    cfg = GPTConfig(11, 8, 2, heads, 16, n_kv_head=kv)
    sd = ref.random_state_dict(cfg, seed=5)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 11, (3, 7)), rng.integers(0, 11, (3, 7))
    want_loss, _, want = ref.forward_backward(sd, cfg, idx, targets)
    loss, grads = baregpt.gpt_loss_and_grads(sd, idx, targets, (heads, kv), 2)
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    assert set(grads) == set(want)
    for key, g in want.items():
        assert rel_err(grads[key], g) <= 1e-11, key


def test_block_backward_is_the_derivative_of_block():
    """A directional derivative of <block(x), dout> by central differences."""
    cfg = GPTConfig(5, 6, 1, 2, 8, n_kv_head=1)
    full = ref.random_state_dict(cfg, seed=1)
    sd = {k[len("transformer.h.0."):]: v for k, v in full.items() if ".h.0." in k}
    rng = np.random.default_rng(0)
    x, dout, dirx = (rng.standard_normal((12, 8)) for _ in range(3))
    _, c = baregpt.block(x, sd, "", (2, 1), 2)
    grads: dict = {}
    dx = baregpt.block_backward(dout, sd, "", (2, 1), c, grads)
    h = 1e-6
    up, down = (np.vdot(baregpt.block(x + s * h * dirx, sd, "", (2, 1), 2)[0], dout)
                for s in (1, -1))
    assert abs((up - down) / (2 * h) - np.vdot(dx, dirx)) <= 1e-6 * abs(np.vdot(dx, dirx))
