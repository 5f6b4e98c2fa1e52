"""nanoGPT's block and model written as plain array code, without tpmpi's layers: the same
NumPy/CuPy operations (``xp`` is the arrays' namespace) a user would write for one process.

Two uses: the float64 serial reference that ``run --check`` compares the transformer schemes
with (:mod:`tpmpi.studies.schemes.transformer`), and the bare code the block at TP 1 is timed
against (:mod:`tpmpi.studies.vsbare`). It shares nothing with the parallel layers but the
exact GELU's vectorised ``erf`` (:func:`tpmpi.layers.activations.erf`): every product,
softmax, LayerNorm and gradient is derived here again, from the torch-shaped state dict
(``weight`` ``(out, in)``, the fused ``[Q | K | V]`` rows of ``c_attn``).

The attention forms the ``(B, H, T, T)`` scores of all heads at once (what the bare code
would do) and keeps the probabilities for backward; query head ``i`` attends with kv head
``i // (Hq / Hkv)``. No dropout. Shapes: activations ``(N, d)`` with ``N = B T`` tokens in
batch-major order.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..core.backend import backend_of
from ..layers.activations import erf

EPS = 1e-5
Arrays = Mapping[str, Any]


def _k(key: str, name: str) -> str:
    """``key.name`` (``name`` at the top level, ``key`` "")."""
    return f"{key}.{name}" if key else name


def _ln(x: Any, w: Any, b: Any) -> tuple[Any, tuple[Any, Any]]:
    mu = x.mean(-1, keepdims=True)
    inv = 1.0 / backend_of(x).xp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x - mu) * inv
    return xhat * w + b, (xhat, inv)


def _ln_back(dy: Any, w: Any, cache: tuple[Any, Any], grads: dict, key: str) -> Any:
    xhat, inv = cache
    grads[_k(key, "weight")] = (dy * xhat).sum(0)
    grads[_k(key, "bias")] = dy.sum(0)
    g = dy * w
    return inv * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


def _gelu(x: Any) -> Any:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_grad(x: Any) -> Any:
    xp = backend_of(x).xp
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * xp.exp(-0.5 * x * x) / math.sqrt(
        2.0 * math.pi)


def _heads(a: Any, batch: int, n: int) -> Any:
    """(N, n hd) -> (B, n, T, hd)."""
    return a.reshape(batch, -1, n, a.shape[1] // n).transpose(0, 2, 1, 3)


def attention(x: Any, sd: Arrays, key: str, heads: tuple[int, int], batch: int
              ) -> tuple[Any, dict]:
    """Causal self-attention of ``x (N, d)`` with the ``key.c_attn`` / ``key.c_proj`` arrays of
    ``sd`` and ``heads = (Hq, Hkv)``: ``(N, d)`` and what :func:`attention_backward` needs."""
    xp = backend_of(x).xp
    hq, hkv = heads
    d = x.shape[1]
    hd = d // hq
    qkv = x @ sd[_k(key, "c_attn.weight")].T + sd[_k(key, "c_attn.bias")]
    q = _heads(qkv[:, :hq * hd], batch, hq)
    rep = [i // (hq // hkv) for i in range(hq)]
    k = _heads(qkv[:, hq * hd:(hq + hkv) * hd], batch, hkv)[:, rep]
    v = _heads(qkv[:, (hq + hkv) * hd:], batch, hkv)[:, rep]
    seq = q.shape[2]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    s = s + xp.triu(xp.full((seq, seq), -xp.inf, dtype=s.dtype), 1)
    s = xp.exp(s - s.max(-1, keepdims=True))
    prob = s / s.sum(-1, keepdims=True)
    y = (prob @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], hq * hd)
    out = y @ sd[_k(key, "c_proj.weight")].T + sd[_k(key, "c_proj.bias")]
    return out, {"x": x, "q": q, "k": k, "v": v, "prob": prob, "y": y, "rep": rep}


def attention_backward(dout: Any, sd: Arrays, key: str, heads: tuple[int, int], c: dict,
                       grads: dict) -> Any:
    """dx of :func:`attention` from ``dout (N, d)``; the four parameter gradients into
    ``grads`` (torch shapes, keyed as ``sd``)."""
    xp = backend_of(dout).xp
    hq, hkv = heads
    batch, _, seq, hd = c["q"].shape
    grads[_k(key, "c_proj.weight")] = dout.T @ c["y"]
    grads[_k(key, "c_proj.bias")] = dout.sum(0)
    dy = _heads(dout @ sd[_k(key, "c_proj.weight")], batch, hq)
    prob = c["prob"]
    dv = prob.transpose(0, 1, 3, 2) @ dy
    dprob = dy @ c["v"].transpose(0, 1, 3, 2)
    ds = prob * (dprob - (dprob * prob).sum(-1, keepdims=True)) / math.sqrt(hd)
    dq, dk = ds @ c["k"], ds.transpose(0, 1, 3, 2) @ c["q"]
    group = hq // hkv  # the query heads of each kv head add their shares
    dk = dk.reshape(batch, hkv, group, seq, hd).sum(2)
    dv = dv.reshape(batch, hkv, group, seq, hd).sum(2)
    flat = [a.transpose(0, 2, 1, 3).reshape(batch * seq, -1) for a in (dq, dk, dv)]
    dqkv = xp.concatenate(flat, axis=1)
    grads[_k(key, "c_attn.weight")] = dqkv.T @ c["x"]
    grads[_k(key, "c_attn.bias")] = dqkv.sum(0)
    return dqkv @ sd[_k(key, "c_attn.weight")]


def block(x: Any, sd: Arrays, key: str, heads: tuple[int, int], batch: int
          ) -> tuple[Any, dict]:
    """nanoGPT's block ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))`` on ``x (N, d)``."""
    h1, ln1 = _ln(x, sd[_k(key, "ln_1.weight")], sd[_k(key, "ln_1.bias")])
    a, att = attention(h1, sd, _k(key, "attn"), heads, batch)
    x = x + a
    h2, ln2 = _ln(x, sd[_k(key, "ln_2.weight")], sd[_k(key, "ln_2.bias")])
    pre = h2 @ sd[_k(key, "mlp.c_fc.weight")].T + sd[_k(key, "mlp.c_fc.bias")]
    act = _gelu(pre)
    out = x + act @ sd[_k(key, "mlp.c_proj.weight")].T + sd[_k(key, "mlp.c_proj.bias")]
    return out, {"ln1": ln1, "att": att, "ln2": ln2, "h2": h2, "pre": pre, "act": act}


