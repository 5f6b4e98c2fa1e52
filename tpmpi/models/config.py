"""The GPT's configuration and its state-dict names and shapes (nanoGPT's, torch shapes).

``GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, *, n_kv_head=None, dropout=0.0,
bias=True)`` is the *contract* of DESIGN's Transformer section: nanoGPT's GPT-2 architecture
with an optional grouped-query extension (``n_kv_head`` kv heads, ``None`` meaning
``n_head``). The checks here are local (every rank holds the same config); the model agrees on
their outcome before any collective.

:func:`state_dict_shapes` lists every parameter in nanoGPT's ``state_dict()`` order; the
``.bias`` keys exist only when ``bias`` is set, and ``lm_head.weight`` is tied to
``transformer.wte.weight`` (the same array).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.args import check_int
from ..core.dropout import check_probability


@dataclasses.dataclass(frozen=True, init=False)
class GPTConfig:
    """Sizes of a GPT: ``GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, *,
    n_kv_head=None, dropout=0.0, bias=True)``; ``n_kv_head`` holds ``n_head`` when given as
    None. ValueError naming the argument, its value and what was expected on a config that
    cannot work."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int
    dropout: float
    bias: bool

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, *, n_kv_head: Optional[int] = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        sizes = {"vocab_size": vocab_size, "block_size": block_size, "n_layer": n_layer,
                 "n_head": n_head, "n_embd": n_embd}
        for name, value in sizes.items():
            object.__setattr__(self, name, check_int(name, value, 1))
        n_kv = check_int("n_kv_head", n_kv_head, 1, allow_none=True)
        object.__setattr__(self, "n_kv_head", self.n_head if n_kv is None else n_kv)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd}: expected a multiple of "
                             f"n_head={self.n_head} (the head size is n_embd // n_head)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head}: expected a divisor of "
                             f"n_head={self.n_head}")
        object.__setattr__(self, "dropout", check_probability(dropout))
        if not isinstance(bias, bool):
            raise ValueError(f"bias={bias!r}: expected True or False")
        object.__setattr__(self, "bias", bias)

    @property
    def head_size(self) -> int:
        """``n_embd // n_head``."""
        return self.n_embd // self.n_head


def state_dict_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``cfg`` and its torch shape (Linear weights ``(out, in)``), in
    nanoGPT's order."""
    d, hd, V = cfg.n_embd, cfg.head_size, cfg.vocab_size
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hd

    def linear(name: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if cfg.bias else {})}

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (d,), **({f"{name}.bias": (d,)} if cfg.bias else {})}

    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, d),
                                          "transformer.wpe.weight": (cfg.block_size, d)}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        shapes |= norm(f"{h}.ln_1")
        shapes |= linear(f"{h}.attn.c_attn", qkv, d)
        shapes |= linear(f"{h}.attn.c_proj", d, cfg.n_head * hd)
        shapes |= norm(f"{h}.ln_2")
        shapes |= linear(f"{h}.mlp.c_fc", 4 * d, d)
        shapes |= linear(f"{h}.mlp.c_proj", d, 4 * d)
    shapes |= norm("transformer.ln_f")
    shapes["lm_head.weight"] = (V, d)
    return shapes
