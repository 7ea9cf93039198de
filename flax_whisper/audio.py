"""Whisper-compatible log-mel frontend in NumPy/JAX (no torch on this path).

Matches OpenAI Whisper's `whisper.audio.log_mel_spectrogram`: 16 kHz audio, `n_fft` 400
(25 ms) with a periodic Hann window, hop 160 (10 ms), centred frames with reflect padding, the
last frame dropped, power spectrum through Slaney-scale mel filters (80 or 128 bins, computed
here from the formula librosa uses, so no asset or librosa is needed), `log10` clamped at 1e-10,
floored 8 decades below the maximum, then `(x + 4) / 4`. The spectrogram is jittable; the
maximum is taken per utterance (Whisper itself processes one utterance at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

# The framing is defined framework-free in whisper_io and kept importable from here, as
# openai-whisper's `whisper.audio` has it.
from whisper_io.audio_files import CHUNK_LENGTH, FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE

__all__ = [
    "CHUNK_LENGTH",
    "FRAMES_PER_SECOND",
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLE_RATE",
    "LogMelWindows",
    "log_mel_spectrogram",
    "mel_filters",
    "pad_or_trim",
]

N_FFT = 400


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    linear = mel * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """`(n_mels, n_fft // 2 + 1)` float32 triangular Slaney filters with Slaney (area) norm."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_freqs)  # (n_mels + 1,)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freqs)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0) -> jax.Array:
    """audio (..., N) float 16 kHz samples -> (..., n_mels, (N + padding) // 160) log-mel.

    `padding` zero samples are appended first (Whisper pads 30 s before cutting windows).
    """
    if n_mels not in (80, 128):
        raise ValueError(f"Whisper's frontend has 80 or 128 mel bins, got n_mels={n_mels}")
    audio = jnp.asarray(audio, jnp.float32)
    if audio.shape[-1] + padding < N_FFT // 2 + 1:
        raise ValueError(f"audio of {audio.shape[-1]} samples is too short for a {N_FFT}-sample window")
    return _log_mel(audio, n_mels, padding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _log_mel(audio: jax.Array, n_mels: int, padding: int) -> jax.Array:
    pad = [(0, 0)] * (audio.ndim - 1)
    audio = jnp.pad(audio, [*pad, (0, padding)])
    padded = jnp.pad(audio, [*pad, (N_FFT // 2, N_FFT // 2)], mode="reflect")  # centred frames
    log_spec = _log10_mel(padded, n_mels, audio.shape[-1] // HOP_LENGTH)  # torch.stft gives one more frame
    return _floor_and_scale(log_spec, log_spec.max(axis=(-2, -1), keepdims=True))


def _log10_mel(padded: jax.Array, n_mels: int, n_frames: int) -> jax.Array:
    """padded (..., N) samples with the frames' context on both sides -> (..., n_mels, n_frames)
    `log10` mel power; frame `t` is `padded[t * hop : t * hop + n_fft]`."""
    index = jnp.arange(n_frames)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]  # (F, n_fft)
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann
    spectrum = jnp.fft.rfft(padded[..., index] * window, axis=-1)  # (..., F, n_fft / 2 + 1)
    power = jnp.abs(spectrum) ** 2
    # Full float32 even where matmuls default to TF32 or bf16 passes (GPUs, TPUs): features are exact.
    filters = jnp.asarray(mel_filters(n_mels))
    mel = jnp.einsum("mf,...tf->...mt", filters, power, precision=jax.lax.Precision.HIGHEST)  # (..., n_mels, F)
    return jnp.log10(jnp.maximum(mel, 1e-10))


def _floor_and_scale(log_spec: jax.Array, top: jax.Array) -> jax.Array:
    """Whisper's floor 8 decades below the loudest value `top`, then `(x + 4) / 4`."""
    return (jnp.maximum(log_spec, top - 8.0) + 4.0) / 4.0


# ----------------------------------------------------------------------------- long recordings


def _window_segments(blocks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The samples behind each window of `size` samples (a multiple of the hop) of a stream.

    As `log_mel_spectrogram` sees a recording zero-padded to whole windows: the signal is
    reflected at both ends by half a frame, and the segment of window `w` runs from half a frame
    before it to the end of its last frame: (size + N_FFT - HOP_LENGTH,) samples. Memory stays
    at about a window and a block.
    """
    left, right = N_FFT // 2, N_FFT // 2 - HOP_LENGTH  # context before and after a window
    length = size + left + right
    buffer, total, started = np.zeros(0, np.float32), 0, False
    for block in blocks:
        total += len(block)
        buffer = np.concatenate([buffer, np.asarray(block, np.float32)])
        if not started:
            if len(buffer) <= left:
                continue
            buffer, started = np.concatenate([buffer[1 : left + 1][::-1], buffer]), True
        while len(buffer) >= length:
            yield buffer[:length]
            buffer = buffer[size:]
    windows = max(1, -(-total // size))
    if not started:  # shorter than half a frame: the zero padding is reflected too
        padded = np.zeros(windows * size, np.float32)
        padded[:total] = buffer
        buffer = np.concatenate([padded[1 : left + 1][::-1], padded])
    else:  # buffer holds the signal from `left` samples before window `w` on; pad to whole windows
        done = (total - (len(buffer) - left)) // size  # windows already yielded
        buffer = np.concatenate([buffer, np.zeros((windows - done) * size + left - len(buffer), np.float32)])
    buffer = np.concatenate([buffer, buffer[-(right + 1) : -1][::-1]])
    while len(buffer) >= length:
        yield buffer[:length]
        buffer = buffer[size:]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _window_log10_mel(segment: jax.Array, n_mels: int, frames: int) -> jax.Array:
    return _log10_mel(segment, n_mels, frames)


_floor_and_scale_jit = jax.jit(_floor_and_scale)


class LogMelWindows:
    """The log-mel of a recording of any length, window by window, in constant memory.

    `open_blocks()` returns a fresh iterator of 16 kHz sample blocks (a file read again, say).
    Construction makes a first pass to find the loudest value, which sets the 8-decade floor
    for the whole recording as in Whisper, and to count the windows; iterating makes a second
    pass and yields each window (n_mels, frames) exactly as `log_mel_spectrogram` of the whole
    recording, zero-padded to whole windows and cut, would give it. `samples` is the
    recording's length (16 kHz samples).
    """

    def __init__(self, open_blocks: Callable[[], Iterable[np.ndarray]], n_mels: int, frames: int):
        if n_mels not in (80, 128):
            raise ValueError(f"Whisper's frontend has 80 or 128 mel bins, got n_mels={n_mels}")
        self.open_blocks, self.n_mels, self.frames = open_blocks, n_mels, frames
        self.count, self.samples, top = 0, 0, None

        def counted() -> Iterator[np.ndarray]:
            for block in open_blocks():
                self.samples += len(block)
                yield block

        for segment in _window_segments(counted(), frames * HOP_LENGTH):
            loudest = _window_log10_mel(segment, n_mels, frames).max()
            top = loudest if top is None else jnp.maximum(top, loudest)
            self.count += 1
        self.top = top

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray]:
        for segment in _window_segments(self.open_blocks(), self.frames * HOP_LENGTH):
            yield np.asarray(_floor_and_scale_jit(_window_log10_mel(segment, self.n_mels, self.frames), self.top))


def pad_or_trim(array, length: int = N_SAMPLES, axis: int = -1):
    """Zero-pad or cut `array` along `axis` to `length` (a 30 s window by default)."""
    array = jnp.asarray(array)
    size = array.shape[axis]
    if size > length:
        return jnp.take(array, jnp.arange(length), axis=axis)
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - size)
    return jnp.pad(array, widths)
