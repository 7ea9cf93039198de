"""Long-form transcription against OpenAI's own `transcribe()`: over 60 s of espeak-ng speech and
a random OpenAI-format model that samples timestamp pairs and ends windows early, so windows
are cut into several segments and `seek` moves by the last timestamp. Both frameworks give
OpenAI's segments, seeks and temperatures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import counting_compiles, longform_openai_model, save_openai_model

from transcribe.pipeline import Transcriber, transcribe_file
from transcribe.sequential import LongFormOptions
from whisper_io import load_audio

KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature")


@pytest.fixture(scope="module")
def longform_model(tmp_path_factory):
    """(OpenAI model, its `.pt` path): `longform_openai_model()`."""
    model = longform_openai_model()
    return model, save_openai_model(model, tmp_path_factory.mktemp("longform") / "random.pt")


def openai_transcribe(model, audio: np.ndarray, **options) -> dict:
    import whisper

    return whisper.transcribe(model, audio, fp16=False, verbose=None, **options)


def assert_same_transcription(ours: dict, expected: dict) -> None:
    assert ours["language"] == expected["language"]
    assert [{k: s[k] for k in KEYS} for s in ours["segments"]] == [
        {k: s[k] for k in KEYS} for s in expected["segments"]
    ]
    assert ours["text"] == expected["text"]
    for a, b in zip(ours["segments"], expected["segments"], strict=True):
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], rel=1e-3)
        assert a["no_speech_prob"] == pytest.approx(b["no_speech_prob"], rel=1e-4, abs=1e-7)
        assert a["compression_ratio"] == b["compression_ratio"]


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("language", ["en", None], ids=["english", "detected"])
def test_sequential_transcription_matches_openai(long_speech, longform_model, framework, language):
    model, path = longform_model
    audio = load_audio(long_speech)
    assert len(audio) / 16000 > 60
    expected = openai_transcribe(model, audio, language=language, temperature=0.0)
    transcriber = Transcriber.load(
        str(path), framework, language, mode="sequential", long_form=LongFormOptions(temperatures=(0.0,))
    )
    assert_same_transcription(transcribe_file(str(long_speech), transcriber), expected)
    if language is None:  # the language detected (not English) is the oracle's; its text is less varied
        return
    # Not degenerate: several windows, one cut into several segments, and a seek moved by the last
    # timestamp rather than by a whole window.
    seeks = [s["seek"] for s in expected["segments"]]
    assert len(set(seeks)) >= 3 and len(seeks) > len(set(seeks))
    assert any(seek % 3000 for seek in seeks)
    assert sum(bool(s["text"].strip()) for s in expected["segments"]) >= 2


@pytest.fixture
def shared_draws(longform_model, monkeypatch):
    """The same random draws in OpenAI's sampler and both of ours: the Gumbel noise JAX draws for
    `flax_whisper.decoding` (decode call k of a file with `jax.random.key(k)`, its step i with
    `fold_in(key, i)`, the first with the key itself) replaces the noise of `torch_ref.decoding`
    and OpenAI's `Categorical` (taking the arg-max of logits plus noise, the Gumbel-max trick)."""
    import jax
    import jax.numpy as jnp
    import whisper.decoding

    import torch_ref.decoding

    model, _ = longform_model
    steps: dict[int, int] = {}

    def noise(seed: int, shape) -> torch.Tensor:
        step = steps.get(seed, 0)
        steps[seed] = step + 1
        key = jax.random.key(seed)
        return torch.tensor(
            np.asarray(jax.random.gumbel(key if step == 0 else jax.random.fold_in(key, step), shape, jnp.float32))
        )

    calls = iter(range(1, 2**31))
    openai_seed = [0]
    decode = model.decode

    def counted(mel, options):  # transcribe() decodes once per window and temperature, as we do
        openai_seed[0] = next(calls) + 1000  # apart from our seeds 1, 2, ...
        return decode(mel, options)

    class Drawn:
        def __init__(self, logits):
            self.logits = logits

        def sample(self) -> torch.Tensor:
            return (self.logits.float() + noise(openai_seed[0] - 1000, tuple(self.logits.shape))).argmax(dim=-1)

    monkeypatch.setattr(model, "decode", counted)
    monkeypatch.setattr(whisper.decoding, "Categorical", Drawn)
    monkeypatch.setattr(torch_ref.decoding, "gumbel", lambda shape, generator: noise(generator.initial_seed(), shape))
    return steps


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("best_of", [None, pytest.param(3, marks=pytest.mark.slow)], ids=["one", "best_of_3"])
def test_temperature_fallback_matches_openai_with_the_same_draws(
    long_speech, longform_model, shared_draws, framework, best_of
):
    """OpenAI's default schedule (0, 0.2, ..., 1.0) with its thresholds: windows whose greedy text
    is too repetitive are decoded again by sampling (one candidate, or `best_of` with the
    likeliest per token kept: a minute and more, so `slow`), and the temperature each window ends
    at, its tokens and the seeks after it are OpenAI's."""
    model, path = longform_model
    options = {} if best_of is None else {"best_of": best_of}
    expected = openai_transcribe(model, load_audio(long_speech), language="en", **options)
    shared_draws.clear()
    transcriber = Transcriber.load(str(path), framework, "en", mode="sequential", best_of=best_of)
    assert_same_transcription(transcribe_file(str(long_speech), transcriber), expected)
    # Not degenerate: some windows fell back, to different temperatures, one beyond 0.5 (after
    # which the next window is decoded without the previous text).
    temperatures = {s["seek"]: s["temperature"] for s in expected["segments"]}
    assert len(set(temperatures.values())) >= 2 and max(temperatures.values()) > 0.5


