"""Input validation shared by both frameworks, on shapes and plain numbers only.

The models call these before touching a tensor, so a wrong input fails with a message that names
the problem instead of a shape error deep inside a convolution or an out-of-range gather.
"""

from __future__ import annotations

from collections.abc import Sequence

from whisper_config.config import ModelConfig


class InputError(ValueError):
    """A model input does not fit the model's configuration."""


def audio_frames_to_ctx(frames: int) -> int:
    """Encoder length after conv2 (kernel 3, stride 2, padding 1): ceil(frames / 2)."""
    return (frames - 1) // 2 + 1


def check_mel_shape(config: ModelConfig, shape: Sequence[int]) -> int:
    """Check a log-mel batch `(B, n_mels, frames)`; return the encoder length `T`."""
    if len(shape) != 3:
        raise InputError(f"mel must have shape (batch, n_mels={config.n_mels}, frames), got {tuple(shape)}")
    batch, n_mels, frames = shape
    if batch < 1:
        raise InputError(f"mel holds no examples (shape {tuple(shape)})")
    if n_mels != config.n_mels:
        raise InputError(
            f"mel has {n_mels} mel bins but the model expects n_mels={config.n_mels} "
            f"(shape {tuple(shape)} should be (batch, {config.n_mels}, frames))"
        )
    if frames < 1:
        raise InputError("mel has no frames")
    ctx = audio_frames_to_ctx(frames)
    if ctx > config.n_audio_ctx:
        raise InputError(
            f"audio too long: {frames} mel frames give {ctx} encoder positions, "
            f"more than n_audio_ctx={config.n_audio_ctx} (at most {2 * config.n_audio_ctx} frames)"
        )
    return ctx


def check_tokens_shape(config: ModelConfig, shape: Sequence[int], offset: int = 0) -> int:
    """Check a token batch `(B, T)` decoded after `offset` cached tokens; return `T`."""
    if len(shape) != 2:
        raise InputError(f"tokens must have shape (batch, length), got {tuple(shape)}")
    batch, length = shape
    if batch < 1:
        raise InputError(f"tokens hold no examples (shape {tuple(shape)})")
    if length < 1:
        raise InputError("tokens are empty")
    if offset + length > config.n_text_ctx:
        where = f" after {offset} cached tokens" if offset else ""
        raise InputError(f"too many tokens: {length}{where} exceed n_text_ctx={config.n_text_ctx}")
    return length


def check_dtype(what: str, dtype, ok: bool, expected: str) -> None:
    """`ok` says whether `dtype` is of the `expected` kind; shapes and dtypes are static, so this
    check costs nothing under `jit` or `torch.compile`."""
    if not ok:
        raise InputError(f"{what} must be {expected}, got dtype {dtype}")


def check_same_batch(what: str, batch: int, other: str, other_batch: int) -> None:
    if batch != other_batch:
        raise InputError(f"{what} hold {batch} examples but {other} {other_batch}: batch sizes must match")


def check_token_range(config: ModelConfig, lowest: int, highest: int) -> None:
    """Check that token ids lie in `[0, n_vocab)`."""
    if lowest < 0 or highest >= config.n_vocab:
        bad = lowest if lowest < 0 else highest
        raise InputError(f"token id {bad} is outside the vocabulary [0, {config.n_vocab})")


def check_cache_offset(config: ModelConfig, offset: int, length: int, capacity: int) -> None:
    """Check that `length` new tokens fit in a KV cache of `capacity` after `offset` tokens."""
    if offset + length > capacity:
        raise InputError(f"KV cache full: {offset} cached + {length} new tokens exceed its {capacity} slots")
