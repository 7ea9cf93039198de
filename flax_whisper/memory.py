"""Augmented memory (model contract 4.3, revision 2), mirroring `torch_ref/memory.py`: persistent
memory slots `memory (m, d)` plus the non-trainable `memory_state`, retrieved with the content
bias of 4.2, and written back in training mode (`memory_update`) from the module's own output,
over the real (not padded) positions, exactly once per forward pass. NNX keeps the state in a
`MemoryState` variable (a `Buffer`: carried by the converter, skipped by the optimiser); under
`nnx.remat` the update is an output of the forward, so recomputation cannot apply it twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.attention import Cache, self_layout
from flax_whisper.biased import BiasedAttention
from flax_whisper.kernel import Mask, cache_layout, kv_layout, scores, seq_axis
from flax_whisper.layers import Buffer
from whisper_config import ModelConfig


class MemoryState(Buffer):
    """The written-back part of the memory slots (torch: the `memory_state` buffer)."""


class AugmentedMemory(BiasedAttention):
    """The slots are the first `m` keys and values, seen by every query (a `Mask` prefix); a
    decoding cache holds them in its first `m` rows, projected once by `init_cache`."""

    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, *, rngs: nnx.Rngs):
        super().__init__(n_state, n_head, config, rotary, rngs=rngs)
        init = jax.nn.initializers.normal(n_state**-0.5)
        self.memory = nnx.Param(init(rngs.params(), (config.memory_size, n_state), jnp.float32), axes=(None, "embed"))
        self.memory_state = MemoryState(jnp.zeros((config.memory_size, n_state), jnp.float32), axes=(None, "embed"))
        self.memory_update = config.memory_update
        self.momentum = config.memory_momentum
        self.deterministic = False  # training mode; `model.eval()` sets True, as for Dropout

    def __call__(
        self, x: jax.Array, *, causal: bool = False, cache: Cache | None = None, offset=0, valid=None
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache; in training, also writes `memory_state`
        from the positions `valid` (B, T) marks real (all of them when None)."""
        m, fold = self.memory.shape[0], self.folds_value_bias(cache)
        q, k, v, cache = self.project_self(x, cache, offset, prefix=m, value_bias=not fold)  # m + S keys with a cache
        axis = k.ndim + seq_axis(kv_layout())
        slot_k, slot_v = self.slot_keys_values(x.shape[0], x.dtype, value_bias=not fold)
        if cache is None:
            k, v = jnp.concatenate([slot_k, k], axis=axis), jnp.concatenate([slot_v, v], axis=axis)  # m + S keys
        write = not self.deterministic and self.memory_update
        mask = Mask(causal=causal, prefix=m)
        out = self.attend(q, k, v, mask, offset=offset, return_lse=write, layout=self_layout(cache))
        y = self.output(out[0] if write else out, value_bias_folded=fold)
        if write:
            self.memory_state[...] = self.written_state(self.slot_weights(q, slot_k, out[1]), y, valid)
        return y, cache

    def slot_keys_values(
        self, batch: int, dtype, layout: str | None = None, value_bias: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `memory + memory_state` (no position, no rotary): m keys each, in
        `layout` (by default `kv_layout()`); `value_bias` as `keys_values`."""
        slots = (self.memory[...] + self.memory_state[...]).astype(dtype)[None]  # (1, m, d)
        k, v = self.keys_values(slots, layout=layout, value_bias=value_bias)
        return jnp.broadcast_to(k, (batch, *k.shape[1:])), jnp.broadcast_to(v, (batch, *v.shape[1:]))

    def slot_weights(self, q: jax.Array, slot_k: jax.Array, lse: jax.Array) -> jax.Array:
        """Head-mean attention weight of every query on every slot, from a small separate product:
        q (B, T, H, dh), slot_k (m keys in `kv_layout()`), lse (B, T, H) of the full softmax -> (B, T, m)."""
        logits = scores(q, slot_k, self.attention_scale(), kv_layout())  # (B, H, T, m) float32
        return jnp.exp(logits - jnp.swapaxes(lse, 1, 2)[..., None]).mean(axis=1)

    def written_state(self, slot_weights: jax.Array, y: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """slot_weights (B, T, m) head-mean, y (B, T, d) the module's output, valid (B, T) or None
        -> the next `memory_state` (m, d): a momentum step towards each slot's weighted mean output."""
        if valid is not None:
            slot_weights = slot_weights * valid[..., None]  # padding writes nothing
        delta = jnp.einsum("bts,btd->sd", slot_weights, y.astype(jnp.float32)) / (
            slot_weights.sum((0, 1))[:, None] + 1e-6
        )
        return (1 - self.momentum) * self.memory_state[...] + self.momentum * jax.lax.stop_gradient(delta)

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> Cache:
        """The slots' keys and values in the first `m` positions, then `length` empty ones."""
        layout = cache_layout()
        slot_k, slot_v = self.slot_keys_values(batch, dtype, layout)
        empty = super().init_cache(batch, length, dtype)
        return {
            "k": jnp.concatenate([slot_k, empty["k"]], axis=4 + seq_axis(layout)),
            "v": jnp.concatenate([slot_v, empty["v"]], axis=4 + seq_axis(layout, values=True)),
        }

    def cache_capacity(self, cache: Cache) -> int:
        return cache["k"].shape[seq_axis(cache_layout())] - self.memory.shape[0]
