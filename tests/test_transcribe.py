"""`python -m transcribe`: real speech through the whole pipeline in both frameworks, checked
against OpenAI's decoder on the same windows; bad files are reported, not fatal; results written
as `openai-whisper` writes them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import BLOCK_TORCH, openai_greedy

from convert import load_checkpoint, save_checkpoint
from transcribe import mel_windows, window_samples
from transcribe.__main__ import main
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
    code = guard + "from transcribe.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)


def test_transcripts_match_openai_in_both_frameworks(decoding_checkpoint, audio_files, tmp_path, capsys):
    model, path, _ = decoding_checkpoint
    ckpt = load_checkpoint(path)
    save_checkpoint(tmp_path / "flax", "flax", ckpt.config, ckpt.tensors)
    common = [*audio_files, "--jsonl", "--batch-size", "4", "--max-new-tokens", "8", "--mode", "windows"]

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
        segments = result["segments"]
        assert len(segments) == len(windows) == math.ceil(len(audio) / window_samples(ckpt.config)) > 1
        expected = openai_greedy(model, windows, None)
        assert [s["tokens"] for s in segments] == [list(r.tokens) for r in expected]
        assert [s["text"].strip() for s in segments] == [r.text for r in expected]
        assert result["text"] == "".join(s["text"] for s in segments)
        assert result["language"] == expected[0].language
        # One segment per window for now: the window's bounds, the last cut at the recording's end.
        seconds = window_samples(ckpt.config) / 16000
        assert [(s["id"], s["seek"], s["start"]) for s in segments] == [
            (i, i * windows.shape[-1], i * seconds) for i in range(len(windows))
        ]
        assert [s["end"] for s in segments[:-1]] == [(i + 1) * seconds for i in range(len(windows) - 1)]
        assert segments[-1]["end"] == pytest.approx(len(audio) / 16000)
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


RESULT = {
    "text": " Hello there. --> Tab\there and a long one.",
    "language": "en",
    "segments": [
        {"id": 0, "seek": 0, "start": 0.0, "end": 2.5, "text": " Hello there.", "tokens": [1, 2]},
        {"id": 1, "seek": 3000, "start": 2.5004, "end": 30.0, "text": " --> Tab\there", "tokens": [3]},
        {"id": 2, "seek": 6000, "start": 3599.9996, "end": 3725.25, "text": " and a long one é.", "tokens": [4]},
    ],
}


@pytest.mark.parametrize("fmt", ["txt", "vtt", "srt", "tsv", "json"])
def test_outputs_are_byte_for_byte_openai_whisper_s(fmt, tmp_path):
    from whisper.utils import get_writer

    from transcribe.outputs import write_outputs

    (tmp_path / "openai").mkdir()
    get_writer(fmt, str(tmp_path / "openai"))(RESULT, "talk.final.flac")
    (ours,) = write_outputs(RESULT, "some/where/talk.final.flac", tmp_path / "ours", (fmt,))
    assert ours == tmp_path / "ours" / f"talk.final.{fmt}"
    assert ours.read_bytes() == (tmp_path / "openai" / f"talk.final.{fmt}").read_bytes()


def test_output_files_refuse_to_replace_anything_unless_asked(decoding_checkpoint, tmp_path, capsys):
    _, path, _ = decoding_checkpoint
    common = [str(SPEECH), "--checkpoint", str(path), "--max-new-tokens", "4"]
    assert main([*common, "--output-dir", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"speech_16k.{fmt}" for fmt in ("json", "srt", "tsv", "txt", "vtt")]
    result = json.loads((tmp_path / "out" / "speech_16k.json").read_text())
    assert {"text", "language", "segments"} <= result.keys() and result["segments"][0]["start"] == 0.0

    (tmp_path / "out" / "speech_16k.srt").write_text("a user's own subtitles")
    capsys.readouterr()
    assert main([*common, "--output-dir", str(tmp_path / "out"), "-f", "srt"]) == 2  # before decoding anything
    assert "speech_16k.srt: exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "out" / "speech_16k.srt").read_text() == "a user's own subtitles"
    assert main([*common, "--output-dir", str(tmp_path / "out"), "-f", "srt", "--overwrite"]) == 0
    assert (tmp_path / "out" / "speech_16k.srt").read_text().startswith("1\n00:00:00,000 --> ")

    # Two inputs whose outputs would share a name, and subtitles of several files on stdout.
    other = tmp_path / "other"
    other.mkdir()
    (other / "speech_16k.wav").write_bytes(SPEECH.read_bytes())
    assert main([str(SPEECH), str(other / "speech_16k.wav"), "--checkpoint", str(path), "-o", str(tmp_path / "x")]) == 2
    assert "would both be written to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(SPEECH), str(other / "speech_16k.wav"), "--checkpoint", str(path), "-f", "vtt"])
    assert "give --output-dir for several" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # five formats cannot share stdout, even for one file
        main([*common, "-f", "all"])
    assert "--output-format all writes one file per format: give --output-dir" in capsys.readouterr().err
    assert main([*common, "-f", "vtt"]) == 0
    assert capsys.readouterr().out.startswith("WEBVTT\n\n00:00.000 --> ")


def test_the_old_command_name_still_works():
    """The alias runs the command's own `main` under its old name (what `main` does with a file
    is tested above; `--help` shows the wiring without compiling a model)."""
    done = subprocess.run([sys.executable, "-m", "flax_whisper.transcribe", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is now `python -m transcribe`" in done.stderr
    assert done.stdout.startswith("usage: python -m flax_whisper.transcribe") and "--checkpoint" in done.stdout


@pytest.mark.slow  # two runs of the command in subprocesses
def test_a_second_run_reads_its_compiled_programs_from_the_cache(decoding_checkpoint, tmp_path):
    """`--compile-cache DIR`: the first run writes its programs, the next one loads them (JAX
    logs each hit with JAX_LOG_COMPILES) and prints the same transcript; `off` writes nothing."""
    _, path, _ = decoding_checkpoint
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def run(setting: str) -> subprocess.CompletedProcess:
        command = ["-m", "transcribe", str(SPEECH), "--checkpoint", str(path), "--language", "en"]
        done = subprocess.run(
            [sys.executable, *command, "--compile-cache", setting], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    first = run(str(cache))
    assert "Persistent compilation cache hit" not in first.stderr
    written = sorted(p.name for p in cache.iterdir())
    assert written
    second = run(str(cache))
    assert "Persistent compilation cache hit" in second.stderr
    assert second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == written  # nothing compiled anew
    elsewhere = tmp_path / "not-used"
    env["FLAX_WHISPER_COMPILE_CACHE"] = str(elsewhere)
    run("off")
    assert not elsewhere.exists()


def test_model_packages_import_nothing_above_them():
    """flax_whisper and torch_ref import only the config and io packages (and each other never)."""
    import ast

    root = Path(__file__).parent.parent
    above = {"convert", "train", "transcribe", "bench", "tests"}
    for package, sibling in (("flax_whisper", "torch_ref"), ("torch_ref", "flax_whisper")):
        for file in (root / package).glob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                tops = {name.split(".")[0] for name in names}
                if file.name == "transcribe.py" and package == "flax_whisper":
                    continue  # the old command's alias, importing `transcribe` only when run
                assert not tops & (above | {sibling}), f"{file} imports {tops & (above | {sibling})}"


def test_beam_search_transcripts_match_openai(decoding_checkpoint, capsys):
    import torch
    import whisper

    model, path, _ = decoding_checkpoint
    argv = [str(SPEECH), "--checkpoint", str(path), "--max-new-tokens", "8", "-f", "json", "--mode", "windows"]
    assert main([*argv, "--beam-size", "5", "--patience", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    windows = mel_windows(load_audio(SPEECH), load_checkpoint(path).config)
    oracle = whisper.DecodingOptions(beam_size=5, patience=2.0, without_timestamps=True, fp16=False, sample_len=8)
    expected = [whisper.decoding.decode(model, torch.from_numpy(w[None]), oracle)[0] for w in windows]
    assert [s["tokens"] for s in result["segments"]] == [r.tokens for r in expected]
    assert main(argv) == 0  # greedy: another transcript on at least one window
    greedy = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in greedy["segments"]] != [r.tokens for r in expected]
    with pytest.raises(SystemExit):
        main([*argv, "--patience", "2"])
    assert "--patience and --length-penalty need --beam-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--word-timestamps", "True"])
    assert "--word-timestamps needs --mode sequential" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--max-line-width", "20"])
    assert "--max-line-width needs --word-timestamps True" in capsys.readouterr().err


def words_of(text: str, start: float, step: float) -> list[dict]:
    """Words of `text`, one every `step` seconds from `start`."""
    return [
        {"word": f" {w}", "start": round(start + i * step, 2), "end": round(start + (i + 1) * step - 0.05, 2),
         "probability": 0.9}
        for i, w in enumerate(text.split())
    ]  # fmt: skip


LONG = "This is a much longer segment that will need breaking into several short lines."
WORDS_RESULT = {
    "text": "",
    "language": "en",
    "segments": [
        {"id": 0, "seek": 0, "start": 0.0, "end": 2.5, "text": " Hello there, general Kenobi.",
         "words": words_of("Hello there, general Kenobi.", 0.0, 0.6)},
        {"id": 1, "seek": 0, "start": 2.5, "end": 2.5, "text": "", "words": []},
        {"id": 2, "seek": 3000, "start": 7.0, "end": 11.0, "text": " " + LONG, "words": words_of(LONG, 7.0, 0.3)},
        {"id": 3, "seek": 3000, "start": 16.0, "end": 16.5, "text": " Done.", "words": words_of("Done.", 16.0, 0.5)},
    ],
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["vtt", "srt"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"highlight_words": True},
        {"max_line_width": 20},
        {"max_line_width": 20, "max_line_count": 2},
        {"max_words_per_line": 3},
        {"max_line_width": 16, "max_line_count": 1, "highlight_words": True},
    ],
    ids=str,
)
def test_subtitles_of_word_timestamps_are_openai_whisper_s(fmt, options, tmp_path):
    """A result with words: cues laid out from the words (per segment, or by line width, line
    count and words per line, a long pause breaking a cue; each word underlined in turn with
    highlighting), byte for byte what `openai-whisper`'s writers produce with the same options."""
    from whisper.utils import get_writer

    from transcribe.outputs import RENDERERS, SubtitleOptions, write_outputs

    (tmp_path / "openai").mkdir()
    get_writer(fmt, str(tmp_path / "openai"))(WORDS_RESULT, "talk.wav", options)
    (ours,) = write_outputs(WORDS_RESULT, "talk.wav", tmp_path / "ours", (fmt,), SubtitleOptions(**options))
    expected = (tmp_path / "openai" / f"talk.{fmt}").read_text()
    assert ours.read_text() == expected
    segments = [{k: v for k, v in s.items() if k != "words"} for s in WORDS_RESULT["segments"]]
    no_words = {**WORDS_RESULT, "segments": segments}
    assert RENDERERS[fmt](no_words, None) != expected  # the words decide the cues
    assert ("<u>" in expected) == bool(options.get("highlight_words"))


