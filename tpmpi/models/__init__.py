"""Whole models built from tpmpi's layers: the GPT of DESIGN's Transformer section
(:class:`GPT`, its configuration and state-dict names in :mod:`tpmpi.models.config`)."""
from .config import GPTConfig, state_dict_shapes
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "state_dict_shapes"]
