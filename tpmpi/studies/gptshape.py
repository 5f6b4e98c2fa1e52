"""The GPT model the planner is asked about: :class:`GPTShape` (nanoGPT's GPT-2 architecture with
the optional grouped-query heads of :class:`tpmpi.models.GPTConfig`), its parameter counts and
its :class:`~tpmpi.models.GPTConfig`. What a rank runs for it is the model's own schedule,
``tpmpi.models.GPT.schedule_for`` (:data:`tpmpi.studies.trainstep.GPT_SCHEDULE`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.args import check_int
from ..models.config import GPTConfig

DROPOUT = 0.1
"""The dropout probability of :meth:`GPTShape.config` when ``dropout`` is set (its value does
not change the schedule: only whether the dropout layers run)."""


@dataclasses.dataclass(frozen=True)
class GPTShape:
    """A GPT model: ``n_layer`` blocks of width ``n_embd`` with ``n_head`` query heads and
    ``n_kv_head`` key/value heads (None: ``n_head``), sequences of ``seq`` tokens, ``vocab``
    tokens; ``dropout``: whether the dropout layers run (masks are kept); ``bias``: biases in
    the linear layers and LayerNorms."""

    n_layer: int
    n_embd: int
    n_head: int
    seq: int
    vocab: int
    n_kv_head: Optional[int] = None
    dropout: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "seq", "vocab"):
            check_int(name, getattr(self, name), 1)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd}: expected a multiple of n_head="
                             f"{self.n_head}")
        kv = check_int("n_kv_head", self.n_kv_head, 1, allow_none=True)
        if kv is not None and self.n_head % kv:
            raise ValueError(f"n_kv_head={kv}: expected a divisor of n_head={self.n_head}")

    def config(self) -> GPTConfig:
        """The model's :class:`~tpmpi.models.GPTConfig` (``block_size`` = ``seq``)."""
        return GPTConfig(self.vocab, self.seq, self.n_layer, self.n_head, self.n_embd,
                         n_kv_head=self.n_kv_head, dropout=DROPOUT if self.dropout else 0.0,
                         bias=self.bias)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def block_params(self) -> int:
        """Parameters of one block (all ranks together)."""
        h, hd, b = self.n_embd, self.head_dim, int(self.bias)
        qkv = (self.n_head + 2 * self.kv_heads) * hd
        return (h * qkv + b * qkv) + (self.n_head * hd * h + b * h) + 2 * (4 * h * h) \
            + b * (4 * h + h) + 2 * (h + b * h)

    @property
    def params(self) -> int:
        """Parameters of the model (the LM head tied to the token embedding)."""
        h = self.n_embd
        return self.n_layer * self.block_params + (self.vocab + self.seq) * h \
            + h + int(self.bias) * h
