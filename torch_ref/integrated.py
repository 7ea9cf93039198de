"""The seed's integrated block (contract 4.6): its three integration ideas in one attention sub-layer.

With `x` the (already normed) input: `u = hybrid'(x)`, the hybrid attention of 4.5 whose local
branch is the dynamic convolution of 4.4 (idea 1); then `y = u + memory_attn(ln_memory(x + u))`,
the biased augmented memory of 4.3 (idea 2). Rotary and learned sinusoidal positions come from
the model's position settings (idea 3; the `integrated` preset turns both on).
Cache: `{"hybrid": ..., "memory_attn": ...}`.
"""

from __future__ import annotations

from torch import Tensor, nn

from torch_ref.attention import smallest
from torch_ref.dynamic_conv import DynamicConvAttention
from torch_ref.hybrid import HybridAttention
from torch_ref.layers import make_norm
from torch_ref.memory import AugmentedMemory
from whisper_config import ModelConfig

Cache = dict[str, dict]


class IntegratedAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False):
        super().__init__()
        local = DynamicConvAttention(n_state, n_head, config)
        self.hybrid = HybridAttention(n_state, n_head, config, rotary, local_attn=local)
        self.ln_memory = make_norm(config, n_state)
        self.memory_attn = AugmentedMemory(n_state, n_head, config, rotary)

    def forward(
        self, x: Tensor, *, causal: bool = False, cache: Cache | None = None, offset: int = 0, valid=None
    ) -> tuple[Tensor, Cache | None]:
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

    def init_cache(self, batch: int, length: int, dtype, device) -> Cache:
        return {
            "hybrid": self.hybrid.init_cache(batch, length, dtype, device),
            "memory_attn": self.memory_attn.init_cache(batch, length, dtype, device),
        }

    def cache_capacity(self, cache: Cache) -> int | None:
        return smallest(
            self.hybrid.cache_capacity(cache["hybrid"]), self.memory_attn.cache_capacity(cache["memory_attn"])
        )
