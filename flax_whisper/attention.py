"""Multi-head attention with an explicit KV cache (model contract sections 4.1, 4.2 and 4.5), mirroring
`torch_ref/attention.py`.

What a module attends to is a `kernel.Mask` (causal, a band `window`); how is `kernel.attend`.
Options used by the other mechanisms: a band `window` (hybrid's local branch), a learned
`temperature` (one scalar, init `dh ** -0.5`), and a per-head `content_bias` (`BiasedAttention`
sets it). Heads are an axis of their own from projection to output, and so are the caches, so
a decoding step writes one row and reshapes nothing. The cache is a plain dict pytree passed in
and returned, so a jitted decoding loop can carry it:

- self-attention: `{"k", "v"}` buffers of fixed capacity `L` in `kernel.cache_layout()`,
  heads-major `(B, H, L, dh)` (on a GPU each head's values transposed, `(B, H, dh, L)`), written
  at `offset` (which may be traced); the causal mask hides every slot after the current position;
- cross-attention: `{"k", "v"}` over the `S` encoder positions, projected once, in
  `kernel.cross_kv_layout()` (on a CPU each head's keys are stored transposed, `(B, H, dh, S)`;
  on a GPU its values, as the self-attention caches').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.kernel import (
    BHDV,
    BHSD,
    Mask,
    attend,
    cache_layout,
    cross_kv_layout,
    drops_weights,
    kv_layout,
    scores,
    seq_axis,
    to_layout,
)
from flax_whisper.layers import Linear, add_bias
from flax_whisper.positions import apply_rotary
from whisper_config import ModelConfig

Cache = dict[str, jax.Array]


def split_heads(x: jax.Array, n_head: int) -> jax.Array:
    """(B, T, d) -> (B, T, H, dh)"""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head)


def smallest(*capacities: int | None) -> int | None:
    """The smallest cache capacity of a module's branches (None: a branch that never fills up)."""
    return min((c for c in capacities if c is not None), default=None)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, T, H, dh) -> (B, T, d)"""
    b, t, h, dh = x.shape
    return x.reshape(b, t, h * dh)


def self_layout(cache: Cache | None) -> str:
    """The layout of self-attention's keys and values: a cache's (`cache_layout()`) when decoding
    with one, else `kv_layout()`."""
    return kv_layout() if cache is None else cache_layout()


def value_or_none(param: nnx.Variable | None) -> jax.Array | None:
    return None if param is None else param[...]


class MultiHeadAttention(nnx.Module):
    """OpenAI Whisper's multi-head attention, for self-attention and cross-attention.

    With `rotary`, queries and keys of self-attention are rotated by their positions (contract 3);
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
        self.implementation = config.attention_implementation
        self.query = Linear(n_state, n_state, axes=("embed", "heads"), rngs=rngs)
        self.key = Linear(n_state, n_state, bias=False, axes=("embed", "heads"), rngs=rngs)
        self.value = Linear(n_state, n_state, axes=("embed", "heads"), rngs=rngs)
        self.out = Linear(n_state, n_state, axes=("heads", "embed"), rngs=rngs)
        self.attention_dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)
        self.scale = (n_state // n_head) ** -0.5
        temperature = nnx.Param(jnp.asarray(self.scale, jnp.float32), axes=())
        self.temperature = temperature if config.learned_temperature else None
        self.content_bias = nnx.data(None)  # a Param in BiasedAttention

    def __call__(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: Cache | None = None,
        offset=0,
        valid=None,
    ) -> tuple[jax.Array, Cache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache. (`valid`, the real
        positions, is read by the memory write-back only; every mechanism takes it.)

        With `xa`, attends to the encoder output (cross-attention), using the cache's projected
        keys and values when given. Without, self-attention; a cache holds `offset` earlier tokens.
        """
        fold = self.folds_value_bias(cache)
        if xa is not None:
            q = self.queries(x)
            if cache is not None:
                y = self.attend(q, cache["k"], cache["v"], Mask(), layout=cross_kv_layout())
            else:
                y = self.attend(q, *self.keys_values(xa, value_bias=not fold), Mask())
        else:
            q, k, v, cache = self.project_self(x, cache, offset, value_bias=not fold)
            mask = Mask(causal=causal, window=self.window)
            y = self.attend(q, k, v, mask, offset=offset, layout=self_layout(cache))
        return self.output(y, value_bias_folded=fold), cache

    def folds_value_bias(self, cache: Cache | None) -> bool:
        """Whether a call adds the value projection's bias after attention rather than to every
        value: off a CPU, without a cache (training, the encoder) and without dropout on the weights.

        Each query's weights sum to one, so the mix of the values `v + b_v` is the mix of `v` plus
        `b_v`, and through the output projection `b_v W_o`: one bias `b_o + b_v W_o` for the
        output instead of an addition over every key's value (and, in the backward pass, a column
        sum of the values' cotangent). XLA's GPU GEMMs take a bias into their epilogue only when
        it is a parameter of the program, never a layer's slice of a stack, so those were kernels
        of their own: 1,972 -> 1,918 kernels and 65.1 -> 63.4 GB written for a `small` training
        step at batch 32 in XLA's program for an H200. A decoding cache keeps its values as they
        were, so cached calls never fold."""
        return (
            cache is None
            and self.value.bias is not None
            and not self.out.transposed
            and not drops_weights(self.attention_dropout)
            and jax.default_backend() != "cpu"
        )

    def output(self, y: jax.Array, value_bias_folded: bool = False) -> jax.Array:
        """y (B, T, H, dh), attention's output as `attend` leaves it -> the output projection of
        the merged heads (B, T, d); with `value_bias_folded` (values made without their bias,
        `folds_value_bias`) its bias is `b_o + b_v W_o`, computed in full float32.

        Off a CPU the product contracts the heads where they lie (`Linear.product_of_heads`): the
        array it keeps for its backward pass is then `y` itself, which cuDNN's attention keeps as
        well. A product of the merged heads keeps a reshape of `y`, and a scanned layer stack
        saved both: one more `(L, B, T, d)` stack filled with zeros, copied into and copied out
        (the `small` training step at batch 32 under the layer scan, XLA's program for an H200:
        3,961 -> 3,890 kernels, 130.3 -> 126.1 GB written; unrolled, the same program). On a CPU
        the merged heads' product is the one `matmul` runs fastest."""
        on_cpu = jax.default_backend() == "cpu"
        product = self.out.product(merge_heads(y)) if on_cpu else self.out.product_of_heads(y)
        bias = self.out.bias[...]
        if value_bias_folded:
            bias = bias + jnp.matmul(self.value.bias[...], self.out.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return add_bias(product, bias)

    def cross_scores(self, x: jax.Array, xa: jax.Array) -> jax.Array:
        """x (B, T, d), xa (B, S, d) -> cross-attention's scaled float32 scores (B, H, T, S) before
        the softmax: what word alignment reads (OpenAI's `qk`)."""
        return scores(self.queries(x), self.keys_values(xa)[0], self.attention_scale(), kv_layout())

    def attention_scale(self) -> float | jax.Array:
        return self.scale if self.temperature is None else self.temperature[...]

    def attend(self, q, k, v, mask: Mask, offset=0, return_lse: bool = False, layout: str | None = None):
        """`kernel.attend` with this module's scale, dropout and implementation; k and v in
        `layout`, by default `kv_layout()`."""
        return attend(
            q,
            k,
            v,
            mask,
            scale=self.attention_scale(),
            offset=offset,
            layout=layout or kv_layout(),
            implementation=self.implementation,
            dropout=self.attention_dropout,
            return_lse=return_lse,
        )

    def queries(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """x (B, T, d) -> q (B, T, H, dh): rotated at `positions` (self-attention with rotary),
        then shifted by the content bias (biased attention: `u` is added after rotary)."""
        q = split_heads(self.query(x), self.n_head)
        if positions is not None and self.rotary_base is not None:
            q = apply_rotary(q, positions, self.rotary_base)
        if self.content_bias is not None:
            q = add_bias(q, self.content_bias[...])
        return q

    def keys_values(
        self,
        x: jax.Array,
        positions: jax.Array | None = None,
        layout: str | None = None,
        value_bias: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """x (B, S, d) -> k, v in `layout` (by default `kv_layout()`): keys rotated at `positions`
        (self-attention with rotary); unrotated without (cross-attention, memory slots). Without
        `value_bias`, the values leave out their bias (`folds_value_bias`)."""
        values = self.value(x) if value_bias else self.value.product(x)
        k, v = split_heads(self.key(x), self.n_head), split_heads(values, self.n_head)  # (B, S, H, dh)
        if positions is not None and self.rotary_base is not None:
            k = apply_rotary(k, positions, self.rotary_base)
        layout = layout or kv_layout()
        return to_layout(k, layout, keys=True), to_layout(v, layout)

    def project_self(self, x: jax.Array, cache: Cache | None, offset, prefix: int = 0, value_bias: bool = True):
        """Self-attention q (B, T, H, dh) and k, v in `self_layout(cache)` (S keys): rotated by
        position when rotary, and written into the cache (then S is its capacity) at `prefix +
        offset` when given (cached keys were rotated when written); `value_bias` as `keys_values`."""
        positions = offset + jnp.arange(x.shape[1])  # new tokens sit at offset .. offset + T
        layout = self_layout(cache)
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions, layout, value_bias)
        if cache is not None:
            start, axes = prefix + offset, (k.ndim + seq_axis(layout), v.ndim + seq_axis(layout, values=True))
            k, v = (
                jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), start, axis)
                for name, new, axis in (("k", k, axes[0]), ("v", v, axes[1]))
            )
            cache = {"k": k, "v": v}
        return q, k, v, cache

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> Cache:
        """Empty self-attention buffers of capacity `length`: {"k", "v"} in `cache_layout()`."""
        heads, width = self.n_head, self.out.out_features // self.n_head
        layout = cache_layout()
        keys = (batch, heads, length, width) if layout in (BHSD, BHDV) else (batch, length, heads, width)
        values = (batch, heads, width, length) if layout == BHDV else keys
        return {"k": jnp.zeros(keys, dtype), "v": jnp.zeros(values, dtype)}

    def cache_capacity(self, cache: Cache) -> int | None:
        """Tokens the self-attention cache holds (the key buffers may carry a leading layer axis)."""
        return cache["k"].shape[seq_axis(cache_layout())]

    def init_cross_cache(self, xa: jax.Array) -> Cache:
        """Cross-attention keys and values of the encoder output: {"k", "v"} in `cross_kv_layout()`."""
        k, v = self.keys_values(xa, layout=cross_kv_layout())
        return {"k": k, "v": v}
