"""Reading audio files: any format libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...),
mixed down to mono and resampled to the model's 16 kHz.

Every failure is an `AudioFileError` whose message starts with the file's path, so a batch
job can report the file and carry on with the rest.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Whisper's framing of audio, the same in every framework: 16 kHz samples, a mel frame every 10 ms,
# windows of 30 s. Here, below the model packages, so that what only counts samples and frames
# (transcription's seeking and timestamps, the data loader) needs no framework loaded.
SAMPLE_RATE = 16000
HOP_LENGTH = 160  # samples a mel frame
CHUNK_LENGTH = 30  # seconds per window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames a second


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


def check_finite_samples(path: str | os.PathLike, audio: np.ndarray, rate: int, offset: int = 0) -> None:
    """Raise `AudioFileError` if any sample of `audio` (N, ...) is NaN or infinite: a float WAV can
    hold them, and they would turn every feature, loss and transcript of the file into garbage.
    `offset` is the position of `audio[0]` in the file, in samples at `rate`."""
    finite = np.isfinite(audio).reshape(len(audio), -1).all(axis=1)
    if not finite.all():
        first = (offset + int(np.argmin(finite))) / rate
        raise AudioFileError(path, f"holds NaN or infinite samples (the first at {first:.2f} s)")


class StreamResampler:
    """`resample` over a stream of blocks, with exactly the output of one call on the whole signal.

    scipy's `resample_poly(x, up, down)` makes output sample `i` from the input samples within a
    filter's reach of `i * down / up`. Calling it on a stretch of input that starts at a multiple
    of `down` gives, for every output whose reach lies inside the stretch, the same value as the
    whole-signal call (the filter taps meet the same samples in the same order). So each block is
    resampled together with the little input that the next outputs still reach, and only outputs
    whose reach is complete are emitted.
    """

    def __init__(self, source_rate: int, target_rate: int = SAMPLE_RATE):
        g = math.gcd(source_rate, target_rate)
        self.up, self.down = target_rate // g, source_rate // g
        half_len = 10 * max(self.up, self.down)  # resample_poly's filter design
        pre_pad = self.down - half_len % self.down
        self.reach = 2 * half_len + 1 + pre_pad  # filter taps, with the zeros that centre the output
        self.delay = (half_len + pre_pad) // self.down  # outputs resample_poly drops at the start
        self.buffer = np.zeros(0, np.float32)
        self.start = 0  # index of buffer[0] in the input: always a multiple of `down`
        self.emitted = 0  # outputs emitted so far

    def push(self, block: np.ndarray, final: bool = False) -> np.ndarray:
        """The outputs that `block` completes (all remaining ones when `final`)."""
        if self.up == self.down:
            return np.asarray(block, np.float32)
        up, down = self.up, self.down
        self.buffer = np.concatenate([self.buffer, np.asarray(block, np.float32)])
        end = self.start + len(self.buffer)
        # All of resample_poly's outputs at the end; else those whose reach, up to input
        # (i + delay) * down / up, lies before `end`.
        done = -(-end * up // down) if final else ((end - 1) * up) // down - self.delay + 1
        if done <= self.emitted or not len(self.buffer):
            return np.zeros(0, np.float32)
        from scipy.signal import resample_poly

        first = self.start * up // down
        out = resample_poly(self.buffer, up, down)[self.emitted - first : done - first].astype(np.float32)
        self.emitted = done
        # The earliest input the next output reaches; keep from the multiple of `down` before it.
        needed = max(0, -(-((done + self.delay) * down - self.reach + 1) // up))
        start = needed // down * down
        if start > self.start:
            self.buffer = self.buffer[start - self.start :]
            self.start = start
        return out


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


def _open(path: str | os.PathLike):
    """soundfile's info on `path`, after every check that can name what is wrong with it."""
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
    return info


def _mono(audio: np.ndarray) -> np.ndarray:
    """(N, channels) -> (N,): the mean of the channels."""
    return audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read `path` -> (N,) float32 mono samples in [-1, 1] at `sample_rate` (16 kHz by default)."""
    import soundfile

    _open(path)
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioFileError(path, f"cannot decode audio ({e})") from None
    if audio.shape[0] == 0:
        raise AudioFileError(path, "contains no audio samples")
    check_finite_samples(path, audio, rate)
    return np.ascontiguousarray(resample(_mono(audio), rate, sample_rate), dtype=np.float32)


def stream_audio(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, block_seconds: float = 30.0
) -> Iterator[np.ndarray]:
    """Blocks of (n,) float32 mono samples at `sample_rate` that join into exactly `load_audio(path)`,
    read `block_seconds` at a time: memory stays at a block whatever the length of the file.

    Errors are `AudioFileError`s naming the file; the ones found while reading (NaN samples, a
    truncated file) come from the iteration itself.
    """
    import soundfile

    info = _open(path)
    resampler = StreamResampler(info.samplerate, sample_rate)
    block_frames = max(1, int(block_seconds * info.samplerate))
    read = 0
    try:
        with soundfile.SoundFile(str(path)) as f:
            while len(block := f.read(block_frames, dtype="float32", always_2d=True)):
                check_finite_samples(path, block, info.samplerate, offset=read)
                read += len(block)
                out = resampler.push(_mono(block))
                if len(out):
                    yield out
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioFileError(path, f"cannot decode audio ({e})") from None
    if read == 0:
        raise AudioFileError(path, "contains no audio samples")
    tail = resampler.push(np.zeros(0, np.float32), final=True)
    if len(tail):
        yield tail
