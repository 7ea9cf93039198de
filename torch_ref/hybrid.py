"""Hybrid attention (contract 4.5, the seed's `HybridAttention`): a local and a global branch, summed.

`y = local_attn(ln_local(x)) + global_attn(ln_global(x))`, dropout on the sum. `global_attn` is
4.1 (with rotary where enabled); `local_attn` is 4.1 restricted to a fixed band: query `i` sees key
`j` iff `|i - j| <= window_size` (decoder: `0 <= i - j <= window_size`). The seed's window shrank
with sequence length and looped over chunks in Python (contract 7.4); a static band mask jits and
caches. Cache: `{"local_attn": ..., "global_attn": ...}`, one KV cache per branch.
"""

from __future__ import annotations

from torch import Tensor, nn

from torch_ref.attention import MultiHeadAttention
from torch_ref.layers import make_norm
from whisper_config import ModelConfig

Cache = dict[str, dict]


class HybridAttention(nn.Module):
    """`local_attn` defaults to the band-masked `mha`; the integrated block passes dynamic convolution."""

    def __init__(
        self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, local_attn: nn.Module | None = None
    ):
        super().__init__()
        if local_attn is None:
            local_attn = MultiHeadAttention(n_state, n_head, config, rotary, window=config.window_size)
        self.local_attn = local_attn
        self.global_attn = MultiHeadAttention(n_state, n_head, config, rotary)
        self.ln_local = make_norm(config, n_state)
        self.ln_global = make_norm(config, n_state)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, *, causal: bool = False, cache: Cache | None = None, offset: int = 0, valid=None
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache."""
        local_cache = None if cache is None else cache["local_attn"]
        global_cache = None if cache is None else cache["global_attn"]
        y_local, local_cache = self.local_attn(self.ln_local(x), causal=causal, cache=local_cache, offset=offset)
        y_global, global_cache = self.global_attn(self.ln_global(x), causal=causal, cache=global_cache, offset=offset)
        if cache is not None:
            cache = {"local_attn": local_cache, "global_attn": global_cache}
        return self.dropout(y_local + y_global), cache

    def init_cache(self, batch: int, length: int, dtype, device) -> Cache:
        return {
            "local_attn": self.local_attn.init_cache(batch, length, dtype, device),
            "global_attn": self.global_attn.init_cache(batch, length, dtype, device),
        }

    def cache_capacity(self, cache: Cache) -> int | None:
        sizes = [
            self.local_attn.cache_capacity(cache["local_attn"]),
            self.global_attn.cache_capacity(cache["global_attn"]),
        ]
        return min((s for s in sizes if s is not None), default=None)
