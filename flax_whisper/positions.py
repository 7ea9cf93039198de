"""Absolute position tables (SPEC section 3), mirroring `torch_ref/positions.py`.

Tables are looked up at `offset + arange(T)`; `offset` may be traced (a jitted decoding loop), in
which case the bound was checked on the host before tracing or is enforced by the cache size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_whisper.layers import is_traced
from whisper_config import InputError, tables


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
    """`(length, channels)` float32 OpenAI sinusoids (see `whisper_config.tables.sinusoids`)."""
    return jnp.asarray(tables.sinusoids(length, channels, max_timescale))


def lookup_positions(table: jax.Array, offset, length: int, what: str) -> jax.Array:
    """Rows `offset .. offset + length` of `table (L, d)`, or a clear error past its end."""
    last = length if is_traced(offset) else int(offset) + length
    if last > table.shape[0]:
        start = 0 if is_traced(offset) else int(offset)
        raise InputError(
            f"{what}: positions {start}..{start + length - 1} exceed the {table.shape[0]}-row position table"
        )
    return jax.lax.dynamic_slice_in_dim(table, offset, length, axis=0)
