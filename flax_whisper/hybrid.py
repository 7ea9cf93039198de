"""Hybrid attention (contract 4.5), mirroring `torch_ref/hybrid.py`: a band-masked local branch and a
global branch, each with its own norm, summed; dropout on the sum."""

from __future__ import annotations

import jax
from flax import nnx

from flax_whisper.attention import MultiHeadAttention
from flax_whisper.layers import make_norm
from whisper_config import ModelConfig

Cache = dict[str, dict]


class HybridAttention(nnx.Module):
    """`local_attn` defaults to the band-masked `mha`; the integrated block passes dynamic convolution."""

    def __init__(
        self,
        n_state: int,
        n_head: int,
        config: ModelConfig,
        rotary: bool = False,
        local_attn: nnx.Module | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if local_attn is None:
            local_attn = MultiHeadAttention(n_state, n_head, config, rotary, window=config.window_size, rngs=rngs)
        self.local_attn = local_attn
        self.global_attn = MultiHeadAttention(n_state, n_head, config, rotary, rngs=rngs)
        self.ln_local = make_norm(config, n_state)
        self.ln_global = make_norm(config, n_state)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, causal: bool = False, cache: Cache | None = None, offset=0, valid=None
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache."""
        local_cache = None if cache is None else cache["local_attn"]
        global_cache = None if cache is None else cache["global_attn"]
        y_local, local_cache = self.local_attn(self.ln_local(x), causal=causal, cache=local_cache, offset=offset)
        y_global, global_cache = self.global_attn(self.ln_global(x), causal=causal, cache=global_cache, offset=offset)
        if cache is not None:
            cache = {"local_attn": local_cache, "global_attn": global_cache}
        return self.dropout(y_local + y_global), cache

    def init_cache(self, batch: int, length: int, dtype) -> Cache:
        return {
            "local_attn": self.local_attn.init_cache(batch, length, dtype),
            "global_attn": self.global_attn.init_cache(batch, length, dtype),
        }

    def cache_capacity(self, cache: Cache) -> int | None:
        sizes = [
            self.local_attn.cache_capacity(cache["local_attn"]),
            self.global_attn.cache_capacity(cache["global_attn"]),
        ]
        return min((s for s in sizes if s is not None), default=None)
