"""Multi-head attention with an explicit KV cache (SPEC sections 4.1, 4.2 and 4.5), mirroring
`torch_ref/attention.py`.

Options used by the other mechanisms: a band `window` (hybrid's local branch), a learned
`temperature` (one scalar, init `dh ** -0.5`), and a per-head `content_bias` (`BiasedAttention`
sets it). The cache is a plain dict pytree passed in and returned, so a jitted decoding loop can
carry it:

- self-attention: `{"k": (B, L, d), "v": (B, L, d)}`, buffers of fixed capacity `L` written at
  `offset` (which may be traced); the causal mask hides every slot after the current position.
- cross-attention: `{"k": (B, S, d), "v": (B, S, d)}`, projected once from the encoder output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.layers import Linear
from flax_whisper.positions import apply_rotary
from whisper_config import ModelConfig

Cache = dict[str, jax.Array]


def position_mask(offset, length: int, n_keys: int, causal: bool, window: int | None) -> jax.Array | None:
    """`(T, S)` bool or None: may the query at `offset + i` see key `j`?

    causal: `j <= offset + i`; window: `|offset + i - j| <= window` (both: the past band).
    """
    if not causal and window is None:
        return None
    q_pos = offset + jnp.arange(length)[:, None]  # (T, 1)
    k_pos = jnp.arange(n_keys)[None, :]  # (1, S)
    mask = k_pos <= q_pos if causal else jnp.ones((length, n_keys), bool)
    if window is not None:
        mask = mask & (jnp.abs(q_pos - k_pos) <= window)
    return mask


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    n_head: int,
    scale: float | jax.Array,
    mask: jax.Array | None,
    content_bias: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention weights, float32.

    q (B, T, d), k (B, S, d), mask broadcastable to (B, H, T, S), content_bias (H, dh) added to
    every query -> (B, H, T, S)
    """
    b, t, d = q.shape
    q = q.reshape(b, t, n_head, d // n_head)  # (B, T, H, dh)
    if content_bias is not None:
        q = q + content_bias.astype(q.dtype)
    k = k.reshape(b, k.shape[1], n_head, d // n_head)  # (B, S, H, dh)
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale  # (B, H, T, S)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def mix_values(weights: jax.Array, v: jax.Array, dropout: nnx.Dropout) -> jax.Array:
    """weights (B, H, T, S), v (B, S, d) -> (B, T, d); dropout on the weights."""
    b, h, t, s = weights.shape
    v = v.reshape(b, s, h, -1)  # (B, S, H, dh)
    return jnp.einsum("bhts,bshd->bthd", dropout(weights.astype(v.dtype)), v).reshape(b, t, -1)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    n_head: int,
    scale: float | jax.Array,
    mask: jax.Array | None,
    dropout: nnx.Dropout,
    content_bias: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention over heads; softmax in float32. q (B, T, d), k, v (B, S, d) -> (B, T, d)"""
    return mix_values(attention_weights(q, k, n_head, scale, mask, content_bias), v, dropout)


def value_or_none(param: nnx.Variable | None) -> jax.Array | None:
    return None if param is None else param[...]


class MultiHeadAttention(nnx.Module):
    """OpenAI Whisper's multi-head attention, for self-attention and cross-attention.

    With `rotary`, queries and keys of self-attention are rotated by their positions (SPEC 3);
    cross-attention never is (text and audio positions are unrelated).
    """

    def __init__(
        self,
        n_state: int,
        n_head: int,
        config: ModelConfig,
        rotary: bool = False,
        window: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        self.n_head = n_head
        self.rotary_base = config.rotary_base if rotary else None
        self.window = window
        self.query = Linear(n_state, n_state, rngs=rngs)
        self.key = Linear(n_state, n_state, bias=False, rngs=rngs)
        self.value = Linear(n_state, n_state, rngs=rngs)
        self.out = Linear(n_state, n_state, rngs=rngs)
        self.attention_dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)
        self.scale = (n_state // n_head) ** -0.5
        self.temperature = nnx.Param(jnp.asarray(self.scale, jnp.float32)) if config.learned_temperature else None
        self.content_bias = nnx.data(None)  # a Param in BiasedAttention

    def __call__(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: Cache | None = None,
        offset=0,
    ) -> tuple[jax.Array, Cache | None]:
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
            mask = position_mask(offset, x.shape[1], k.shape[1], causal, self.window)
        bias = value_or_none(self.content_bias)
        y = attend(q, k, v, self.n_head, self.attention_scale(), mask, self.attention_dropout, bias)
        return self.out(y), cache

    def attention_scale(self) -> float | jax.Array:
        return self.scale if self.temperature is None else self.temperature[...]

    def project_self(self, x: jax.Array, cache: Cache | None, offset):
        """Self-attention q (B, T, d) and k, v (B, S, d): rotated by position when rotary, and
        written into the cache (then S is its capacity) when given."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rotary_base is not None:
            # New tokens sit at offset .. offset + T; cached keys were rotated when written.
            positions = offset + jnp.arange(x.shape[1])
            q = apply_rotary(q, positions, self.n_head, self.rotary_base)
            k = apply_rotary(k, positions, self.n_head, self.rotary_base)
        if cache is not None:
            # Write the new rows at offset .. offset + T of the fixed-size buffers.
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), offset, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), offset, axis=1)
            cache = {"k": k, "v": v}
        return q, k, v, cache

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> Cache:
        """Empty self-attention buffers of capacity `length`: {"k", "v"} (B, L, d)."""
        shape = (batch, length, self.out.out_features)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def init_cross_cache(self, xa: jax.Array) -> Cache:
        """Cross-attention keys and values of the encoder output: {"k", "v"} (B, S, d)."""
        return {"k": self.key(xa), "v": self.value(xa)}
