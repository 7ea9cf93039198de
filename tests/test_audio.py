"""The log-mel frontend against OpenAI Whisper's own (`whisper.audio`), on real speech.

`tests/data/speech_16k.wav` is espeak-ng speech made by `tests/data/make_speech.sh`.
"""

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper.audio
from conftest import assert_close

from flax_whisper.audio import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    LogMelWindows,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

SPEECH = Path(__file__).parent / "data" / "speech_16k.wav"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    return (pcm / 32768.0).astype(np.float32)  # as whisper.audio.load_audio scales s16le


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_openai_assets(n_mels):
    assert_close(mel_filters(n_mels), whisper.audio.mel_filters("cpu", n_mels).numpy(), 1e-7)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("padding", [0, N_SAMPLES])
def test_log_mel_matches_openai_on_speech(speech, n_mels, padding):
    ours = np.asarray(log_mel_spectrogram(speech, n_mels, padding=padding))
    reference = whisper.audio.log_mel_spectrogram(torch.from_numpy(speech), n_mels, padding=padding).numpy()
    assert ours.shape == reference.shape == (n_mels, (speech.size + padding) // HOP_LENGTH)
    assert_close(ours, reference, 1e-4, f"log-mel {n_mels}")
    assert reference.max() - reference.min() > 1.0, "real speech spans a wide dynamic range"


def test_batched_equals_one_by_one(speech):
    batch = np.stack([speech, 0.5 * speech[::-1]])
    together = np.asarray(log_mel_spectrogram(batch))
    for i in range(2):
        assert_close(together[i], log_mel_spectrogram(batch[i]), 1e-6)


def test_thirty_second_window(speech):
    window = pad_or_trim(speech)
    assert window.shape == (N_SAMPLES,) and np.array_equal(window[: speech.size], speech)
    assert log_mel_spectrogram(window).shape == (80, N_FRAMES)
    assert pad_or_trim(np.ones(N_SAMPLES + 7)).shape == (N_SAMPLES,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="80 or 128 mel bins"):
        log_mel_spectrogram(np.zeros(1000), n_mels=64)
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(np.zeros(100))


@pytest.mark.parametrize("frames", [40, 3000])
def test_streamed_windows_equal_the_whole_recording_cut(speech, frames):
    """`LogMelWindows` reads a stream twice in blocks of any size and gives the log-mel of the
    whole recording zero-padded to whole windows (one 8-decade floor for all): the same bits for
    every block size, and the whole-recording values up to the FFT's last bit (XLA's FFT of a
    window and of a whole recording may round differently)."""
    size = frames * HOP_LENGTH
    for audio in (speech, speech[:150], np.concatenate([speech, 0.01 * speech, speech[:1234]])):
        windows = -(-len(audio) // size)
        padded = np.zeros(windows * size, np.float32)
        padded[: len(audio)] = audio
        whole = np.asarray(log_mel_spectrogram(padded)).reshape(80, windows, frames).transpose(1, 0, 2)
        results = []
        for block in (99, 4000, len(audio)):
            streamed = LogMelWindows(lambda a=audio, b=block: (a[i : i + b] for i in range(0, len(a), b)), 80, frames)
            assert len(streamed) == windows
            results.append(np.stack(list(streamed)))
        assert all(np.array_equal(r, results[0]) for r in results)
        assert_close(results[0], whole, 2.5e-7, f"{len(audio)} samples in windows of {frames} frames")