def block_backward(dout: Any, sd: Arrays, key: str, heads: tuple[int, int], c: dict,
                   grads: dict) -> Any:
    """dx of :func:`block`; every parameter gradient into ``grads``."""
    grads[_k(key, "mlp.c_proj.weight")] = dout.T @ c["act"]
    grads[_k(key, "mlp.c_proj.bias")] = dout.sum(0)
    dpre = (dout @ sd[_k(key, "mlp.c_proj.weight")]) * _gelu_grad(c["pre"])
    grads[_k(key, "mlp.c_fc.weight")] = dpre.T @ c["h2"]
    grads[_k(key, "mlp.c_fc.bias")] = dpre.sum(0)
    dx = dout + _ln_back(dpre @ sd[_k(key, "mlp.c_fc.weight")], sd[_k(key, "ln_2.weight")],
                         c["ln2"], grads, _k(key, "ln_2"))
    da = attention_backward(dx, sd, _k(key, "attn"), heads, c["att"], grads)
    return dx + _ln_back(da, sd[_k(key, "ln_1.weight")], c["ln1"], grads, _k(key, "ln_1"))


def gpt_loss_and_grads(sd: Arrays, idx: Any, targets: Any, heads: tuple[int, int],
                       layers: int) -> tuple[float, dict]:
    """Mean cross-entropy of nanoGPT's GPT (tied head) on ``idx``, ``targets`` ``(B, T)`` and
    the gradient of every state-dict key (``lm_head.weight`` is the tied
    ``transformer.wte.weight``: its gradient holds both uses)."""
    xp = backend_of(sd["transformer.wte.weight"]).xp
    batch, seq = idx.shape
    wte = sd["transformer.wte.weight"]
    ids = idx.reshape(-1)
    x = wte[ids] + xp.tile(sd["transformer.wpe.weight"][:seq], (batch, 1))
    caches = []
    for i in range(layers):
        x, c = block(x, sd, f"transformer.h.{i}", heads, batch)
        caches.append(c)
    xf, lnf = _ln(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    logits = xf @ wte.T
    logits = logits - logits.max(-1, keepdims=True)
    prob = xp.exp(logits)
    prob /= prob.sum(-1, keepdims=True)
    tgt = targets.reshape(-1)
    rows = xp.arange(tgt.size)
    loss = float(-xp.log(prob[rows, tgt]).mean())
    dlogits = prob
    dlogits[rows, tgt] -= 1.0
    dlogits /= tgt.size
    grads: dict = {}
    dwte = dlogits.T @ xf
    dx = _ln_back(dlogits @ wte, sd["transformer.ln_f.weight"], lnf, grads, "transformer.ln_f")
    for i in reversed(range(layers)):
        dx = block_backward(dx, sd, f"transformer.h.{i}", heads, caches[i], grads)
    dwpe = xp.zeros_like(sd["transformer.wpe.weight"])
    dwpe[:seq] = dx.reshape(batch, seq, -1).sum(0)
    xp.add.at(dwte, ids, dx)
    grads["transformer.wpe.weight"] = dwpe
    grads["transformer.wte.weight"] = grads["lm_head.weight"] = dwte
    return loss, grads
