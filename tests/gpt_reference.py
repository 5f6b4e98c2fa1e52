"""The independent serial float64 reference of the GPT (DESIGN's Transformer section): NumPy
forward and hand-derived backward, written apart from tpmpi (nothing here imports it).

Architecture (nanoGPT, GPT-2 style, with grouped-query attention): token + position embedding,
dropout; per block ``x = x + drop(attn(ln_1(x))); x = x + drop(mlp(ln_2(x)))`` with causal
softmax attention (query head ``h`` attends with kv head ``h // (n_head // n_kv_head)``, scale
``1/sqrt(hd)``, dropout on the probabilities) and an exact-erf GELU MLP of width ``4 d``; final
LayerNorm (eps 1e-5), logits ``x wte^T`` (``lm_head`` tied to ``wte``), and the mean
cross-entropy over targets other than ``ignore_index`` with PyTorch's label smoothing
``(1 - a) nll + a mean_v(-log p_v)`` (NaN when every target is ignored, as torch).

Parameters come as a state dict in nanoGPT's names and torch shapes (Linear weights are
``(out, in)``), checked against this module's own list (:func:`shapes`). Dropout is whatever
``mask(site, layer, shape)`` returns: the multiplier (0 or ``1/(1-p)``) of the activations at
``site`` -- ``"embedding"`` (layer 0, shape ``(B, T, d)``), ``"attention"`` (the probabilities,
``(B, n_head, T, T)``), ``"attention_output"`` and ``"mlp_output"`` (``(B, T, d)``) -- or None
for no dropout there; ``mask=None`` means no dropout anywhere.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
from scipy.special import erf

EPS = 1e-5
Mask = Callable[[str, int, tuple], Optional[np.ndarray]]


def shapes(vocab_size, block_size, n_layer, n_head, n_embd, n_kv_head, bias) -> dict:
    """{state-dict key: torch shape}, written out independently of tpmpi.models."""
    d, hd = n_embd, n_embd // n_head
    out = {"transformer.wte.weight": (vocab_size, d), "transformer.wpe.weight": (block_size, d)}
    per_block = [("ln_1", (d,), (d,)), ("attn.c_attn", ((n_head + 2 * n_kv_head) * hd, d),
                                        ((n_head + 2 * n_kv_head) * hd,)),
                 ("attn.c_proj", (d, n_head * hd), (d,)), ("ln_2", (d,), (d,)),
                 ("mlp.c_fc", (4 * d, d), (4 * d,)), ("mlp.c_proj", (d, 4 * d), (d,))]
    for i in range(n_layer):
        for name, w, b in per_block:
            out[f"transformer.h.{i}.{name}.weight"] = w
            if bias:
                out[f"transformer.h.{i}.{name}.bias"] = b
    out["transformer.ln_f.weight"] = (d,)
    if bias:
        out["transformer.ln_f.bias"] = (d,)
    out["lm_head.weight"] = (vocab_size, d)
    return out


def random_state_dict(cfg, seed: int = 0, scale: float = 0.3) -> dict:
    """A state dict of ``cfg`` (any object with the GPTConfig attributes) with normal entries
    (LayerNorm weights around 1), ``lm_head.weight`` the same array as ``wte``."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in _shapes_of(cfg).items():
        if key == "lm_head.weight":
            sd[key] = sd["transformer.wte.weight"]
        elif ".ln_" in key and key.endswith("weight"):
            sd[key] = 1.0 + scale * rng.standard_normal(shape)
        else:
            sd[key] = scale * rng.standard_normal(shape)
    return sd


def _shapes_of(cfg) -> dict:
    kv = cfg.n_kv_head if cfg.n_kv_head is not None else cfg.n_head
    return shapes(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, kv,
                  cfg.bias)


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x - mu) * rstd
    return xhat * w + (0.0 if b is None else b), (xhat, rstd)


def layer_norm_backward(dy, w, saved):
    xhat, rstd = saved
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, dy.shape[-1]).sum(0), dy.reshape(-1, dy.shape[-1]).sum(0)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_grad(x):
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _linear(x, sd, name):
    b = sd.get(f"{name}.bias")
    return x @ sd[f"{name}.weight"].T + (0.0 if b is None else b)


