"""Whole models built from tpmpi's layers: the GPT of DESIGN's Transformer section (its
configuration and state-dict names here; the tensor-parallel model itself assembles the layers
of :mod:`tpmpi.layers`)."""
from .config import GPTConfig, state_dict_shapes

__all__ = ["GPTConfig", "state_dict_shapes"]
