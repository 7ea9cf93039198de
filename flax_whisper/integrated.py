"""The seed's integrated block (contract 4.6), mirroring `torch_ref/integrated.py`:
`u = hybrid'(x)` with dynamic convolution as the local branch, then
`y = u + memory_attn(ln_memory(x + u))`."""

from __future__ import annotations

import jax
from flax import nnx

from flax_whisper.attention import smallest
from flax_whisper.dynamic_conv import DynamicConvAttention
from flax_whisper.hybrid import HybridAttention
from flax_whisper.layers import make_norm
from flax_whisper.memory import AugmentedMemory
from whisper_config import ModelConfig

Cache = dict[str, dict]


class IntegratedAttention(nnx.Module):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, *, rngs: nnx.Rngs):
        local = DynamicConvAttention(n_state, n_head, config, rngs=rngs)
        self.hybrid = HybridAttention(n_state, n_head, config, rotary, local_attn=local, rngs=rngs)
        self.ln_memory = make_norm(config, n_state)
        self.memory_attn = AugmentedMemory(n_state, n_head, config, rotary, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, causal: bool = False, cache: Cache | None = None, offset=0, valid=None
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache."""
        hybrid_cache = None if cache is None else cache["hybrid"]
        memory_cache = None if cache is None else cache["memory_attn"]
        u, hybrid_cache = self.hybrid(x, causal=causal, cache=hybrid_cache, offset=offset)
        y, memory_cache = self.memory_attn(
            self.ln_memory(x + u), causal=causal, cache=memory_cache, offset=offset, valid=valid
        )
        if cache is not None:
            cache = {"hybrid": hybrid_cache, "memory_attn": memory_cache}
        return u + y, cache

    def init_cache(self, batch: int, length: int, dtype) -> Cache:
        return {
            "hybrid": self.hybrid.init_cache(batch, length, dtype),
            "memory_attn": self.memory_attn.init_cache(batch, length, dtype),
        }

    def cache_capacity(self, cache: Cache) -> int | None:
        return smallest(
            self.hybrid.cache_capacity(cache["hybrid"]), self.memory_attn.cache_capacity(cache["memory_attn"])
        )
