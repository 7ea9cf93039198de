"""Position information (model contract section 3), mirroring `torch_ref/positions.py`.

Absolute tables (`sinusoidal` buffer, `learned`, `learned_sinusoidal`, `none`) are looked up at
`offset + arange(T)`; `offset` may be traced (a jitted decoding loop), in which case the bound was
checked on the host before tracing or is enforced by the cache size. Rotary (RoPE) rotates each
interleaved pair of every query and key head by `position * base ** (-2i / dh)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper.layers import EMBEDDING_STD, Buffer, host_offset
from whisper_config import InputError, tables


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
    """`(length, channels)` float32 OpenAI sinusoids (see `whisper_config.tables.sinusoids`)."""
    return jnp.asarray(tables.sinusoids(length, channels, max_timescale))


AXES = (None, "embed")  # a position table's logical axes (see `layers`)


def position_table(kind: str, n_ctx: int, n_state: int, rngs: nnx.Rngs) -> nnx.Variable | None:
    """The `positional_embedding` `(n_ctx, d)` of the given kind (None for `none`)."""
    if kind == "sinusoidal":
        return Buffer(sinusoids(n_ctx, n_state), axes=AXES)
    if kind == "learned":
        init = jax.nn.initializers.normal(EMBEDDING_STD)
        return nnx.Param(init(rngs.params(), (n_ctx, n_state), jnp.float32), axes=AXES)
    if kind == "learned_sinusoidal":
        return nnx.Param(sinusoids(n_ctx, n_state), axes=AXES)
    if kind == "none":
        return None
    raise ValueError(f"unknown position table {kind!r}")


def lookup_positions(table: jax.Array, offset, length: int, what: str, normalize: bool = False) -> jax.Array:
    """Rows `offset .. offset + length` of `table (L, d)`, or a clear error past its end."""
    start = host_offset(offset)
    if start + length > table.shape[0]:
        raise InputError(
            f"{what}: positions {start}..{start + length - 1} exceed the {table.shape[0]}-row position table"
        )
    rows = jax.lax.dynamic_slice_in_dim(table, offset, length, axis=0)
    if normalize:  # as torch's F.normalize: x / max(||x||, 1e-12)
        rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return rows


def apply_rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate every head of `x (B, T, H, dh)` by its `positions (T,)`; computed in float32."""
    b, t, h, dh = x.shape
    inv_freq = jnp.asarray(tables.rotary_inv_freq(dh, base))  # (dh/2,)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, dh/2)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # (T, 1, dh/2)
    pairs = x.astype(jnp.float32).reshape(b, t, h, dh // 2, 2)  # (B, T, H, dh/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # (B, T, H, dh/2, 2)
    return rotated.reshape(b, t, h, dh).astype(x.dtype)