def _linear_back(dy, x, sd, name, grads):
    d2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    grads[f"{name}.weight"] = d2.T @ x2
    if f"{name}.bias" in sd:
        grads[f"{name}.bias"] = d2.sum(0)
    return dy @ sd[f"{name}.weight"]


def _drop(mask: Optional[Mask], site: str, layer: int, shape: tuple):
    m = None if mask is None else mask(site, layer, shape)
    if m is not None:
        assert m.shape == shape, (site, layer, m.shape, shape)
    return 1.0 if m is None else m


class Dims:
    """The sizes of one call."""

    def __init__(self, cfg, B, T):
        self.B, self.T, self.nh = B, T, cfg.n_head
        self.nkv = cfg.n_kv_head if cfg.n_kv_head is not None else cfg.n_head
        self.d, self.hd, self.V = cfg.n_embd, cfg.n_embd // cfg.n_head, cfg.vocab_size
        self.group, self.scale = self.nh // self.nkv, 1.0 / math.sqrt(self.hd)


def attention(qkv, z: Dims, m_att):
    """Causal attention of the fused projection qkv (B, T, (nh + 2 nkv) hd)."""
    B, T, nh, nkv, hd = z.B, z.T, z.nh, z.nkv, z.hd
    q = qkv[..., :nh * hd].reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
    k = qkv[..., nh * hd:(nh + nkv) * hd].reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    v = qkv[..., (nh + nkv) * hd:].reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
    kr, vr = np.repeat(k, z.group, axis=1), np.repeat(v, z.group, axis=1)
    s = np.where(np.triu(np.ones((T, T), dtype=bool), 1), -np.inf,
                 q @ kr.transpose(0, 1, 3, 2) * z.scale)
    e = np.exp(s - s.max(-1, keepdims=True))
    prob = e / e.sum(-1, keepdims=True)
    y = ((prob * m_att) @ vr).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
    return y, (q, kr, vr, prob, m_att)


def attention_backward(dy, z: Dims, saved):
    """d(qkv) from dy (B, T, nh hd); dK, dV summed over the query heads of each kv head."""
    B, T, nh, nkv, hd = z.B, z.T, z.nh, z.nkv, z.hd
    q, kr, vr, prob, m_att = saved
    dy = dy.reshape(B, T, nh, hd).transpose(0, 2, 1, 3)
    dvr = (prob * m_att).transpose(0, 1, 3, 2) @ dy
    dprob = (dy @ vr.transpose(0, 1, 3, 2)) * m_att
    ds = prob * (dprob - (dprob * prob).sum(-1, keepdims=True))
    dq = ds @ kr * z.scale
    dk = (ds.transpose(0, 1, 3, 2) @ q * z.scale).reshape(B, nkv, z.group, T, hd).sum(2)
    dv = dvr.reshape(B, nkv, z.group, T, hd).sum(2)
    return np.concatenate([a.transpose(0, 2, 1, 3).reshape(B, T, -1) for a in (dq, dk, dv)],
                          axis=-1)


def _block(x, sd, p: str, i: int, z: Dims, mask):
    """One transformer block: the new residual stream and what its backward needs."""
    shape = (z.B, z.T, z.d)
    h1, ln1 = layer_norm(x, sd[f"{p}.ln_1.weight"], sd.get(f"{p}.ln_1.bias"))
    y, att = attention(_linear(h1, sd, f"{p}.attn.c_attn"), z,
                        _drop(mask, "attention", i, (z.B, z.nh, z.T, z.T)))
    m_ao = _drop(mask, "attention_output", i, shape)
    x = x + _linear(y, sd, f"{p}.attn.c_proj") * m_ao
    h2, ln2 = layer_norm(x, sd[f"{p}.ln_2.weight"], sd.get(f"{p}.ln_2.bias"))
    f = _linear(h2, sd, f"{p}.mlp.c_fc")
    g = gelu(f)
    m_mo = _drop(mask, "mlp_output", i, shape)
    x = x + _linear(g, sd, f"{p}.mlp.c_proj") * m_mo
    return x, (h1, ln1, att, y, m_ao, h2, ln2, f, g, m_mo)


