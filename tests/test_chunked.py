"""Chunked long-form transcription (`--mode chunked`): overlapping windows of several files in
shared batches, stitched by timestamps.

The windows are checked to cover every recording; the stitching to give every word of a
transcript exactly once when each window decodes what it hears; and the whole mode, in both
frameworks, to equal OpenAI's own `decode` of each window (with timestamps) stitched the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import counting_compiles, longform_openai_model, save_openai_model

from transcribe.chunked import chunk_windows, stitch
from transcribe.sequential import Decoded, LongFormOptions, padded_window
from whisper_io import load_audio
from whisper_io.tokenizers import WhisperTokenizer


@pytest.mark.parametrize("content", [1, 2999, 3000, 3001, 5000, 9001, 30000])
@pytest.mark.parametrize("overlap", [0, 500, 1400])
def test_windows_own_contiguous_parts_covering_the_recording(content, overlap):
    windows = chunk_windows(content, 3000, overlap)
    assert windows[0][1] == 0 and windows[-1][2] == content
    for (start, own_from, own_to), following in zip(windows, [*windows[1:], None], strict=True):
        assert start <= own_from < own_to <= start + 3000  # a window sees all it owns
        assert own_from - start in (0, overlap) and (following is None or following[1] == own_to)
    assert windows[-1][0] + 3000 >= content and (len(windows) == 1 or windows[-2][0] + 3000 < content)
    with pytest.raises(ValueError, match="leaves nothing"):
        chunk_windows(content, 3000, 1500)


def test_stitching_gives_every_word_once():
    """A transcript of 120 words spoken one every 0.5 s over 60 s: each window "decodes" the words
    that lie wholly inside it, each a segment between two timestamps (as a model would), and
    the stitched text is the transcript, every word once and in order."""
    tokenizer = WhisperTokenizer(51865)
    begin = tokenizer.timestamp_begin
    words = [f" w{i}" for i in range(120)]
    times = [(0.5 * i + 0.04, 0.5 * i + 0.4) for i in range(120)]  # on the 20 ms timestamp grid
    content, frames = 6000, 3000  # 60 s of mel frames, 30 s windows
    windows = chunk_windows(content, frames, 500)
    decoded = []
    for start, _, _ in windows:
        offset = start / 100
        tokens = []
        for word, (a, b) in zip(words, times, strict=True):
            if offset <= a and b <= offset + 30:
                stamps = [begin + round((t - offset) / 0.02) for t in (a, b)]
                tokens += [stamps[0], *tokenizer.encode(word), stamps[1]]
        decoded.append(Decoded(tokens, -1.0, 0.0, 0.0, 1.0))
    result = stitch(windows, decoded, content, frames, tokenizer, LongFormOptions())
    assert result["text"] == "".join(words)
    assert [s["start"] for s in result["segments"]] == pytest.approx([a for a, _ in times])
    assert len(windows) == 3 and {s["seek"] for s in result["segments"]} == {0, 2000, 4000}


@pytest.fixture(scope="module")
def two_files(long_speech, tmp_path_factory):
    """The 85 s recording and its last 40 s, as two files."""
    import soundfile

    audio = load_audio(long_speech)
    folder = tmp_path_factory.mktemp("chunked")
    soundfile.write(folder / "tail.wav", audio[-40 * 16000 :], 16000)
    return [str(long_speech), str(folder / "tail.wav")]


@pytest.fixture(scope="module")
def chunk_model(tmp_path_factory):
    model = longform_openai_model()
    return model, save_openai_model(model, tmp_path_factory.mktemp("chunk_model") / "random.pt")


def openai_chunked(model, path: str, config) -> dict:
    """OpenAI's `decode` of each window of a file (greedy, timestamps, the text-only prompt),
    stitched by `transcribe.chunked.stitch`."""
    import whisper

    from transcribe.pipeline import file_mel

    mel = file_mel(path, config)
    content = mel.shape[-1] - 3000
    windows = chunk_windows(content, 3000, 500)
    options = whisper.DecodingOptions(language="en", without_timestamps=False, fp16=False, sample_len=224)
    decoded = []
    for start, _, _ in windows:
        window = padded_window(mel, start, min(3000, content - start), 3000)
        result = whisper.decoding.decode(model, torch.from_numpy(window), options)
        sum_logprob = result.avg_logprob * (len(result.tokens) + 1)  # OpenAI averages over the tokens and the end
        decoded.append(Decoded(result.tokens, sum_logprob, result.no_speech_prob, 0.0, result.compression_ratio))
    return stitch(windows, decoded, content, 3000, WhisperTokenizer(51865), LongFormOptions())


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_chunked_mode_is_openais_window_decoding_stitched(two_files, chunk_model, framework, capsys):
    """`--mode chunked --batch-size 4` on two files (7 windows: 5 of the 85 s file, 2 of the 40 s
    one, sharing two batches): each file's segments are those of OpenAI's `decode` of its
    windows stitched together; in flax, transcribing them again compiles nothing."""
    from convert.checkpoints import load_checkpoint
    from transcribe.__main__ import main

    model, path = chunk_model
    config = load_checkpoint(path).config
    argv = [*two_files, "--checkpoint", str(path), "--framework", framework, "-f", "json", "--language", "en"]
    assert main([*argv, "--mode", "chunked", "--batch-size", "4"]) == 0
    results = {r.pop("path"): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(results) == two_files
    for file in two_files:
        expected = openai_chunked(model, file, config)
        ours = results[file]
        assert [(s["seek"], s["start"], s["end"], s["tokens"]) for s in ours["segments"]] == [
            (s["seek"], s["start"], s["end"], s["tokens"]) for s in expected["segments"]
        ]
        assert ours["text"] == expected["text"] and ours["language"] == "en"
        assert len({s["seek"] for s in ours["segments"]}) >= 2  # several windows contribute
    if framework == "flax":  # every batch runs one program: files transcribed again compile nothing
        from transcribe.pipeline import Transcriber, transcribe_files

        transcriber = Transcriber.load(str(path), "flax", "en", batch_size=4, mode="chunked")
        first = transcribe_files(two_files, transcriber, print)
        with counting_compiles() as compiles:
            assert transcribe_files(two_files[::-1], transcriber, print) == {f: first[f] for f in two_files[::-1]}
        assert compiles == []
