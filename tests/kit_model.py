"""The GPT assembled from tpmpi's local kernels and partitions over a *simulated* TP group (one
process; each rank's values are the entries of a list, each collective a NumPy sum, concatenation
or split across the list), optionally with sequence parallelism and several data-parallel
replicas. It is the blueprint of the parallel layers: every rank holds only its blocks (heads,
MLP columns, vocabulary rows), no rank's list entry ever holds the full ``(tokens, vocab)``
logits, and the collectives are exactly those the layers will issue -- counted in
:attr:`KitGPT.collectives` so the tests can compare them with the design's counts.

``KitGPT(sd, cfg, tp=, sequence_parallel=, dp=)`` then ``loss, grads = model.step(idx,
targets, call=, seed=)``: the mean loss of each replica's micro-batch (averaged over replicas)
and the gradient of every state-dict key, averaged over the replicas as DataParallel does.
"""
from __future__ import annotations

import collections
import math

import numpy as np

from tpmpi.core.dropout import Site, attention_keep, keep_mask
from tpmpi.core.heads import head_partition, vocab_block
from tpmpi.core.partition import block_partition
from tpmpi.layers.activations import get_activation
from tpmpi.layers.attention_core import causal_attention, causal_attention_backward
from tpmpi.layers.cross_entropy import Sums, finish_loss, local_max, local_sums, logits_grad
from tpmpi.layers.functional import (dropout, embedding_block, embedding_block_backward,
                                     layer_norm, layer_norm_backward)

GELU, GELU_GRAD = get_activation("gelu_erf")


