"""Biased attention (contract 4.2), mirroring `torch_ref/biased.py`: multi-head attention with a
learned per-head content bias `u (H, dh)`, zero-initialised, added to every query after rotary
(Transformer-XL's global content bias)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flax_whisper.attention import MultiHeadAttention
from whisper_config import ModelConfig


class BiasedAttention(MultiHeadAttention):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, *, rngs: nnx.Rngs):
        super().__init__(n_state, n_head, config, rotary, rngs=rngs)
        self.content_bias = nnx.Param(jnp.zeros((n_head, n_state // n_head), jnp.float32), axes=(None, None))
