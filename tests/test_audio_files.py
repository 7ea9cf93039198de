"""Reading audio files: formats, mono mixdown, resampling, and errors that name the file."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile

from whisper_io import AudioFileError, load_audio
from whisper_io.audio_files import stream_audio


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(("suffix", "subtype"), [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_formats_read_as_float_mono_16k(tmp_path, suffix, subtype):
    path = tmp_path / f"tone{suffix}"
    soundfile.write(path, tone(16000, 0.5), 16000, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == 8000
    assert abs(peak_hz(audio, 16000) - 440.0) <= 2.0
    if subtype == "PCM_16":  # lossless: only the 16-bit quantisation differs
        np.testing.assert_allclose(audio, tone(16000, 0.5), atol=2**-15)


def test_other_rates_are_resampled_to_16k(tmp_path):
    for rate in (8000, 22050, 44100, 48000):
        path = tmp_path / f"tone_{rate}.wav"
        soundfile.write(path, tone(rate, 1.0, hz=1000.0), rate, subtype="FLOAT")
        audio = load_audio(path)
        assert len(audio) == 16000, rate
        assert abs(peak_hz(audio, 16000) - 1000.0) <= 1.0, rate
        middle = audio[2000:-2000]  # away from the filter's edge effects
        np.testing.assert_allclose(middle, tone(16000, 1.0, hz=1000.0)[2000:-2000], atol=0.02, err_msg=str(rate))


def test_content_above_the_new_nyquist_is_filtered_not_aliased(tmp_path):
    path = tmp_path / "high.wav"
    soundfile.write(path, tone(48000, 1.0, hz=11000.0), 48000, subtype="FLOAT")  # above 8 kHz
    middle = load_audio(path)[2000:-2000]  # an aliased tone would come back at 5 kHz, amplitude 0.5
    assert np.sqrt(np.mean(middle**2)) < 0.01


def test_channels_are_mixed_to_mono(tmp_path):
    left, right = tone(16000, 0.25, 300.0), tone(16000, 0.25, 500.0)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-7)


def zero_rate_wav(path):
    samples = np.zeros(100, "<i2").tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, 0, 0, 2, 16)  # PCM, mono, 0 Hz
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE" + b"fmt " + fmt)
    with open(path, "ab") as f:
        f.write(b"data" + struct.pack("<I", len(samples)) + samples)


def no_samples_wav(path):
    soundfile.write(path, np.zeros((0,), np.float32), 16000, format="WAV")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("this is text, not sound\n" * 20), "unsupported or unreadable audio"),
        (zero_rate_wav, "invalid sample rate 0 Hz"),
        (no_samples_wav, "no audio samples"),
    ],
    ids=["missing", "empty", "directory", "not-audio", "zero-rate", "no-samples"],
)
def test_bad_files_are_clear_errors_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioFileError, match=message) as error:
        load_audio(path)
    assert str(error.value).startswith(f"{path}: ") and error.value.path == str(path)


@pytest.mark.parametrize("rate", [16000, 8000, 22050, 44100, 48000])
def test_streamed_reading_equals_reading_the_whole_file(tmp_path, rate):
    """`stream_audio` resamples block by block with exactly `load_audio`'s output (bit for bit),
    whatever the block size, including stereo mixdown."""
    rng = np.random.default_rng(rate)
    signal = (0.3 * rng.standard_normal((int(rate * 3.3), 2))).astype(np.float32)
    path = tmp_path / "noise.wav"
    soundfile.write(path, signal, rate, subtype="FLOAT")
    whole = load_audio(path)
    for seconds in (0.05, 0.7, 10.0):
        streamed = np.concatenate(list(stream_audio(path, block_seconds=seconds)))
        assert streamed.dtype == np.float32 and np.array_equal(streamed, whole), (rate, seconds)


def test_non_finite_samples_are_an_error_naming_the_file_and_the_time(tmp_path):
    audio = tone(16000, 2.0)
    audio[24000] = np.inf  # at 1.5 s
    path = tmp_path / "inf.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    for read in (load_audio, lambda p: list(stream_audio(p, block_seconds=0.4))):
        with pytest.raises(AudioFileError, match=r"holds NaN or infinite samples \(the first at 1.50 s\)") as error:
            read(path)
        assert error.value.path == str(path)