class KitGPT:
    def __init__(self, sd: dict, cfg, *, tp: int, sequence_parallel: bool = False,
                 dp: int = 1, label_smoothing: float = 0.0) -> None:
        self.sd, self.cfg, self.tp, self.sp, self.dp = sd, cfg, tp, sequence_parallel, dp
        self.smoothing = label_smoothing
        self.hd = cfg.n_embd // cfg.n_head
        self.heads = head_partition(cfg.n_head, cfg.n_kv_head, tp)
        self.vocab = [vocab_block(cfg.vocab_size, tp, r) for r in range(tp)]
        self.hidden = block_partition(4 * cfg.n_embd, tp)
        self.collectives: collections.Counter = collections.Counter()
        self.logit_shapes: list = []

    # ---- simulated collectives over the TP group (lists of per-rank arrays) -------------------
    def allreduce(self, parts: list) -> list:
        self.collectives["allreduce"] += 1
        total = sum(parts)
        return [total.copy() for _ in parts]

    def reduce_to_layout(self, parts: list) -> list:
        """Sum of (B, T, ...) partials, then each rank's tokens under SP (Reduce_scatter) or the
        whole sum on every rank (Allreduce)."""
        if not self.sp:
            return self.allreduce(parts)
        self.collectives["reduce_scatter"] += 1
        total = sum(parts)
        return [total[:, t0:t1].copy() for t0, t1 in self.tokens]

    def gather_tokens(self, parts: list) -> list:
        """Under SP, the full sequence from the token shards (Allgather); else unchanged."""
        if not self.sp:
            return parts
        self.collectives["allgather"] += 1
        full = np.concatenate(parts, axis=1)
        return [full.copy() for _ in parts]

    def sum_replicated_grad(self, parts: list):
        """Gradient of a replicated parameter: under SP each rank has its tokens' share
        (Allreduce over the group); without SP every rank already holds the same full sum."""
        if self.sp:
            return self.allreduce(parts)[0]
        assert all(np.array_equal(p, parts[0]) for p in parts)
        return parts[0]

    # ---- dropout -------------------------------------------------------------------------------
    def hidden_keep(self, site: int, layer: int, r: int):
        if self.p == 0:
            return None
        t0, t1 = self.mine[r]
        return keep_mask(self.p, seed=self.seed, call=self.call, layer=layer, site=site,
                         sample_shape=(self.T, self.cfg.n_embd),
                         samples=(self.sample0, self.sample0 + self.B), block=[(t0, t1)])

    # ---- one replica's forward and backward ------------------------------------------------------
    def replica(self, idx, targets):
        cfg, sd, tp = self.cfg, self.sd, self.tp
        B, T = idx.shape
        self.B, self.T = B, T
        self.tokens = block_partition(T, tp)
        self.mine = self.tokens if self.sp else [(0, T)] * tp  # the positions each rank holds
        wte = sd["transformer.wte.weight"]
        x = self.reduce_to_layout([embedding_block(idx, wte[v0:v1], v0)
                                   for v0, v1 in self.vocab])
        x = [xr + sd["transformer.wpe.weight"][t0:t1] for xr, (t0, t1) in zip(x, self.mine)]
        keep_emb = [self.hidden_keep(Site.EMBEDDING, 0, r) for r in range(tp)]
        x = [dropout(xr, k, self.p) for xr, k in zip(x, keep_emb)]
        saved = []
        for i in range(cfg.n_layer):
            x, s = self.block_forward(x, i)
            saved.append(s)
        lnf = [layer_norm(xr, sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias"))
               for xr in x]
        xf = self.gather_tokens([y for y, _ in lnf])
        xf2 = [a.reshape(B * T, -1) for a in xf]
        logits = [xf2[r] @ wte[v0:v1].T for r, (v0, v1) in enumerate(self.vocab)]
        self.logit_shapes += [z.shape for z in logits]
        t = targets.reshape(-1)
        row_max = self.allreduce_max([local_max(z) for z in logits])
        rows = self.allreduce([local_sums(z, v0, t, row_max, label_smoothing=self.smoothing)
                               for z, (v0, _) in zip(logits, self.vocab)])
        sums = [Sums.from_rows(r) for r in rows]
        loss, count = finish_loss(sums[0], t, cfg.vocab_size, label_smoothing=self.smoothing)
        # ---- backward
        dz = [logits_grad(z, v0, t, row_max, s, cfg.vocab_size, scale=1.0 / count,
                          label_smoothing=self.smoothing)
              for z, (v0, _), s in zip(logits, self.vocab, sums)]
        g_wte = [dz[r].T @ xf2[r] for r in range(tp)]
        dx = self.reduce_to_layout([(dz[r] @ wte[v0:v1]).reshape(B, T, -1)
                                    for r, (v0, v1) in enumerate(self.vocab)])
        grads: dict = {}
        dx = self.layer_norm_back(dx, lnf, "transformer.ln_f", grads)
        for i in reversed(range(cfg.n_layer)):
            dx = self.block_backward(dx, i, saved[i], grads)
        demb_local = [dropout(d, k, self.p) for d, k in zip(dx, keep_emb)]
        demb = self.gather_tokens(demb_local)  # the backward of the embedding's Reduce_scatter
        for r, (v0, v1) in enumerate(self.vocab):
            g_wte[r] += embedding_block_backward(demb[r], idx, v0, v1 - v0)
        grads["transformer.wte.weight"] = np.concatenate(g_wte)
        # wpe is replicated: each rank has the rows of its positions (all of them without SP)
        g_wpe = np.zeros_like(sd["transformer.wpe.weight"])
        g_wpe[:T] = self.sum_replicated_grad([np.pad(d.sum(0), ((t0, T - t1), (0, 0)))
                                              for d, (t0, t1) in zip(demb_local, self.mine)])
        grads["transformer.wpe.weight"] = g_wpe
        return loss, grads

    def allreduce_max(self, parts: list):
        self.collectives["allreduce_max"] += 1
        return np.max(parts, axis=0)

    def layer_norm_back(self, dy: list, saved: list, name: str, grads: dict) -> list:
        out = [layer_norm_backward(d, s) for d, (_, s) in zip(dy, saved)]
        grads[f"{name}.weight"] = self.sum_replicated_grad([dw for _, dw, _ in out])
        if f"{name}.bias" in self.sd:
            grads[f"{name}.bias"] = self.sum_replicated_grad([db for _, _, db in out])
        return [dx for dx, _, _ in out]

    def block_forward(self, x: list, i: int):
        cfg, sd, tp, hd, p = self.cfg, self.sd, self.tp, self.hd, f"transformer.h.{i}"
        B, T = self.B, self.T
        ln1 = [layer_norm(xr, sd[f"{p}.ln_1.weight"], sd.get(f"{p}.ln_1.bias")) for xr in x]
        h1 = self.gather_tokens([y for y, _ in ln1])
        W, b = sd[f"{p}.attn.c_attn.weight"], sd.get(f"{p}.attn.c_attn.bias")
        att, ys = [], []
        for r in range(tp):
            s, rows = self.heads.shard(r), self.heads.qkv_index(r, hd)
            qkv = h1[r] @ W[rows].T + (0.0 if b is None else b[rows])
            q = qkv[..., :s.n_q * hd].reshape(B, T, s.n_q, hd)
            k = qkv[..., s.n_q * hd:(s.n_q + s.n_kv) * hd].reshape(B, T, s.n_kv, hd)
            v = qkv[..., (s.n_q + s.n_kv) * hd:].reshape(B, T, s.n_kv, hd)
            keep = attention_keep(self.p, seed=self.seed, call=self.call, layer=i,
                                  n_head=cfg.n_head, seq=T, q_head0=s.q_heads[0],
                                  sample0=self.sample0)
            y, a = causal_attention(q, k, v, s.kv_of_q, p=self.p, keep=keep if self.p else None)
            ys.append(y.reshape(B, T, -1))
            att.append(a)
        Wp = sd[f"{p}.attn.c_proj.weight"]
        a_out = self.reduce_to_layout([ys[r] @ Wp[:, self.heads.proj_cols(r, hd)].T
                                       for r in range(tp)])
        keep_ao = [self.hidden_keep(Site.ATTENTION_OUTPUT, i, r) for r in range(tp)]
        x = [xr + dropout(a + sd.get(f"{p}.attn.c_proj.bias", 0.0), k, self.p)
             for xr, a, k in zip(x, a_out, keep_ao)]
        ln2 = [layer_norm(xr, sd[f"{p}.ln_2.weight"], sd.get(f"{p}.ln_2.bias")) for xr in x]
        h2 = self.gather_tokens([y for y, _ in ln2])
        Wfc, bfc = sd[f"{p}.mlp.c_fc.weight"], sd.get(f"{p}.mlp.c_fc.bias")
        f = [h2[r] @ Wfc[c0:c1].T + (0.0 if bfc is None else bfc[c0:c1])
             for r, (c0, c1) in enumerate(self.hidden)]
        g = [GELU(fr) for fr in f]
        W2 = sd[f"{p}.mlp.c_proj.weight"]
        m = self.reduce_to_layout([g[r] @ W2[:, c0:c1].T for r, (c0, c1) in
                                   enumerate(self.hidden)])
        keep_mo = [self.hidden_keep(Site.MLP_OUTPUT, i, r) for r in range(tp)]
        x = [xr + dropout(mr + sd.get(f"{p}.mlp.c_proj.bias", 0.0), k, self.p)
             for xr, mr, k in zip(x, m, keep_mo)]
        return x, (ln1, h1, att, ys, keep_ao, ln2, h2, f, g, keep_mo)

    def block_backward(self, dx: list, i: int, saved, grads: dict) -> list:
        sd, tp, hd, p = self.sd, self.tp, self.hd, f"transformer.h.{i}"
        B, T = self.B, self.T
        ln1, h1, att, ys, keep_ao, ln2, h2, f, g, keep_mo = saved
        # MLP: c_proj is row-parallel (its dY replicated: gathered under SP), c_fc column-parallel
        dm_local = [dropout(d, k, self.p) for d, k in zip(dx, keep_mo)]
        self.bias_grad(dm_local, f"{p}.mlp.c_proj.bias", grads)
        dm = self.gather_tokens(dm_local)
        W2, Wfc = sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_fc.weight"]
        gW2, gWfc, gbfc, dh2 = np.zeros_like(W2), np.zeros_like(Wfc), [], []
        for r, (c0, c1) in enumerate(self.hidden):
            gW2[:, c0:c1] = dm[r].reshape(B * T, -1).T @ g[r].reshape(B * T, -1)
            df = (dm[r] @ W2[:, c0:c1]) * GELU_GRAD(f[r])
            gWfc[c0:c1] = df.reshape(B * T, -1).T @ h2[r].reshape(B * T, -1)
            gbfc.append(df.reshape(B * T, -1).sum(0))
            dh2.append(df @ Wfc[c0:c1])
        grads[f"{p}.mlp.c_proj.weight"], grads[f"{p}.mlp.c_fc.weight"] = gW2, gWfc
        if f"{p}.mlp.c_fc.bias" in sd:
            grads[f"{p}.mlp.c_fc.bias"] = np.concatenate(gbfc)
        dx = [a + b for a, b in zip(dx, self.layer_norm_back(self.reduce_to_layout(dh2), ln2,
                                                             f"{p}.ln_2", grads))]
        # attention: c_proj row-parallel by heads, core attention local, c_attn by head rows
        da_local = [dropout(d, k, self.p) for d, k in zip(dx, keep_ao)]
        self.bias_grad(da_local, f"{p}.attn.c_proj.bias", grads)
        da = self.gather_tokens(da_local)
        Wp, W = sd[f"{p}.attn.c_proj.weight"], sd[f"{p}.attn.c_attn.weight"]
        gWp, gW = np.zeros_like(Wp), np.zeros_like(W)
        gb = np.zeros(W.shape[0])
        dh1 = []
        for r in range(tp):
            cols, rows = self.heads.proj_cols(r, hd), self.heads.qkv_index(r, hd)
            s = self.heads.shard(r)
            gWp[:, cols] = da[r].reshape(B * T, -1).T @ ys[r].reshape(B * T, -1)
            dy = (da[r] @ Wp[:, cols]).reshape(B, T, s.n_q, hd)
            dq, dk, dv = causal_attention_backward(dy, att[r])
            dqkv = np.concatenate([a.reshape(B, T, -1) for a in (dq, dk, dv)], axis=-1)
            # K/V rows of a kv head held by several ranks: their gradients add (a sum over
            # exactly heads.kv_peers(r)); Q rows are each rank's own
            gW[rows] += dqkv.reshape(B * T, -1).T @ h1[r].reshape(B * T, -1)
            gb[rows] += dqkv.reshape(B * T, -1).sum(0)
            dh1.append(dqkv @ W[rows])
        grads[f"{p}.attn.c_proj.weight"], grads[f"{p}.attn.c_attn.weight"] = gWp, gW
        if f"{p}.attn.c_attn.bias" in sd:
            grads[f"{p}.attn.c_attn.bias"] = gb
        return [a + b for a, b in zip(dx, self.layer_norm_back(self.reduce_to_layout(dh1), ln1,
                                                               f"{p}.ln_1", grads))]

    def bias_grad(self, dy: list, name: str, grads: dict) -> None:
        """A row-parallel layer's bias (added once after the reduction): replicated."""
        if name in self.sd:
            grads[name] = self.sum_replicated_grad([d.reshape(-1, d.shape[-1]).sum(0)
                                                    for d in dy])

    def step(self, idx, targets, *, p: float = 0.0, seed: int = 0, call: int = 0):
        """Mean loss and gradients over ``dp`` replicas of ``len(idx) // dp`` samples each."""
        self.p, self.seed, self.call = p, seed, call
        B = idx.shape[0] // self.dp
        losses, total = [], None
        for r in range(self.dp):
            self.sample0 = r * B
            loss, grads = self.replica(idx[r * B:(r + 1) * B], targets[r * B:(r + 1) * B])
            losses.append(loss)
            total = grads if total is None else {k: total[k] + grads[k] for k in grads}
        out = {k: v / self.dp for k, v in total.items()}
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return float(np.mean(losses)) if not any(map(math.isnan, losses)) else math.nan, out
