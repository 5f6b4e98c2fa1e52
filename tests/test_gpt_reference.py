"""The serial float64 GPT reference (tests/gpt_reference.py) checked on its own: its hand-derived
backward against central finite differences of its forward (every parameter kind, tiny models)
and its loss, logits and every gradient against torch autograd of an independent torch model
(skipped without torch), for multi-head and grouped-query attention, bias on and off, dropout,
label smoothing and ignore_index."""
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import gpt_reference as ref

# (n_head, n_kv_head, bias, dropout, label_smoothing, ignore some targets)
CASES = [(4, 4, True, 0.0, 0.0, False), (4, 1, True, 0.25, 0.1, True),
         (4, 2, False, 0.25, 0.0, True), (6, 3, True, 0.0, 0.2, False),
         (3, 3, False, 0.5, 0.3, True)]


def config(n_head, n_kv_head, bias, *, V=11, block=6, layers=2, hd=2):
    return SimpleNamespace(vocab_size=V, block_size=block, n_layer=layers, n_head=n_head,
                           n_embd=n_head * hd, n_kv_head=n_kv_head, bias=bias)


def fixed_masks(p: float, seed: int = 0):
    """mask(site, layer, shape): a fixed inverted-dropout multiplier per (site, layer, shape)."""
    if p == 0:
        return None

    def mask(site, layer, shape):
        rng = np.random.default_rng([seed, layer, zlib.crc32(site.encode()), *shape])
        return (rng.random(shape) >= p) / (1 - p)
    return mask


def problem(cfg, B=2, T=5, ignore=False, seed=1):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    if ignore:
        targets[0, 1] = targets[-1, -1] = -100
    return idx, targets


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_central_differences(case):
    n_head, n_kv, bias, p, smooth, ignore = case
    cfg = config(n_head, n_kv, bias)
    sd = ref.random_state_dict(cfg, seed=3)
    idx, targets = problem(cfg, ignore=ignore)
    kw = dict(mask=fixed_masks(p), label_smoothing=smooth)
    _, _, grads = ref.forward_backward(sd, cfg, idx, targets, **kw)
    rng = np.random.default_rng(5)
    h = 1e-5
    for key in sd:
        if key == "lm_head.weight":  # tied: the same array as wte, checked through wte
            continue
        flat = sd[key].reshape(-1)
        for e in rng.choice(flat.size, size=min(flat.size, 6), replace=False):
            old = flat[e]
            flat[e] = old + h
            up = ref.forward_backward(sd, cfg, idx, targets, backward=False, **kw)[0]
            flat[e] = old - h
            down = ref.forward_backward(sd, cfg, idx, targets, backward=False, **kw)[0]
            flat[e] = old
            numeric = (up - down) / (2 * h)
            assert abs(grads[key].reshape(-1)[e] - numeric) < 1e-7 * max(1.0, abs(numeric)), \
                (key, e, grads[key].reshape(-1)[e], numeric)
    assert grads["lm_head.weight"] is grads["transformer.wte.weight"]


def test_the_reference_checks_its_inputs():
    cfg = config(4, 2, True)
    sd = ref.random_state_dict(cfg)
    idx, targets = problem(cfg)
    with pytest.raises(AssertionError, match=r"ln_f\.bias"):
        ref.forward_backward({k: v for k, v in sd.items() if k != "transformer.ln_f.bias"},
                             cfg, idx, targets)
    untied = dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1})
    with pytest.raises(AssertionError, match="untied"):
        ref.forward_backward(untied, cfg, idx, targets)


def test_all_targets_ignored_gives_nan_and_zero_gradients():
    cfg = config(2, 1, True, layers=1)
    sd = ref.random_state_dict(cfg)
    idx, _ = problem(cfg)
    loss, _, grads = ref.forward_backward(sd, cfg, idx, np.full(idx.shape, -100))
    assert math.isnan(loss)
    assert all(not np.any(g) for g in grads.values())