def test_the_command_transcribes_long_silent_short_and_empty_files_as_openai_does(
    long_speech, longform_model, tmp_path, capsys
):
    """`python -m transcribe` (sequential, the default for a vocabulary with timestamps): pure
    silence and a file shorter than 0.1 s get OpenAI's results, an empty file is reported while
    the others are transcribed, and an unknown language is a usage error before any decoding."""
    import json

    import soundfile

    from transcribe.__main__ import main

    model, path = longform_model
    soundfile.write(tmp_path / "silence.wav", np.zeros(16000 * 5, np.float32), 16000)
    short = load_audio(long_speech)[16000 : 16000 + 800]  # 0.05 s of speech
    soundfile.write(tmp_path / "short.wav", short, 16000)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    files = [str(tmp_path / name) for name in ("silence.wav", "short.wav", "empty.wav")] + [str(long_speech)]
    argv = [*files, "--checkpoint", str(path), "-f", "json", "--language", "en"]
    assert main([*argv, "--temperature-increment-on-fallback", "0"]) == 1
    out, err = capsys.readouterr()
    assert "empty.wav: contains no audio samples" in err and "1 of 4 files could not be read" in err
    results = {r.pop("path"): r for r in map(json.loads, out.splitlines())}
    assert list(results) == [files[0], files[1], files[3]]
    for file, result in results.items():
        expected = openai_transcribe(model, load_audio(file), language="en", temperature=0.0)
        assert_same_transcription(result, expected)
    assert main([*argv, "--language", "xx"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_second_file_of_as_many_windows_compiles_nothing(long_speech, longform_model, tmp_path):
    """Every window runs one decoding program however long its previous-text prompt (prompts are
    padded to the longest, the temperature is traced), and the log-mel of a file is computed on
    its audio padded to whole windows: a second, shorter file of as many 30 s windows (70 s of the
    speech reversed, against 85 s) compiles nothing at all."""
    import soundfile

    _, path = longform_model
    transcriber = Transcriber.load(str(path), "flax", "en", mode="sequential")
    first = transcribe_file(str(long_speech), transcriber)
    assert len({s["seek"] for s in first["segments"]}) >= 3
    assert {s["temperature"] for s in first["segments"]} > {0.0}  # greedy and sampled windows
    audio = load_audio(long_speech)
    soundfile.write(tmp_path / "other.wav", audio[::-1][: 16000 * 70].copy(), 16000)
    with counting_compiles() as compiles:
        second = transcribe_file(str(tmp_path / "other.wav"), transcriber)
        assert compiles == [], f"{len(compiles)} compilations for a file of as many windows"
        assert len({s["seek"] for s in second["segments"]}) >= 2
        soundfile.write(tmp_path / "longer.wav", np.concatenate([audio, audio[: 16000 * 10]]), 16000)
        transcribe_file(str(tmp_path / "longer.wav"), transcriber)  # 4 windows: a new log-mel shape
        assert compiles  # the listener does see compilations


# torch's beam search against OpenAI's stays in the main suite (tests/test_decoding.py, tests/test_transcribe.py)
@pytest.mark.parametrize("framework", ["flax", pytest.param("torch", marks=pytest.mark.slow)])
def test_beam_search_long_form_matches_openai(long_speech, longform_model, framework):
    """Beam search at temperature 0 (`--beam-size 5 --patience 2`, as `openai-whisper`'s command
    searches), window after window with previous-text prompts: OpenAI's segments."""
    from whisper_io.decoding import BeamSearch

    model, path = longform_model
    expected = openai_transcribe(
        model, load_audio(long_speech), language="en", temperature=0.0, beam_size=5, patience=2.0
    )
    transcriber = Transcriber.load(
        str(path), framework, "en", beam=BeamSearch(5, 2.0), mode="sequential",
        long_form=LongFormOptions(temperatures=(0.0,)),
    )  # fmt: skip
    assert_same_transcription(transcribe_file(str(long_speech), transcriber), expected)
    greedy = openai_transcribe(model, load_audio(long_speech), language="en", temperature=0.0)
    assert [s["tokens"] for s in greedy["segments"]] != [s["tokens"] for s in expected["segments"]]


PROMPT = "Seven, three, nine. The north wind."


@pytest.mark.parametrize(
    "settings",
    [
        {"initial_prompt": PROMPT},
        {"condition_on_previous_text": False},
        {"initial_prompt": PROMPT, "carry_initial_prompt": True},
        {"clip_timestamps": (5.0, 40.0, 50.0)},
    ],
    ids=["initial_prompt", "no_previous_text", "carried_prompt", "clips"],
)
def test_prompt_settings_match_openai(long_speech, longform_model, settings):
    """`--initial-prompt` (the first window's prompt, kept out of the text),
    `--condition-on-previous-text False` (every window without the text before it),
    `--carry-initial-prompt True` (the initial prompt before every window's previous text) and
    `--clip-timestamps 5,40,50` (5 s to 40 s, then 50 s to the end), in flax: OpenAI's segments."""
    model, path = longform_model
    expected = openai_transcribe(model, load_audio(long_speech), language="en", temperature=0.0, **settings)
    options = LongFormOptions(temperatures=(0.0,), **settings)
    transcriber = Transcriber.load(str(path), "flax", "en", mode="sequential", long_form=options)
    ours = transcribe_file(str(long_speech), transcriber)
    assert_same_transcription(ours, expected)
    plain = openai_transcribe(model, load_audio(long_speech), language="en", temperature=0.0)
    assert [s["tokens"] for s in plain["segments"]] != [s["tokens"] for s in expected["segments"]]


def assert_same_words(ours: dict, expected: dict) -> None:
    """The same segments and words, each word's start and end within 20 ms of OpenAI's."""
    assert [(s["seek"], s["text"], s["tokens"]) for s in ours["segments"]] == [
        (s["seek"], s["text"], s["tokens"]) for s in expected["segments"]
    ]
    for a, b in zip(ours["segments"], expected["segments"], strict=True):
        assert [w["word"] for w in a["words"]] == [w["word"] for w in b["words"]]
        for mine, theirs in zip(a["words"], b["words"], strict=True):
            assert abs(mine["start"] - theirs["start"]) <= 0.02 + 1e-9, (mine, theirs)
            assert abs(mine["end"] - theirs["end"]) <= 0.02 + 1e-9, (mine, theirs)
            assert mine["probability"] == pytest.approx(theirs["probability"], rel=1e-3, abs=1e-6)
        assert a["start"] == pytest.approx(b["start"], abs=0.02 + 1e-9)
        assert a["end"] == pytest.approx(b["end"], abs=0.02 + 1e-9)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """`longform_model` with its cross-attention queries scaled down to a quarter, so that the
    attention of a token is spread over many frames: the random model's own scores put each
    token's weight on one frame, and OpenAI's alignment then finds no path (every word at -0.02 s)."""
    model = longform_openai_model(query_scale=0.25)
    return model, save_openai_model(model, tmp_path_factory.mktemp("words") / "random.pt")


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_word_timestamps_match_openai(long_speech, word_model, framework, capsys):
    """`--word-timestamps True` (`word_timestamps=True`): words from the cross-attention of the
    alignment heads (here every head of the one decoder layer, OpenAI's rule for a model without
    them), dynamic time warping, punctuation merged, boundaries fitted, and each window's seek
    moved to its last word's end; through the command, its JSON output."""
    import json

    from transcribe.__main__ import main

    model, path = word_model
    audio = load_audio(long_speech)
    expected = openai_transcribe(model, audio, language="en", temperature=0.0, word_timestamps=True)
    argv = [str(long_speech), "--checkpoint", str(path), "--framework", framework, "-f", "json", "--language", "en"]
    assert main([*argv, "--temperature-increment-on-fallback", "0", "--word-timestamps", "True"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert_same_words(ours, expected)
    # Not degenerate: words spread over the recording, and seeks moved to a word's end. (A random
    # model's alignment puts many words at a window's edges; tests/test_timing.py checks the
    # warping on structured matrices.)
    words = [w for s in expected["segments"] for w in s["words"]]
    assert len(words) >= 20 and len({w["start"] for w in words}) >= 5
    assert any(s["seek"] % 3000 for s in expected["segments"])


def test_hallucination_silence_threshold_matches_openai(long_speech, word_model, capsys):
    """`--hallucination-silence-threshold 1` with word timestamps: windows whose words look
    hallucinated (improbable, too short or too long) after a silence are skipped or cut there, as
    OpenAI's `transcribe()` does; here it changes where windows start."""
    import json

    from transcribe.__main__ import main

    model, path = word_model
    audio = load_audio(long_speech)
    settings = dict(language="en", temperature=0.0, word_timestamps=True)
    expected = openai_transcribe(model, audio, hallucination_silence_threshold=1.0, **settings)
    argv = [str(long_speech), "--checkpoint", str(path), "-f", "json", "--language", "en", "--word-timestamps", "True"]
    assert main([*argv, "--temperature-increment-on-fallback", "0", "--hallucination-silence-threshold", "1"]) == 0
    assert_same_words(json.loads(capsys.readouterr().out), expected)
    plain = openai_transcribe(model, audio, **settings)
    assert [s["seek"] for s in plain["segments"]] != [s["seek"] for s in expected["segments"]]
    with pytest.raises(SystemExit):
        main([str(long_speech), "--checkpoint", str(path), "--hallucination-silence-threshold", "1"])
    assert "needs --word-timestamps True" in capsys.readouterr().err


@pytest.mark.parametrize("search", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
@pytest.mark.parametrize("framework", ["flax", pytest.param("torch", marks=pytest.mark.slow)])
def test_several_files_share_batches_and_each_transcribes_as_alone(
    long_speech, longform_model, tmp_path, framework, search
):
    """Sequential mode on three recordings of different lengths (batch size 4), greedy and with
    beam search (5 beams, patience 2): their loops run together, windows at the same
    temperature decoded in shared batches whose rows have prompts of different lengths, and
    each file gets the segments it gets transcribed alone."""
    import soundfile

    from transcribe.pipeline import transcribe_files
    from whisper_io.decoding import BeamSearch

    _, path = longform_model
    audio = load_audio(long_speech)
    paths = [str(long_speech)]
    for name, (begin, end) in {"head.wav": (0, 45), "middle.wav": (20, 70)}.items():
        soundfile.write(tmp_path / name, audio[begin * 16000 : end * 16000], 16000)
        paths.append(str(tmp_path / name))
    transcriber = Transcriber.load(
        str(path), framework, "en", mode="sequential", batch_size=4, long_form=LongFormOptions(temperatures=(0.0,)),
        beam=BeamSearch(5, 2.0) if search == "beam" else None,
    )  # fmt: skip
    alone = {p: transcribe_file(p, transcriber) for p in paths}
    calls = []
    scored = transcriber.scored

    def recording(mel, prompts, options, seed, prompt_length=None, beam=None):
        assert beam == transcriber.beam
        calls.append(np.unique(prompt_length).size)
        return scored(mel, prompts, options, seed, prompt_length, beam)

    transcriber.scored = recording
    together = transcribe_files(paths, transcriber, on_error=pytest.fail)
    assert list(together) == paths
    for p in paths:
        assert_same_transcription(together[p], {**alone[p], "language": "en"})
        assert together[p]["text"] == alone[p]["text"]
    windows = sum(len({s["seek"] for s in alone[p]["segments"]}) for p in paths)
    assert len(calls) < windows  # shared batches, not one call per window
    assert max(calls) > 1  # rows of different prompt lengths in one batch


def test_transcribe_many_batches_requests_of_one_temperature_oldest_first():
    """The scheduler of several loops: every batch holds requests of one temperature, at most
    `batch_size` of them, the oldest pending request always among them; each loop is sent the
    result of its own request and the results come back in the loops' order."""
    from transcribe.sequential import Decoded, Request, transcribe_many

    def loop(index: int, temperatures: list[float]):
        got = []
        for t in temperatures:  # the request's "previous tokens" say whose and which it is
            decoded = yield Request(np.zeros(1), [index, len(got)], t)
            assert decoded.tokens == [index, len(got)] and decoded.temperature == t
            got.append(t)
        return {"index": index, "temperatures": got}

    plans = [[0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.4], [0.0]]
    batches = []

    def decode_many(requests):
        batches.append([r.temperature for r in requests])
        return [Decoded(list(r.previous), 0.0, 0.0, r.temperature, 1.0) for r in requests]

    results = transcribe_many([loop(i, p) for i, p in enumerate(plans)], decode_many, batch_size=2)
    assert results == [{"index": i, "temperatures": p} for i, p in enumerate(plans)]
    assert all(len(set(b)) == 1 and 1 <= len(b) <= 2 for b in batches)
    assert sum(map(len, batches)) == sum(map(len, plans))
    assert batches[0] == [0.0, 0.0]  # the first two loops' first requests
    assert len(batches) < sum(map(len, plans))  # shared
