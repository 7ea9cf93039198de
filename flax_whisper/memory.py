"""Augmented memory (SPEC 4.3), mirroring `torch_ref/memory.py`: persistent memory slots
`memory (m, d)` plus the non-trainable `memory_state`, retrieved with the content bias of 4.2, and
written back in training mode (`memory_update`) exactly once per forward pass. NNX keeps the state
in a `MemoryState` variable (a `Buffer`: carried by the converter, skipped by the optimiser); under
`nnx.remat` the update is an output of the forward, so recomputation cannot apply it twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.attention import Cache, attention_weights, mix_values, position_mask, value_or_none
from flax_whisper.biased import BiasedAttention
from flax_whisper.layers import Buffer, Linear
from whisper_config import ModelConfig


class MemoryState(Buffer):
    """The written-back part of the memory slots (torch: the `memory_state` buffer)."""


class AugmentedMemory(BiasedAttention):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, *, rngs: nnx.Rngs):
        super().__init__(n_state, n_head, config, rotary, rngs=rngs)
        init = jax.nn.initializers.normal(n_state**-0.5)
        self.memory = nnx.Param(init(rngs.params(), (config.memory_size, n_state), jnp.float32))
        self.memory_state = MemoryState(jnp.zeros((config.memory_size, n_state), jnp.float32))
        self.memory_update = Linear(n_state, n_state, rngs=rngs) if config.memory_update else None
        self.momentum = config.memory_momentum
        self.deterministic = False  # training mode; `model.eval()` sets True, as for Dropout

    def __call__(
        self, x: jax.Array, *, causal: bool = False, cache: Cache | None = None, offset=0
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache; in training, also writes `memory_state`."""
        b, t, _ = x.shape
        m = self.memory.shape[0]
        q, k, v, cache = self.project_self(x, cache, offset)  # k, v (B, S, d)
        slots = (self.memory[...] + self.memory_state[...]).astype(x.dtype)  # (m, d)
        keys = jnp.concatenate([jnp.broadcast_to(self.key(slots), (b, *slots.shape)), k], axis=1)  # (B, m + S, d)
        values = jnp.concatenate([jnp.broadcast_to(self.value(slots), (b, *slots.shape)), v], axis=1)
        mask = position_mask(offset, t, k.shape[1], causal, None)  # (T, S) or None
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((t, m), bool), mask], axis=1)
        weights = attention_weights(
            q, keys, self.n_head, self.attention_scale(), mask, value_or_none(self.content_bias)
        )
        y = self.out(mix_values(weights, values, self.attention_dropout))
        if not self.deterministic and self.memory_update is not None:
            self.memory_state[...] = self.written_state(weights[..., :m].mean(1), y)
        return y, cache

    def written_state(self, slot_weights: jax.Array, y: jax.Array) -> jax.Array:
        """slot_weights (B, T, m) head-mean, y (B, T, d) -> the next `memory_state` (m, d)."""
        w = self.memory_update(y).astype(jnp.float32)  # (B, T, d)
        delta = jnp.einsum("bts,btd->sd", slot_weights, w) / (slot_weights.sum((0, 1))[:, None] + 1e-6)
        return (1 - self.momentum) * self.memory_state[...] + self.momentum * jax.lax.stop_gradient(delta)