def test_the_loss_starts_near_log_vocab():
    cfg = config(4, 2, True, V=50)
    sd = ref.random_state_dict(cfg, scale=1e-3)
    idx, targets = problem(cfg)
    assert abs(ref.forward_backward(sd, cfg, idx, targets)[0] - math.log(50)) < 1e-3


# ---- against torch autograd ------------------------------------------------------------------

def torch_gpt(sd: dict, cfg, idx, targets, mask, smooth: float):
    """An independent torch implementation (autograd does the backward)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in sd.items() if k != "lm_head.weight"}
    idx_t, tgt = torch.tensor(idx), torch.tensor(targets)
    B, T = idx.shape
    nh, nkv, d = cfg.n_head, cfg.n_kv_head, cfg.n_embd
    hd = d // nh

    def drop(site, layer, shape):
        m = mask(site, layer, shape) if mask else None
        return 1.0 if m is None else torch.tensor(m)

    def lin(x, name):
        return F.linear(x, P[f"{name}.weight"], P.get(f"{name}.bias"))

    def ln(x, name):
        return F.layer_norm(x, (d,), P[f"{name}.weight"], P.get(f"{name}.bias"), eps=1e-5)

    x = (P["transformer.wte.weight"][idx_t] + P["transformer.wpe.weight"][:T]) \
        * drop("embedding", 0, (B, T, d))
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        q, k, v = lin(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split([nh * hd, nkv * hd,
                                                                     nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        v = v.view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(causal, float("-inf"))
        att = torch.softmax(att, dim=-1) * drop("attention", i, (B, nh, T, T))
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + lin(y, f"{p}.attn.c_proj") * drop("attention_output", i, (B, T, d))
        m = lin(F.gelu(lin(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")), f"{p}.mlp.c_proj")
        x = x + m * drop("mlp_output", i, (B, T, d))
    logits = ln(x, "transformer.ln_f") @ P["transformer.wte.weight"].T
    loss = F.cross_entropy(logits.view(B * T, -1), tgt.view(-1), ignore_index=-100,
                           label_smoothing=smooth)
    loss.backward()
    return loss.item(), logits.detach().numpy(), {k: t.grad.numpy() for k, t in P.items()}


@pytest.mark.parametrize("case", CASES + [(8, 2, True, 0.1, 0.1, True)])
def test_matches_torch_autograd(case):
    n_head, n_kv, bias, p, smooth, ignore = case
    cfg = config(n_head, n_kv, bias, V=13, block=9, layers=2, hd=3)
    sd = ref.random_state_dict(cfg, seed=7)
    idx, targets = problem(cfg, B=3, T=7, ignore=ignore)
    mask = fixed_masks(p, seed=2)
    loss, logits, grads = ref.forward_backward(sd, cfg, idx, targets, mask=mask,
                                               label_smoothing=smooth)
    t_loss, t_logits, t_grads = torch_gpt(sd, cfg, idx, targets, mask, smooth)
    assert abs(loss - t_loss) < 1e-12 * abs(t_loss)
    assert np.abs(logits - t_logits).max() < 1e-12 * np.abs(t_logits).max()
    assert set(t_grads) | {"lm_head.weight"} == set(grads)
    for key, g in t_grads.items():
        assert np.abs(grads[key] - g).max() <= 1e-11 * np.abs(g).max(), key


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (4, 1)])
def test_matches_torch_at_edge_shapes(B, T):
    cfg = config(4, 2, True, V=5, block=9, layers=1)
    sd = ref.random_state_dict(cfg, seed=4)
    idx, targets = problem(cfg, B=B, T=T)
    loss, _, grads = ref.forward_backward(sd, cfg, idx, targets, label_smoothing=0.1)
    t_loss, _, t_grads = torch_gpt(sd, cfg, idx, targets, None, 0.1)
    assert abs(loss - t_loss) < 1e-12 * abs(t_loss)
    for key, g in t_grads.items():
        assert np.abs(grads[key] - g).max() <= 1e-11 * max(np.abs(g).max(), 1e-300), key
