"""tpmpi.TransformerBlock at world sizes 1-4 against the serial block of tests/gpt_reference.py
with dropout at every site (the serial masks): the output, dx and every parameter gradient,
with and without sequence parallelism (the LayerNorm gradient shares summed over the group by
PartialGrads); its schedule has the per-block collectives of the design."""
import numpy as np
import pytest

import gpt_reference as ref
from conftest import rel_err
from tpmpi.core.backend import get_backend
from tpmpi.core.dropout import Site, keep_mask
from tpmpi.core.partition import block_range
from tpmpi.core.schedule import Collective
from tpmpi.layers.block import DropoutCall, TransformerBlock
from tpmpi.layers.leaf import PartialGrads
from tpmpi.models import GPTConfig

SITES = {"attention": Site.ATTENTION, "attention_output": Site.ATTENTION_OUTPUT,
         "mlp_output": Site.MLP_OUTPUT}


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_matches_the_serial_block(grid, sp):
    cfg = GPTConfig(5, 8, 2, 4, 8, n_kv_head=2)
    sd = ref.random_state_dict(cfg, seed=7)
    B, T, d, p, layer = 2, 5, 8, 0.2, 1
    prefix = f"transformer.h.{layer}"
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d))

    def mask(site, i, shape):
        return keep_mask(p, seed=9, call=2, layer=i, site=SITES[site], sample_shape=shape[1:],
                         samples=(0, shape[0])) / (1 - p)

    z = ref.Dims(cfg, B, T)
    want, saved = ref._block(x, sd, prefix, layer, z, mask)
    grads: dict = {}
    dx_want = ref._block_back(dout, sd, prefix, z, saved, grads)
    dense = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    block = TransformerBlock(d, 4, 2, layer=layer, grid=grid, backend=get_backend("numpy"),
                             dtype="float64", sequence_parallel=sp, dense=dense)
    shares = PartialGrads(block.layer_norms(), grid.comm, None) if sp else None
    a, b = block_range(B * T, grid.size, grid.comm.Get_rank()) if sp else (0, B * T)
    drop = DropoutCall(p, 9, 2, T, 0, (a, b), d)
    y = block.forward(x.reshape(B * T, d)[a:b].copy(), B, drop)
    assert rel_err(y, want.reshape(B * T, d)[a:b]) <= 1e-12
    if shares:
        shares.start()
    dx = block.backward(dout.reshape(B * T, d)[a:b].copy())
    if shares:
        shares.finish()
    assert rel_err(dx, dx_want.reshape(B * T, d)[a:b]) <= 1e-12
    for name in ("ln_1", "ln_2"):
        ln = getattr(block, name)
        assert rel_err(ln.grad_weight, grads[f"{prefix}.{name}.weight"]) <= 1e-12
        assert rel_err(ln.grad_bias, grads[f"{prefix}.{name}.bias"]) <= 1e-12
    fc = block.mlp.fc1
    assert rel_err(fc.grad_weight, grads[f"{prefix}.mlp.c_fc.weight"].T[:, fc.shard[1]]) <= 1e-12
    assert rel_err(block.mlp.fc2.grad_bias, grads[f"{prefix}.mlp.c_proj.bias"]) <= 1e-12


def test_schedule_has_the_designs_collectives_per_block():
    plain = TransformerBlock.schedule_for(2, 16, 64, 8, 4, backward=True)
    ops = [s.op for s in plain.steps() if isinstance(s, Collective)]
    assert ops == ["allreduce"] * 4
    sp = TransformerBlock.schedule_for(2, 16, 64, 8, 4, sequence_parallel=True, backward=True)
    ops = [s.op for s in sp.steps() if isinstance(s, Collective)]
    assert ops.count("reduce_scatter") == 4 and ops.count("allgather") == 5  # MLP re-gather


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", [False, True])
def test_saved_bytes_are_korthikanti_s_but_for_the_attention_core(tp, sp):
    """Half precision with dropout. Korthikanti et al. 2022 (Table 2): s b h (10 + 24/t)
    + 5 a s^2 b / t per block, s b h 34/t + 5 a s^2 b / t with sequence parallelism. The tpmpi
    block keeps the same s b h terms, except that its attention keeps the gathered input under
    sequence parallelism (2 s b h (1 - 1/t) more; the MLP gathers its input again in backward),
    and its attention core keeps no s^2 terms (no probabilities; the dropout mask is drawn
    again from its seed) but the float32 log-sum-exp of every query row: 4 a s b / t."""
    s, b, h, a = 1024, 4, 4096, 32
    block = TransformerBlock.schedule_for(b, s, h, a, tp, sequence_parallel=sp, dropout=True,
                                          dtype="float16", backward=True)
    korthikanti = s * b * h * (34 / tp if sp else 10 + 24 / tp) + 5 * a * s * s * b / tp
    gathered_input = 2 * s * b * h * (1 - 1 / tp) if sp else 0
    core = 4 * a * s * b / tp
    assert block.saved_bytes == pytest.approx(korthikanti - 5 * a * s * s * b / tp
                                              + gathered_input + core)


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_a_second_step_equals_a_fresh_blocks_step(grid, sp):
    """The arrays a forward writes into the previous step's memory (the MLP's GELU and Phi)
    leave the next step exact: one block's second step (new input, new dy, gradients zeroed
    between) is bit for bit that of a fresh block built alike, float32 and uneven shapes."""
    cfg = GPTConfig(5, 12, 2, 3, 12, n_kv_head=3)
    sd = ref.random_state_dict(cfg, seed=8)
    prefix = "transformer.h.0."
    dense = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    B, T, d = 3, 5, 12
    a, b = block_range(B * T, grid.size, grid.comm.Get_rank()) if sp else (0, B * T)
    rng = np.random.default_rng(11)
    x1, x2, d1, d2 = (rng.standard_normal((B * T, d)).astype(np.float32)[a:b].copy()
                      for _ in range(4))

    def build():
        block = TransformerBlock(d, 3, 3, layer=0, grid=grid, backend=get_backend("numpy"),
                                 dtype="float32", sequence_parallel=sp, dense=dense)
        return block, (PartialGrads(block.layer_norms(), grid.comm, None) if sp else None)

    def step(block, shares, x, dy):
        y = block.forward(x, B, DropoutCall(0.0, 0, 0, T, 0, (a, b), d))
        if shares:
            shares.start()
        dx = block.backward(dy)
        if shares:
            shares.finish()
        return y, dx, [g.copy() for _, _, g in block.parameters()]

    used, used_shares = build()
    step(used, used_shares, x1, d1)
    used.zero_grad()
    fresh, fresh_shares = build()
    for got, want in zip(step(used, used_shares, x2, d2), step(fresh, fresh_shares, x2, d2)):
        for g, w in zip(got if isinstance(got, list) else [got],
                        want if isinstance(want, list) else [want]):
            assert np.array_equal(g, w)