def _block_back(dx, sd, p: str, z: Dims, saved, grads):
    """dx of the block's input from dx of its output; parameter gradients into ``grads``."""
    h1, ln1, att, y, m_ao, h2, ln2, f, g, m_mo = saved
    dg = _linear_back(dx * m_mo, g, sd, f"{p}.mlp.c_proj", grads)
    dh2 = _linear_back(dg * gelu_grad(f), h2, sd, f"{p}.mlp.c_fc", grads)
    dx = dx + _ln_grads(dh2, sd, f"{p}.ln_2", ln2, grads)
    dy = _linear_back(dx * m_ao, y, sd, f"{p}.attn.c_proj", grads)
    dh1 = _linear_back(attention_backward(dy, z, att), h1, sd, f"{p}.attn.c_attn", grads)
    return dx + _ln_grads(dh1, sd, f"{p}.ln_1", ln1, grads)


def _ln_grads(dy, sd, name: str, saved, grads):
    dx, grads[f"{name}.weight"], db = layer_norm_backward(dy, sd[f"{name}.weight"], saved)
    if f"{name}.bias" in sd:
        grads[f"{name}.bias"] = db
    return dx


def cross_entropy(logits, targets, z: Dims, ignore_index: int, smoothing: float):
    """Mean loss over the non-ignored targets and d(loss)/d(logits)."""
    n = z.B * z.T
    zz, t = logits.reshape(n, z.V), targets.reshape(-1)
    valid = t != ignore_index
    assert np.all((t[valid] >= 0) & (t[valid] < z.V)), "target outside the vocabulary"
    count = int(valid.sum())
    zmax = zz.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(zz - zmax).sum(-1, keepdims=True)))[:, 0]
    zt = np.where(valid, zz[np.arange(n), np.where(valid, t, 0)], 0.0)
    per_token = (1 - smoothing) * (lse - zt) + smoothing * (lse - zz.mean(-1))
    loss = float(per_token[valid].sum() / count) if count else float("nan")
    dz = np.exp(zz - lse[:, None]) - smoothing / z.V
    dz[np.arange(n)[valid], t[valid]] -= 1 - smoothing
    dz *= valid[:, None] / max(count, 1)
    return loss, dz.reshape(logits.shape)


def _check_state_dict(sd: dict, cfg) -> dict:
    want = _shapes_of(cfg)
    assert set(sd) == set(want), sorted(set(sd) ^ set(want))
    for key, shape in want.items():
        assert sd[key].shape == shape, (key, sd[key].shape, shape)
    assert np.array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"]), "untied lm_head"
    return {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}


def forward_backward(sd: dict, cfg, idx, targets, *, mask: Optional[Mask] = None,
                     ignore_index: int = -100, label_smoothing: float = 0.0,
                     backward: bool = True) -> tuple:
    """``(loss, logits (B, T, V), grads)`` of the model ``sd`` on token ids ``idx`` (B, T)
    and ``targets`` (B, T); ``grads`` maps every state-dict key to its gradient (``wte`` and
    ``lm_head`` both to the one total), None without ``backward``."""
    sd = _check_state_dict(sd, cfg)
    idx = np.asarray(idx)
    z = Dims(cfg, *idx.shape)
    wte, wpe = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
    m_emb = _drop(mask, "embedding", 0, (z.B, z.T, z.d))
    x = (wte[idx] + wpe[:z.T]) * m_emb
    saved = []
    for i in range(cfg.n_layer):
        x, block = _block(x, sd, f"transformer.h.{i}", i, z, mask)
        saved.append(block)
    xf, lnf = layer_norm(x, sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias"))
    logits = xf @ wte.T
    loss, dz = cross_entropy(logits, np.asarray(targets), z, ignore_index, label_smoothing)
    if not backward:
        return loss, logits, None

    grads: dict = {}
    dwte = dz.reshape(-1, z.V).T @ xf.reshape(-1, z.d)
    dx = _ln_grads(dz @ wte, sd, "transformer.ln_f", lnf, grads)
    for i in reversed(range(cfg.n_layer)):
        dx = _block_back(dx, sd, f"transformer.h.{i}", z, saved[i], grads)
    demb = dx * m_emb
    dwpe = np.zeros_like(wpe)
    dwpe[:z.T] = demb.sum(0)
    np.add.at(dwte, idx.reshape(-1), demb.reshape(-1, z.d))
    grads["transformer.wte.weight"] = grads["lm_head.weight"] = dwte
    grads["transformer.wpe.weight"] = dwpe
    return loss, logits, grads
