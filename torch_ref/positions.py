"""Position information (model contract section 3): absolute tables and rotary embeddings.

Absolute tables, added to the input of the first block, are looked up at `offset + arange(T)`
where `offset` counts the tokens already in a KV cache:

- `sinusoidal`: OpenAI's fixed table, a persistent buffer (OpenAI's encoder);
- `learned`: a free parameter (OpenAI's decoder);
- `learned_sinusoidal`: a parameter initialised with the sinusoids, optionally L2-normalised per
  row at use (the seed's `LearnedSinusoidalEmbeddings`);
- `none`: no table (positions come from rotary, or not at all).

Rotary (RoPE, Su et al. 2021) rotates each interleaved pair `(x[2i], x[2i+1])` of every query and
key head by `position * base ** (-2i / dh)`, so `q . k` depends only on the distance between
positions. It has no parameters; the frequencies are computed from the config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref.layers import EMBEDDING_STD
from whisper_config import InputError, tables


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """`(length, channels)` float32 OpenAI sinusoids (see `whisper_config.tables.sinusoids`)."""
    return torch.from_numpy(tables.sinusoids(length, channels, max_timescale))


def register_position_table(module: nn.Module, kind: str, n_ctx: int, n_state: int) -> None:
    """Give `module` its `positional_embedding` `(n_ctx, d)` of the given kind (None for `none`)."""
    if kind == "sinusoidal":
        module.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
    elif kind == "learned":
        module.positional_embedding = nn.Parameter(torch.randn(n_ctx, n_state) * EMBEDDING_STD)
    elif kind == "learned_sinusoidal":
        module.positional_embedding = nn.Parameter(sinusoids(n_ctx, n_state))
    elif kind == "none":
        module.positional_embedding = None
    else:
        raise ValueError(f"unknown position table {kind!r}")


def lookup_positions(table: Tensor, offset: int, length: int, what: str, normalize: bool = False) -> Tensor:
    """Rows `offset .. offset + length` of `table (L, d)`, or a clear error past its end."""
    if offset + length > table.shape[0]:
        raise InputError(
            f"{what}: positions {offset}..{offset + length - 1} exceed the {table.shape[0]}-row position table"
        )
    rows = table[offset : offset + length]
    return F.normalize(rows, dim=-1) if normalize else rows


def apply_rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotate every head of `x (B, T, H, dh)` by its `positions (T,)`; computed in float32."""
    b, t, h, dh = x.shape
    inv_freq = torch.from_numpy(tables.rotary_inv_freq(dh, base)).to(x.device)  # (dh/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, dh/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # (T, 1, dh/2)
    pairs = x.float().reshape(b, t, h, dh // 2, 2)  # (B, T, H, dh/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, dh/2, 2)
    return rotated.reshape(b, t, h, dh).to(x.dtype)
