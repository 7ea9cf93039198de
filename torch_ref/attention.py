"""Multi-head attention with an explicit KV cache (SPEC sections 4.1, 4.2 and 4.5).

OpenAI Whisper's attention: `query` (bias), `key` (no bias), `value` (bias), `out` (bias). Options
used by the other mechanisms: a band `window` (hybrid's local branch), a learned `temperature`
(one scalar, init `dh ** -0.5`), and a per-head `content_bias` (`BiasedAttention` sets it).

The cache is a plain dict passed in and returned, never module state:

- self-attention: `{"k": (B, L, d), "v": (B, L, d)}`, buffers of fixed capacity `L` written at
  `offset`; the causal mask hides every slot after the current position, unwritten ones included.
- cross-attention: `{"k": (B, S, d), "v": (B, S, d)}`, projected once from the encoder output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref.layers import Linear
from torch_ref.positions import apply_rotary
from whisper_config import ModelConfig

Cache = dict[str, Tensor]


def position_mask(
    offset: int, length: int, n_keys: int, causal: bool, window: int | None, device: torch.device
) -> Tensor | None:
    """`(T, S)` bool or None: may the query at `offset + i` see key `j`?

    causal: `j <= offset + i`; window: `|offset + i - j| <= window` (both: the past band).
    """
    if not causal and window is None:
        return None
    q_pos = offset + torch.arange(length, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos if causal else torch.ones(length, n_keys, dtype=torch.bool, device=device)
    if window is not None:
        mask = mask & ((q_pos - k_pos).abs() <= window)
    return mask


def attention_weights(
    q: Tensor, k: Tensor, n_head: int, scale: float | Tensor, mask: Tensor | None, content_bias: Tensor | None = None
) -> Tensor:
    """Softmax attention weights, float32.

    q (B, T, d), k (B, S, d), mask broadcastable to (B, H, T, S), content_bias (H, dh) added to
    every query -> (B, H, T, S)
    """
    b, t, d = q.shape
    q = q.view(b, t, n_head, d // n_head)  # (B, T, H, dh)
    if content_bias is not None:
        q = q + content_bias.to(q.dtype)
    k = k.view(b, k.shape[1], n_head, d // n_head)  # (B, S, H, dh)
    logits = torch.einsum("bthd,bshd->bhts", q, k).float() * scale  # (B, H, T, S)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return F.softmax(logits, dim=-1)


def mix_values(weights: Tensor, v: Tensor, dropout: nn.Dropout) -> Tensor:
    """weights (B, H, T, S), v (B, S, d) -> (B, T, d); dropout on the weights."""
    b, h, t, s = weights.shape
    v = v.view(b, s, h, -1)  # (B, S, H, dh)
    return torch.einsum("bhts,bshd->bthd", dropout(weights.to(v.dtype)), v).reshape(b, t, -1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_head: int,
    scale: float | Tensor,
    mask: Tensor | None,
    dropout: nn.Dropout,
    content_bias: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention over heads; softmax in float32. q (B, T, d), k, v (B, S, d) -> (B, T, d)"""
    return mix_values(attention_weights(q, k, n_head, scale, mask, content_bias), v, dropout)


class MultiHeadAttention(nn.Module):
    """OpenAI Whisper's multi-head attention, for self-attention and cross-attention.

    With `rotary`, queries and keys of self-attention are rotated by their positions (SPEC 3);
    cross-attention never is (text and audio positions are unrelated).
    """

    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, window: int | None = None):
        super().__init__()
        self.n_head = n_head
        self.rotary_base = config.rotary_base if rotary else None
        self.window = window
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
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache.

        With `xa`, attends to the encoder output (cross-attention), using the cache's projected
        keys and values when given. Without, self-attention; a cache holds `offset` earlier tokens.
        """
        if xa is not None:
            q = self.query(x)
            if cache is None:
                k, v = self.key(xa), self.value(xa)
            else:
                k, v = cache["k"], cache["v"]
            mask = None
        else:
            q, k, v, cache = self.project_self(x, cache, offset)
            mask = position_mask(offset, x.shape[1], k.shape[1], causal, self.window, x.device)
        y = attend(q, k, v, self.n_head, self.attention_scale(), mask, self.attention_dropout, self.content_bias)
        return self.out(y), cache

    def attention_scale(self) -> float | Tensor:
        return self.scale if self.temperature is None else self.temperature

    def project_self(self, x: Tensor, cache: Cache | None, offset: int) -> tuple[Tensor, Tensor, Tensor, Cache | None]:
        """Self-attention q (B, T, d) and k, v (B, S, d): rotated by position when rotary, and
        written into the cache (then S is its capacity) when given."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rotary_base is not None:
            # New tokens sit at offset .. offset + T; cached keys were rotated when written.
            positions = offset + torch.arange(x.shape[1], device=x.device)
            q = apply_rotary(q, positions, self.n_head, self.rotary_base)
            k = apply_rotary(k, positions, self.n_head, self.rotary_base)
        if cache is not None:
            # Write the new rows at offset .. offset + T of the fixed-size buffers.
            index = torch.arange(offset, offset + x.shape[1], device=x.device)
            k = cache["k"].index_copy(1, index, k.to(cache["k"].dtype))
            v = cache["v"].index_copy(1, index, v.to(cache["v"].dtype))
            cache = {"k": k, "v": v}
        return q, k, v, cache

    def init_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Cache:
        """Empty self-attention buffers of capacity `length`: {"k", "v"} (B, L, d)."""
        shape = (batch, length, self.out.out_features)
        return {
            "k": torch.zeros(shape, dtype=dtype, device=device),
            "v": torch.zeros(shape, dtype=dtype, device=device),
        }

    def init_cross_cache(self, xa: Tensor) -> Cache:
        """Cross-attention keys and values of the encoder output: {"k", "v"} (B, S, d)."""
        return {"k": self.key(xa), "v": self.value(xa)}
