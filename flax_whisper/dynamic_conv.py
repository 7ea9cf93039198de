"""Dynamic convolution (contract 4.4), mirroring `torch_ref/dynamic_conv.py`: each position predicts
its own convolution kernel `w = softmax_K(kernel_proj(x))` (B, T, H, K) over `v = value(x)`;
centred in the encoder, past-only in the decoder, with the last `K - 1` value rows as the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.layers import Linear
from whisper_config import ModelConfig

Cache = dict[str, jax.Array]


class DynamicConvAttention(nnx.Module):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False, *, rngs: nnx.Rngs):
        # No queries or keys: config validation rejects rotary with this mechanism.
        self.n_head = n_head
        self.kernel_size = config.conv_kernel_size
        self.value = Linear(n_state, n_state, axes=("embed", "heads"), rngs=rngs)
        self.kernel_proj = Linear(n_state, n_head * self.kernel_size, axes=("embed", None), rngs=rngs)
        self.out = Linear(n_state, n_state, axes=("heads", "embed"), rngs=rngs)
        self.attention_dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, causal: bool = False, cache: Cache | None = None, offset=0, valid=None
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache (causal only)."""
        b, t, d = x.shape
        h, k = self.n_head, self.kernel_size
        v = self.value(x)  # (B, T, d)
        logits = self.kernel_proj(x).astype(jnp.float32).reshape(b, t, h, k)
        w = self.attention_dropout(jax.nn.softmax(logits, axis=-1).astype(v.dtype))  # (B, T, H, K)
        if causal:
            past = jnp.zeros((b, k - 1, d), v.dtype) if cache is None else cache["v"]
            padded = jnp.concatenate([past.astype(v.dtype), v], axis=1)  # (B, K - 1 + T, d)
            if cache is not None:
                cache = {"v": padded[:, t:]}  # the last K - 1 rows
        else:
            padded = jnp.pad(v, ((0, 0), (k // 2, k - 1 - k // 2), (0, 0)))  # (B, T + K - 1, d)
        # y[t] = sum_j w[t, :, j] v[t + j - p], head by head: the K shifted views of the values,
        # weighted and summed in one pass that writes y alone (a stack of the K windows was K
        # copies of the values, and its backward K more), in float32 and rounded once, as a
        # product accumulates.
        heads = (b, t, h, d // h)
        y = sum(
            w[..., j, None].astype(jnp.float32) * padded[:, j : j + t].reshape(heads).astype(jnp.float32)
            for j in range(k)
        )
        return self.out(y.astype(v.dtype).reshape(b, t, d)), cache

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> Cache:
        """The values of the `K - 1` positions before the first token: zeros, (B, K - 1, d)."""
        return {"v": jnp.zeros((batch, self.kernel_size - 1, self.out.out_features), dtype)}

    def cache_capacity(self, cache: Cache) -> None:
        """A fixed window of past values: it never fills up."""
        return None
