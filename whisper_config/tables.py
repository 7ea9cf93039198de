"""Fixed tables both frameworks build from the same NumPy code, so they agree bit for bit."""

from __future__ import annotations

import numpy as np


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """OpenAI Whisper's position table `(length, channels)` float32: `[sin(t * inv), cos(t * inv)]`.

    Computed in float64 and rounded once: a float32 computation drifts by ~1e-4 at t ~ 1500,
    differently in each framework. (OpenAI checkpoints store their own float32 table, which the
    converter carries as is.)
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoids need an even number of channels >= 4, got {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))  # (C/2,)
    scaled = np.arange(length)[:, None] * inv[None, :]  # (L, C/2)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def rotary_inv_freq(head_width: int, base: float) -> np.ndarray:
    """`(head_width / 2,)` float32 RoPE frequencies `base ** (-2i / head_width)` (model contract section 3)."""
    if head_width % 2:
        raise ValueError(f"rotary needs an even head width, got {head_width}")
    return (float(base) ** (-np.arange(0, head_width, 2) / head_width)).astype(np.float32)
