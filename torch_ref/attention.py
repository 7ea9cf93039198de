"""Multi-head attention with an explicit KV cache (model contract sections 4.1, 4.2 and 4.5).

OpenAI Whisper's attention: `query` (bias), `key` (no bias), `value` (bias), `out` (bias). What a
module attends to is a `kernel.Mask` (causal, a band `window`); how is `kernel.attend`. Options
used by the other mechanisms: a band `window` (hybrid's local branch), a learned `temperature`
(one scalar, init `dh ** -0.5`), and a per-head `content_bias` (`BiasedAttention` sets it).
Heads are an axis of their own from projection to output, and so are the caches.

The cache is a plain dict passed in and returned, never module state:

- self-attention: `{"k": (B, L, H, dh), "v": (B, L, H, dh)}`, buffers of fixed capacity `L`
  written at `offset`; the causal mask hides every slot after the current position;
- cross-attention: `{"k": (B, S, H, dh), "v": (B, S, H, dh)}`, projected once from the encoder output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_ref.kernel import Mask, attend, scores
from torch_ref.layers import Linear
from torch_ref.positions import apply_rotary
from whisper_config import ModelConfig

Cache = dict[str, Tensor]


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, d) -> (B, T, H, dh)"""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head)


def smallest(*capacities: int | None) -> int | None:
    """The smallest cache capacity of a module's branches (None: a branch that never fills up)."""
    return min((c for c in capacities if c is not None), default=None)


def merge_heads(x: Tensor) -> Tensor:
    """(B, T, H, dh) -> (B, T, d)"""
    b, t, h, dh = x.shape
    return x.reshape(b, t, h * dh)


class MultiHeadAttention(nn.Module):
    """OpenAI Whisper's multi-head attention, for self-attention and cross-attention.

    With `rotary`, queries and keys of self-attention are rotated by their positions (contract 3);
    cross-attention never is (text and audio positions are unrelated).
    """

    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, window: int | None = None):
        super().__init__()
        self.n_head = n_head
        self.rotary_base = config.rotary_base if rotary else None
        self.window = window
        self.implementation = config.attention_implementation
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.scale = (n_state // n_head) ** -0.5
        temperature = nn.Parameter(torch.tensor(self.scale)) if config.learned_temperature else None
        self.register_parameter("temperature", temperature)
        self.register_parameter("content_bias", None)

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        *,
        causal: bool = False,
        cache: Cache | None = None,
        offset: int = 0,
        valid=None,
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache. (`valid`, the real
        positions, is read by the memory write-back only; every mechanism takes it.)

        With `xa`, attends to the encoder output (cross-attention), using the cache's projected
        keys and values when given. Without, self-attention; a cache holds `offset` earlier tokens.
        """
        if xa is not None:
            q = self.queries(x)
            k, v = (cache["k"], cache["v"]) if cache is not None else self.keys_values(xa)
            y = self.attend(q, k, v, Mask())
        else:
            q, k, v, cache = self.project_self(x, cache, offset)
            y = self.attend(q, k, v, Mask(causal=causal, window=self.window), offset=offset)
        return self.out(merge_heads(y)), cache

    def cross_scores(self, x: Tensor, xa: Tensor) -> Tensor:
        """x (B, T, d), xa (B, S, d) -> cross-attention's scaled float32 scores (B, H, T, S) before
        the softmax: what word alignment reads (OpenAI's `qk`)."""
        return scores(self.queries(x), self.keys_values(xa)[0], self.attention_scale())

    def attention_scale(self) -> float | Tensor:
        return self.scale if self.temperature is None else self.temperature

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, offset: int = 0, return_lse: bool = False):
        """`kernel.attend` with this module's scale, dropout and implementation."""
        return attend(
            q,
            k,
            v,
            mask,
            scale=self.attention_scale(),
            offset=offset,
            implementation=self.implementation,
            dropout=self.attention_dropout,
            return_lse=return_lse,
        )

    def queries(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x (B, T, d) -> q (B, T, H, dh): rotated at `positions` (self-attention with rotary),
        then shifted by the content bias (biased attention: `u` is added after rotary)."""
        q = split_heads(self.query(x), self.n_head)
        if positions is not None and self.rotary_base is not None:
            q = apply_rotary(q, positions, self.rotary_base)
        if self.content_bias is not None:
            q = q + self.content_bias.to(q.dtype)
        return q

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, d) -> k, v (B, S, H, dh), unrotated (cross-attention, memory slots)."""
        return split_heads(self.key(x), self.n_head), split_heads(self.value(x), self.n_head)

    def project_self(self, x: Tensor, cache: Cache | None, offset: int, prefix: int = 0):
        """Self-attention q (B, T, H, dh) and k, v (B, S, H, dh): rotated by position when
        rotary, and written into the cache (then S is its capacity) at `prefix + offset` when given."""
        positions = offset + torch.arange(x.shape[1], device=x.device)  # new tokens sit at offset .. offset + T
        q = self.queries(x, positions)
        k, v = self.keys_values(x)
        if self.rotary_base is not None:  # cached keys were rotated when written
            k = apply_rotary(k, positions, self.rotary_base)
        if cache is not None:
            index = prefix + positions
            k = cache["k"].index_copy(1, index, k.to(cache["k"].dtype))
            v = cache["v"].index_copy(1, index, v.to(cache["v"].dtype))
            cache = {"k": k, "v": v}
        return q, k, v, cache

    def init_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Cache:
        """Empty self-attention buffers of capacity `length`: {"k", "v"} (B, L, H, dh)."""
        shape = (batch, length, self.n_head, self.out.out_features // self.n_head)
        return {
            "k": torch.zeros(shape, dtype=dtype, device=device),
            "v": torch.zeros(shape, dtype=dtype, device=device),
        }

    def cache_capacity(self, cache: Cache) -> int | None:
        """Tokens the self-attention cache holds."""
        return cache["k"].shape[-3]

    def init_cross_cache(self, xa: Tensor) -> Cache:
        """Cross-attention keys and values of the encoder output: {"k", "v"} (B, S, H, dh)."""
        k, v = self.keys_values(xa)
        return {"k": k, "v": v}
