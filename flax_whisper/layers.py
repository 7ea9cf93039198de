"""Primitive layers of the Flax NNX model (model contract section 2), mirroring `torch_ref/layers.py`.

Layouts differ from torch where JAX convention does: Linear `kernel (in, out)` (torch `weight
(out, in)`), Conv1d NWC with `kernel (k, in, out)` (torch NCW `(out, in, k)`), LayerNorm `scale`
(torch `weight`), Embedding `embedding` (torch `weight`). Numeric defaults are set explicitly to
torch's: LayerNorm eps 1e-5, exact GELU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from whisper_config import ModelConfig

EMBEDDING_STD = 0.02


class Buffer(nnx.Variable):
    """Non-trainable state kept in checkpoints (torch: a persistent buffer). Optimisers skip it."""


def is_traced(x) -> bool:
    """True inside `jit`/`grad` tracing, where values (not shapes) are unknown and cannot be checked."""
    return isinstance(x, jax.core.Tracer)


def host_offset(offset) -> int:
    """A cache offset as a Python int, or 0 while traced: bound checks then use lengths alone, and
    the fixed cache size enforces the rest."""
    return 0 if is_traced(offset) else int(offset)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel `(in, out)`; Xavier-uniform kernel, zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rngs: nnx.Rngs):
        self.out_features = out_features
        init = jax.nn.initializers.xavier_uniform()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Conv1d(nnx.Module):
    """NWC convolution, kernel `(k, in, out)`; Kaiming-uniform (ReLU gain) kernel, zero bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.padding = padding
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, W, in) -> (B, W', out)"""
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with eps 1e-5 and float32 statistics; the result has the input's dtype."""

    def __init__(self, n_state: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n_state,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale`, eps 1e-6, float32 statistics."""

    def __init__(self, n_state: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(x.dtype)


class GroupRMSNorm(nnx.Module):
    """The seeds' "GroupNorm (RMS)", per position: RMS-normalise each of `groups` channel groups,
    then `* scale + bias` per channel. Never across time."""

    def __init__(self, n_state: int, groups: int, eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((n_state,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d)"""
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, -1)  # (..., G, d/G)
        y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Embedding(nnx.Module):
    """Token table `(n_vocab, d)`, normal(0, 0.02) init (std 1 would make tied logits huge)."""

    def __init__(self, n_vocab: int, n_state: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(EMBEDDING_STD)
        self.embedding = nnx.Param(init(rngs.params(), (n_vocab, n_state), jnp.float32))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, T) int -> (B, T, d)"""
        return jnp.take(self.embedding[...], tokens, axis=0)


class MLP(nnx.Module):
    """`fc1 (d -> 4d) -> [norm (4d) if mlp_norm] -> GELU (exact) -> Dropout -> fc2 (4d -> d)`."""

    def __init__(self, n_state: int, n_mlp: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = Linear(n_state, n_mlp, rngs=rngs)
        self.norm = make_norm(config, n_mlp) if config.mlp_norm else None
        self.fc2 = Linear(n_mlp, n_state, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, d) -> (B, T, d)"""
        h = self.fc1(x)  # (B, T, 4d)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(self.dropout(gelu(h)))


NORMS = {
    "layernorm": lambda n_state, config: LayerNorm(n_state),
    "rmsnorm": lambda n_state, config: RMSNorm(n_state),
    "group_rms": lambda n_state, config: GroupRMSNorm(n_state, config.norm_groups),
}


def make_norm(config: ModelConfig, n_state: int) -> nnx.Module:
    """The norm every sub-layer of the model uses (`config.norm`)."""
    return NORMS[config.norm](n_state, config)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch; `jax.nn.gelu` defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)
