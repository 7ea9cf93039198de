"""`python -m flax_whisper.transcribe`: real speech through the whole pipeline in both frameworks,
checked against OpenAI's decoder on the same windows; bad files are reported, not fatal."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import BLOCK_TORCH, openai_greedy

from convert import load_checkpoint, save_checkpoint
from flax_whisper.transcribe import main, mel_windows, window_samples
from whisper_io import load_audio

SPEECH = Path(__file__).parent / "data" / "speech_16k.wav"


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Two readable files (the shipped speech, and it as 44.1 kHz stereo FLAC) and three bad ones."""
    folder = tmp_path_factory.mktemp("audio")
    speech = soundfile.read(SPEECH, dtype="float32")[0]
    from scipy.signal import resample_poly

    loud = resample_poly(speech, 441, 160).astype(np.float32)
    soundfile.write(folder / "stereo.flac", np.stack([loud, 0.5 * loud], axis=1), 44100)
    (folder / "notes.ogg").write_text("not audio at all\n" * 10)
    broken = speech.copy()
    broken[8000] = np.nan  # a float WAV can hold NaN: reported, never transcribed into garbage
    soundfile.write(folder / "nan.wav", broken, 16000, subtype="FLOAT")
    paths = ["missing.wav", "stereo.flac", "notes.ogg", "nan.wav"]
    return [str(SPEECH), *(str(folder / name) for name in paths)]


def run_cli(argv: list[str], block_torch: bool) -> subprocess.CompletedProcess:
    guard = BLOCK_TORCH if block_torch else "import sys\n"
    code = guard + "from flax_whisper.transcribe import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def test_transcripts_match_openai_in_both_frameworks(decoding_checkpoint, audio_files, tmp_path, capsys):
    model, path, _ = decoding_checkpoint
    ckpt = load_checkpoint(path)
    save_checkpoint(tmp_path / "flax", "flax", ckpt.config, ckpt.tensors)
    common = [*audio_files, "--jsonl", "--batch-size", "4", "--max-new-tokens", "8"]

    # The JAX path runs with torch made unimportable.
    flax_run = run_cli([*common, "--checkpoint", str(tmp_path / "flax")], block_torch=True)
    assert flax_run.returncode == 1, flax_run.stderr
    assert "missing.wav: no such file" in flax_run.stderr
    assert "notes.ogg: unsupported or unreadable audio" in flax_run.stderr
    assert "nan.wav: holds NaN or infinite samples (the first at 0.50 s)" in flax_run.stderr
    assert "3 of 5 files could not be read" in flax_run.stderr
    flax_results = [json.loads(line) for line in flax_run.stdout.splitlines()]

    assert main([*common, "--checkpoint", str(path), "--framework", "torch"]) == 1
    torch_results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert torch_results == flax_results

    # Oracle: OpenAI's own decoder on the same 0.4 s windows (n_audio_ctx=20 -> 40 mel frames).
    assert [r["path"] for r in flax_results] == [audio_files[0], audio_files[2]]
    for result in flax_results:
        audio = load_audio(result["path"])
        windows = mel_windows(audio, ckpt.config)
        assert result["windows"] == len(windows) == math.ceil(len(audio) / window_samples(ckpt.config)) > 1
        expected = openai_greedy(model, windows, None)
        assert result["text"] == " ".join(r.text for r in expected if r.text)
        assert result["language"] == expected[0].language
    assert flax_results[0]["text"]


def test_no_readable_file_and_bad_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.wav"), "--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.slow
def test_a_three_hour_recording_is_transcribed_in_constant_memory(tmp_path):
    """Reading, resampling, the log-mel and decoding all stream: a 3-hour 44.1 kHz stereo file
    stays under 2 GB of peak RSS (its 16 kHz samples alone would take 660 MB, the old whole-file
    log-mel about 1.8 GB per hour)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from transcribe_memory import measure

    result = measure(hours=3.0, keep=str(tmp_path))
    assert result["status"] == 0 and result["transcript_chars"] > 0
    assert result["peak_rss_mb"] < 2048, result
