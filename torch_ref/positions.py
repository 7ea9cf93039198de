"""Absolute position tables (SPEC section 3).

`sinusoids` is OpenAI Whisper's table. Tables are looked up at `offset + arange(T)`, where
`offset` counts the tokens already held in a KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whisper_config import InputError, tables


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """`(length, channels)` float32 OpenAI sinusoids (see `whisper_config.tables.sinusoids`)."""
    return torch.from_numpy(tables.sinusoids(length, channels, max_timescale))


def lookup_positions(table: Tensor, offset: int, length: int, what: str) -> Tensor:
    """Rows `offset .. offset + length` of `table (L, d)`, or a clear error past its end."""
    if offset + length > table.shape[0]:
        raise InputError(
            f"{what}: positions {offset}..{offset + length - 1} exceed the {table.shape[0]}-row position table"
        )
    return table[offset : offset + length]