@pytest.mark.parametrize("fmt", ["vtt", "srt"])
@pytest.mark.parametrize("highlight", [False, True])
def test_a_word_starting_before_zero_starts_its_cue_at_zero(fmt, highlight, tmp_path):
    """A first word whose start came out at -0.02 s (a degenerate alignment): openai-whisper's
    writer fails on it; ours writes what openai-whisper writes for the word starting at 0."""
    from whisper.utils import get_writer

    from transcribe.outputs import SubtitleOptions, write_outputs

    def with_first_start(start: float) -> dict:
        segments = [dict(s, words=[dict(w) for w in s["words"]]) for s in WORDS_RESULT["segments"]]
        segments[0]["words"][0]["start"] = start
        return {**WORDS_RESULT, "segments": segments}

    options = {"highlight_words": highlight}
    with pytest.raises(AssertionError):
        get_writer(fmt, str(tmp_path))(with_first_start(-0.02), "negative.wav", options)
    get_writer(fmt, str(tmp_path))(with_first_start(0.0), "zero.wav", options)
    (ours,) = write_outputs(with_first_start(-0.02), "talk.wav", tmp_path / "ours", (fmt,), SubtitleOptions(**options))
    assert ours.read_text() == (tmp_path / f"zero.{fmt}").read_text()
