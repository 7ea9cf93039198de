"""Reading audio files: any format libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...),
mixed down to mono and resampled to the model's 16 kHz.

Every failure is an `AudioFileError` whose message starts with the file's path, so a batch
job can report the file and carry on with the rest.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class AudioFileError(ValueError):
    """An audio file is missing, unreadable, empty or in an unsupported format."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def resample(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """audio (N,) at `source_rate` -> (ceil(N * target / source),) at `target_rate`.

    Polyphase filtering with a Kaiser-windowed low-pass (scipy's `resample_poly`), which removes
    what lies above the new Nyquist frequency instead of aliasing it.
    """
    if source_rate == target_rate:
        return audio
    from scipy.signal import resample_poly

    g = math.gcd(source_rate, target_rate)
    return resample_poly(audio, target_rate // g, source_rate // g).astype(np.float32)


def _wav_sample_rate(path: Path) -> int | None:
    """The sample rate in a RIFF/WAVE `fmt ` chunk, or None if `path` is not such a file."""
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        while chunk := f.read(8):
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"fmt ":
                fmt = f.read(8)
                return int.from_bytes(fmt[4:8], "little") if len(fmt) == 8 else None
            f.seek(size + size % 2, os.SEEK_CUR)
    return None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read `path` -> (N,) float32 mono samples in [-1, 1] at `sample_rate` (16 kHz by default)."""
    import soundfile

    p = Path(path)
    if not p.exists():
        raise AudioFileError(path, "no such file")
    if p.is_dir():
        raise AudioFileError(path, "is a directory, not an audio file")
    if p.stat().st_size == 0:
        raise AudioFileError(path, "empty file")
    try:
        info = soundfile.info(str(p))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        if _wav_sample_rate(p) == 0:  # libsndfile only says "SF_INFO struct incomplete"
            raise AudioFileError(path, "invalid sample rate 0 Hz in the WAV header") from None
        raise AudioFileError(path, f"unsupported or unreadable audio ({e})") from None
    if info.samplerate <= 0:
        raise AudioFileError(path, f"invalid sample rate {info.samplerate} Hz")
    if info.frames == 0:
        raise AudioFileError(path, "contains no audio samples")
    try:
        audio, rate = soundfile.read(str(p), dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioFileError(path, f"cannot decode audio ({e})") from None
    if audio.shape[0] == 0:
        raise AudioFileError(path, "contains no audio samples")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    return np.ascontiguousarray(resample(mono, rate, sample_rate), dtype=np.float32)
