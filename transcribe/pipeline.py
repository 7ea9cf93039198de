"""Transcribing files in one of two modes, with either framework's decoder.

Each file is read (any format libsndfile reads, mixed to mono, resampled to 16 kHz) and turned
into log-mel features by `flax_whisper.audio`, for `flax_whisper` or `torch_ref`.

- "sequential" (`transcribe_file`): OpenAI's `transcribe()` loop (`transcribe.sequential`) over
  the file's whole log-mel: windows from `seek` decoded with timestamps after the previous text,
  temperature fallback, no-speech skipping, segments at timestamp pairs. Prompts are padded to
  one width and the temperature is traced, so a file compiles its programs once, and another
  file of as many windows compiles nothing. Several files run their loops together
  (`transcribe.sequential.transcribe_many`): the windows they ask for at one temperature are
  decoded as one batch, each row with its own prompt length.
- "chunked" (`transcribe.chunked`): overlapping windows of every file, decoded with timestamps in
  batches shared across files and stitched by timestamps: throughput, without previous-text
  prompts or fallback.
- "windows": windows of the model's audio context (30 s for Whisper's 1500 positions) decoded
  independently with the text-only prompt, each one segment. Files are streamed: a first pass
  finds each file's loudest frame (Whisper's 8-decade floor is set per recording) and its
  length, a second pass feeds its windows to the decoder, so memory does not grow with the
  length of a recording; windows of all files share fixed-size batches (the last one padded).

A file's result has `openai-whisper`'s shape: `text`, `language` (detected when not given) and
`segments`. A file that cannot be read goes to `on_error` with its path; the other files are
transcribed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from transcribe.chunked import DEFAULT_OVERLAP, transcribe_chunked, windows_of
from transcribe.sequential import (
    Decoded,
    LongFormOptions,
    Request,
    compression_ratio,
    sequential_steps,
    transcribe_many,
    transcribe_sequential,
)
from transcribe.timing import add_word_timestamps, alignment_heads
from whisper_config import ConfigError, InputError, ModelConfig
from whisper_io import AudioFileError, TokenizerError, decoding_options, text_tokens, tokenizer_for
from whisper_io.audio_files import HOP_LENGTH, SAMPLE_RATE, load_audio, stream_audio
from whisper_io.decoding import BeamSearch, DecodingOptions
from whisper_io.tokenizers import Tokenizer

# JAX loads when audio first becomes features (`_log_mel_windows`), not on import: `python -m
# transcribe` starts itself again before that (whisper_io.huge_pages).
if TYPE_CHECKING:
    from flax_whisper.audio import LogMelWindows


def window_samples(config: ModelConfig) -> int:
    """Audio samples per window: the `2 * n_audio_ctx` mel frames the encoder takes."""
    return 2 * config.n_audio_ctx * HOP_LENGTH


def mel_windows(audio: np.ndarray, config: ModelConfig) -> np.ndarray:
    """audio (N,) 16 kHz -> (ceil(N / window), n_mels, 2 * n_audio_ctx) log-mel windows.

    The audio is zero-padded to whole windows and its spectrogram is taken as one piece, so the
    8-decade floor is set by the loudest frame of the recording, as in Whisper.
    """
    return np.stack(list(_log_mel_windows(lambda: [audio], config)))


def file_windows(path: str, config: ModelConfig) -> LogMelWindows:
    """The log-mel windows of an audio file, streamed from disk (see `LogMelWindows`). The first
    pass runs here, so an unreadable file raises `AudioFileError` before any window is used."""
    return _log_mel_windows(lambda: stream_audio(path), config)


def _log_mel_windows(open_blocks: Callable[[], Iterable[np.ndarray]], config: ModelConfig) -> LogMelWindows:
    """`LogMelWindows` of the audio `open_blocks` yields, as the model's encoder takes them; JAX is
    imported here, when audio first becomes features."""
    from flax_whisper.audio import LogMelWindows

    return LogMelWindows(open_blocks, config.n_mels, 2 * config.n_audio_ctx)


MODES = ("sequential", "chunked", "windows")


@dataclasses.dataclass
class Transcriber:
    """A loaded model with its tokenizer and decoding settings.

    `mode` "sequential" transcribes each file as OpenAI's `transcribe()` does (`transcribe.
    sequential`: timestamps, previous-text prompts, temperature fallback); "windows" decodes
    independent 30 s windows of text, shared in fixed-size batches across files, in constant
    memory however long a file is."""

    config: ModelConfig
    tokenizer: Tokenizer
    prompt: tuple[int, ...]
    options: DecodingOptions
    # (mel (B, n_mels, F), prompt (B, P), options, seed, prompt_length=None, beam=None) -> (tokens,
    # sums of log-probabilities, no-speech probabilities), NumPy; the seed draws samples above 0
    scored: Callable
    batch_size: int
    mode: str = "windows"
    language: str | None = None
    task: str = "transcribe"
    long_form: LongFormOptions = dataclasses.field(default_factory=LongFormOptions)
    best_of: int | None = None  # candidates sampled per window above temperature 0 (best kept)
    max_new_tokens: int | None = None  # per window, at most (None: OpenAI's n_text_ctx // 2)
    beam: BeamSearch | None = None  # beam search (sequential mode: at temperature 0); None: greedy
    # (window (n_mels, F), tokens) -> (logits (T, n_vocab), alignment heads' cross-attention scores
    # (heads, T, F / 2)), NumPy: what word timestamps read (`transcribe.timing`)
    alignment_scores: Callable | None = None
    chunk_overlap: float = DEFAULT_OVERLAP  # chunked mode: seconds of audio on each side of a window's own part

    @classmethod
    def load(
        cls,
        checkpoint: str,
        framework: str = "flax",
        language: str | None = None,
        task: str = "transcribe",
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        beam: BeamSearch | None = None,
        mode: str | None = None,
        long_form: LongFormOptions | None = None,
        best_of: int | None = None,
        chunk_overlap: float = DEFAULT_OVERLAP,
    ) -> Transcriber:
        """The model of `checkpoint` in `framework`, decoding greedily, or with `beam` search.
        `mode` None: "sequential" when the vocabulary has timestamp tokens, else "windows"."""
        from convert.checkpoints import load_checkpoint

        if mode not in (None, *MODES):
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if best_of is not None and best_of < 1:
            raise InputError(f"best_of must be at least 1, got {best_of}")
        ckpt = load_checkpoint(checkpoint)
        config = ckpt.config
        if mode == "chunked" and not 0 <= 2 * chunk_overlap < window_samples(config) / SAMPLE_RATE:
            raise InputError(f"a chunk overlap of {chunk_overlap} s on each side leaves nothing of a window")
        if config.n_mels not in (80, 128):
            raise ConfigError(f"{checkpoint}: n_mels={config.n_mels}; the log-mel frontend computes 80 or 128 bins")
        tokenizer = tokenizer_for(config)
        mode = mode or ("sequential" if tokenizer.timestamp_begin is not None else "windows")
        if mode in ("sequential", "chunked") and tokenizer.timestamp_begin is None:
            raise TokenizerError(f"--mode {mode} needs timestamps; the {tokenizer.name} vocabulary has none")
        if mode != "sequential" and long_form is not None and long_form.word_timestamps:
            raise InputError("word timestamps need --mode sequential")
        prompt, options = decoding_options(tokenizer, config, language, task, max_new_tokens)
        if framework == "flax":
            import jax

            import flax_whisper.decoding as decoding
            from convert.core import new_flax_model
            from flax_whisper import pure_jit

            model = new_flax_model(config, ckpt.tensors)
            randomness = jax.random.key

            @pure_jit
            def cross_scores(model, mel, tokens):
                return model.decoder.cross_attention_scores(tokens, model.encoder(mel))
        elif framework == "torch":
            import torch

            import torch_ref.decoding as decoding
            from convert.core import new_torch_model

            model = new_torch_model(config, ckpt.tensors)

            def randomness(seed: int) -> torch.Generator:
                return torch.Generator().manual_seed(seed)

            @torch.no_grad()
            def cross_scores(model, mel, tokens):
                xa = model.encoder(torch.from_numpy(mel))
                return model.decoder.cross_attention_scores(torch.from_numpy(tokens), xa)

        else:
            raise ValueError(f"framework must be 'flax' or 'torch', got {framework!r}")
        model.eval()

        def scored(mel, prompts, options, seed, prompt_length=None, beam=None):
            if beam is not None:
                decoded = decoding.beam_search_decode(model, mel, prompts, options, beam, prompt_length)
            else:
                random = randomness(seed) if options.temperature > 0 else None
                decoded = decoding.decode_with_scores(model, mel, prompts, options, random, prompt_length)
            return tuple(np.asarray(a) for a in decoded)

        layers, heads = np.asarray(alignment_heads(config)).T

        def alignment_scores(window: np.ndarray, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
            padded = np.full((1, config.n_text_ctx), tokenizer.eot, np.int64)  # one program for every window
            padded[0, : len(tokens)] = tokens
            logits, qk = cross_scores(model, window[None].astype(np.float32), padded)
            return np.asarray(logits)[0, : len(tokens)], np.asarray(qk)[layers, 0, heads, : len(tokens)]

        return cls(
            config, tokenizer, prompt, options, scored, batch_size, mode, language, task,
            long_form or LongFormOptions(), best_of, max_new_tokens, beam, alignment_scores, chunk_overlap,
        )  # fmt: skip

    def decode(self, mel: np.ndarray) -> tuple[list[list[int]], list[int]]:
        """mel (n <= batch_size, n_mels, frames) -> (text tokens of each window, prompt language
        tokens), padded to a full batch."""
        n = mel.shape[0]
        batch = np.zeros((self.batch_size, *mel.shape[1:]), np.float32)
        batch[:n] = mel
        prompts = np.tile(np.asarray(self.prompt), (self.batch_size, 1))
        tokens = self.scored(batch, prompts, self.options, 0, None, self.beam)[0][:n]
        return text_tokens(tokens, len(self.prompt), self.options.eot), tokens[:, 1].tolist()

    def language_of(self, token: int) -> str | None:
        codes = dict(zip(self.tokenizer.language_tokens, self.tokenizer.language_codes, strict=True))
        return codes.get(token)

    def detect_language(self, window: np.ndarray) -> str | None:
        """The language of one window (n_mels, frames), as the likeliest language token after the
        start token; None for a vocabulary without languages."""
        if not self.tokenizer.multilingual:
            return None
        prompt, options = decoding_options(self.tokenizer, self.config, None, self.task, max_new_tokens=1)
        tokens, _, _ = self.scored(window[None], np.asarray([prompt]), options, 0)
        return self.language_of(int(tokens[0, 1]))

    @property
    def window_tokens(self) -> int:
        """New tokens a long-form window decodes at most: `max_new_tokens`, else OpenAI's
        `sample_len` of `n_text_ctx // 2` (cut in the program to the context's room)."""
        return self.config.n_text_ctx // 2 if self.max_new_tokens is None else self.max_new_tokens

    def file_language(self, mel: np.ndarray) -> str | None:
        """The given language, else the one detected from the first window of a file's log-mel
        (which has a window of silence appended, so it always has one)."""
        if self.language is not None or not self.tokenizer.multilingual:
            return self.language
        return self.detect_language(mel[:, : 2 * self.config.n_audio_ctx])

    def chunk_decoder(self, language: str | None) -> Callable[[list[np.ndarray]], list[Decoded]]:
        """`transcribe.chunked`'s `decode_batch` for this model: up to `batch_size` windows with
        timestamps after the text-only prompt (greedy, or beam search with `beam`), padded to a
        full batch so that every call runs one program."""
        config, tokenizer = self.config, self.tokenizer
        prompt, options = decoding_options(tokenizer, config, language, self.task, timestamps=True)
        options = dataclasses.replace(options, max_new_tokens=self.window_tokens)
        prompts = np.tile(np.asarray(prompt), (self.batch_size, 1))

        def decode(windows: list[np.ndarray]) -> list[Decoded]:
            batch = np.zeros((self.batch_size, config.n_mels, 2 * config.n_audio_ctx), np.float32)
            batch[: len(windows)] = windows
            tokens, sums, no_speech = self.scored(batch, prompts, options, 0, None, self.beam)
            rows = text_tokens(tokens[: len(windows)], len(prompt), tokenizer.eot)
            ratios = [compression_ratio(tokenizer.decode_all(row).strip()) for row in rows]
            return [Decoded(row, float(sums[i]), float(no_speech[i]), 0.0, ratios[i]) for i, row in enumerate(rows)]

        return decode

    def window_decoder(self, language: str | None) -> Callable[[np.ndarray, Sequence[int], float], Decoded]:
        """`transcribe.sequential`'s `decode` for this model: a window with timestamps after the
        previous tokens, at a temperature (above 0: `best_of` samples, the likeliest per token
        kept, each call with its own seed). Every prompt is padded to the longest a previous text
        allows and the temperature is traced, so the whole loop runs two programs (greedy and
        sampling; beam search instead of greedy with `beam`) per batch size."""
        many = self.windows_decoder(language)
        return lambda window, previous, temperature: many([Request(window, list(previous), temperature)])[0]

    def windows_decoder(
        self, language: str | None, batch_size: int | None = None
    ) -> Callable[[list[Request]], list[Decoded]]:
        """`transcribe.sequential.transcribe_many`'s `decode_many`: `window_decoder`'s decoding of
        several requests at one temperature, in one batch of `batch_size` (default the
        transcriber's) rows times `best_of` (or beams: beam search at temperature 0 with `beam`),
        their prompts of different lengths."""
        batch_size = batch_size or self.batch_size
        calls = iter(range(1, 2**31))
        config, tokenizer = self.config, self.tokenizer
        base, _ = decoding_options(tokenizer, config, language, self.task, timestamps=True)
        width = config.n_text_ctx // 2 + len(base)  # <|startofprev|>, n_text_ctx // 2 - 1 tokens, the start

        def decode_many(requests: list[Request]) -> list[Decoded]:
            temperature = requests[0].temperature
            beam = self.beam if temperature == 0 else None  # OpenAI: beams at 0, best_of samples above
            settings = dict(timestamps=True, temperature=temperature)
            asked = [decoding_options(tokenizer, config, language, self.task, **settings, previous=r.previous)
                     for r in requests]  # fmt: skip
            # cut to the context's room: the options then differ only by prompt
            options = [dataclasses.replace(o, max_new_tokens=self.window_tokens) for _, o in asked]
            if len(requests) > 1 and len(set(options)) > 1:
                return [decoded for r in requests for decoded in decode_many([r])]
            n = (self.best_of or 1) if temperature > 0 else 1  # rows per request
            rows = n if len(requests) == 1 else n * max(batch_size, len(requests))  # a fixed batch
            padded = np.full((rows, width), tokenizer.eot, np.int32)
            lengths = np.zeros(rows, np.int32)
            mel = np.zeros((rows, *requests[0].window.shape), np.float32)
            for row in range(rows):
                k = min(row // n, len(requests) - 1)  # filler rows repeat the last request
                prompt = asked[k][0]
                padded[row, : len(prompt)], lengths[row], mel[row] = prompt, len(prompt), requests[k].window
            tokens, sums, no_speech = self.scored(mel, padded, options[0], next(calls), lengths, beam)
            results = []
            for k in range(len(requests)):
                size = len(asked[k][0])
                texts = text_tokens(tokens[k * n : (k + 1) * n], size, tokenizer.eot)
                scores = [float(sums[k * n + i]) / max(len(row), 1) for i, row in enumerate(texts)]
                best = int(np.argmax(scores)) if n > 1 else 0
                text = tokenizer.decode_all(texts[best]).strip()
                score, silence = float(sums[k * n + best]), float(no_speech[k * n])
                results.append(Decoded(texts[best], score, silence, temperature, compression_ratio(text)))
            return results

        return decode_many


def file_mel(path: str, config: ModelConfig) -> np.ndarray:
    """A file's whole log-mel with one window of silence appended, as OpenAI's `transcribe()`
    pads it: (n_mels, frames of audio + 2 * n_audio_ctx). Raises `AudioFileError` for a file that
    cannot be read."""
    from flax_whisper.audio import log_mel_spectrogram

    samples = window_samples(config)
    audio = load_audio(path)
    # Computed on the audio padded to whole windows plus one, so files of as many windows share
    # one program; the frames beyond OpenAI's are zeros' (the floor), which can set neither the
    # maximum nor a kept frame.
    padded = np.zeros((-(-len(audio) // samples) + 1) * samples, np.float32)
    padded[: len(audio)] = audio
    return np.asarray(log_mel_spectrogram(padded, config.n_mels))[:, : (len(audio) + samples) // HOP_LENGTH]


def transcribe_file(path: str, transcriber: Transcriber, progress: bool = False) -> dict:
    """One file, sequentially (`transcribe.sequential`): its whole log-mel is computed (with a
    window of silence appended, as OpenAI pads it), its language detected from the first window
    unless given; `progress` shows a bar of the frames done on stderr. Raises `AudioFileError`
    for a file that cannot be read."""
    frames = 2 * transcriber.config.n_audio_ctx
    mel = file_mel(path, transcriber.config)
    language = transcriber.file_language(mel)
    options = transcriber.long_form
    with _progress(mel.shape[1] - frames, "frames", f"transcribing {path}", enabled=progress) as bar:
        result = transcribe_sequential(
            mel, frames, transcriber.window_decoder(language), transcriber.tokenizer, options, bar.update,
            _aligner(transcriber, language), transcriber.config.n_text_ctx,
        )  # fmt: skip
    return {**result, "language": language}


def _aligner(transcriber: Transcriber, language: str | None) -> Callable[[list[dict], np.ndarray, int, float], None]:
    """`transcribe.sequential`'s `align` for this model and a file's language."""
    options = transcriber.long_form

    def align(segments: list[dict], window: np.ndarray, num_frames: int, last_speech: float) -> None:
        add_word_timestamps(
            segments, transcriber.alignment_scores, transcriber.tokenizer, language, transcriber.task, window,
            num_frames, last_speech, options.prepend_punctuations, options.append_punctuations,
        )  # fmt: skip

    return align


def transcribe_files(
    paths: Sequence[str], transcriber: Transcriber, on_error: Callable[[AudioFileError], None]
) -> dict[str, dict]:
    """{path: result} for every readable file, in `paths` order (a result as the module says).

    Unreadable files go to `on_error` and are left out. In "windows" mode the windows of the rest
    are decoded in shared batches, streamed so that at most a batch of windows is held at a time;
    in "chunked" mode the overlapping windows of all files share batches (`transcribe.chunked`);
    in "sequential" mode each file's loop runs as `transcribe_file`'s, several files' loops
    together in shared batches where the model allows (`_transcribe_sequentially`).
    """
    if transcriber.mode == "sequential":
        return _transcribe_sequentially(paths, transcriber, on_error)
    if transcriber.mode == "chunked":
        return _transcribe_chunked(paths, transcriber, on_error)
    files: dict[str, LogMelWindows | None] = _each_readable(
        paths, lambda path: file_windows(path, transcriber.config), on_error
    )

    segments: dict[str, list[dict]] = {}
    languages: dict[str, str | None] = {}
    pending: list[tuple[str, np.ndarray]] = []
    progress = _progress(sum(len(w) for w in files.values()))
    window = window_samples(transcriber.config) / SAMPLE_RATE  # seconds

    def decode() -> None:
        decoded, language_tokens = transcriber.decode(np.stack([w for _, w in pending]))
        for (path, _), tokens, language in zip(pending, decoded, language_tokens, strict=True):
            ours = segments.setdefault(path, [])
            index = len(ours)
            duration = files[path].samples / SAMPLE_RATE
            ours.append({
                "id": index,
                "seek": index * files[path].frames,
                "start": index * window,
                "end": min((index + 1) * window, duration),
                "text": transcriber.tokenizer.decode(tokens),
                "tokens": [int(t) for t in tokens],
            })  # fmt: skip
            languages.setdefault(path, transcriber.language_of(language))
        progress.update(len(pending))
        pending.clear()

    for path, windows in files.items():
        try:
            for mel in windows:
                pending.append((path, mel))
                if len(pending) == transcriber.batch_size:
                    decode()
        except AudioFileError as e:  # the file changed or broke between the two passes
            on_error(e)
            pending[:] = [(p, w) for p, w in pending if p != path]
            segments.pop(path, None)
            files[path] = None
    if pending:
        decode()
    progress.close()
    return {
        path: {
            "text": "".join(s["text"] for s in segments[path]),
            "segments": segments[path],
            "language": languages[path],
        }
        for path, windows in files.items()
        if windows is not None and path in segments
    }


def _transcribe_sequentially(
    paths: Sequence[str], transcriber: Transcriber, on_error: Callable[[AudioFileError], None]
) -> dict[str, dict]:
    """One file after another, or with several files and a batch size above 1, the files of one
    language run their loops together (`transcribe_many`), their windows at the same temperature
    decoded in shared batches (each file's result is the one it gets alone, up to rounding)."""
    if len(paths) < 2 or transcriber.batch_size < 2:
        return _each_readable(paths, lambda path: transcribe_file(path, transcriber, progress=True), on_error)
    frames = 2 * transcriber.config.n_audio_ctx
    mels = _each_readable(paths, lambda path: file_mel(path, transcriber.config), on_error)
    options, context = transcriber.long_form, transcriber.config.n_text_ctx

    def run(language: str | None, group: list[np.ndarray]) -> list[dict]:
        align = _aligner(transcriber, language)
        steps = [
            sequential_steps(mel, frames, transcriber.tokenizer, options, bar.update, align, context) for mel in group
        ]
        batch_size = min(transcriber.batch_size, len(group))  # no more rows than loops
        return transcribe_many(steps, transcriber.windows_decoder(language, batch_size), batch_size)

    with _progress(sum(mel.shape[1] - frames for mel in mels.values()), "frames") as bar:
        return _by_language(mels, transcriber, run)


def _transcribe_chunked(
    paths: Sequence[str], transcriber: Transcriber, on_error: Callable[[AudioFileError], None]
) -> dict[str, dict]:
    """Every readable file's windows, in shared batches (files of one language at a time)."""
    frames = 2 * transcriber.config.n_audio_ctx
    mels = _each_readable(paths, lambda path: file_mel(path, transcriber.config), on_error)
    overlap = transcriber.chunk_overlap

    def run(language: str | None, group: list[np.ndarray]) -> list[dict]:
        return transcribe_chunked(
            group, frames, overlap, transcriber.chunk_decoder(language), transcriber.batch_size,
            transcriber.tokenizer, transcriber.long_form, bar.update,
        )  # fmt: skip

    with _progress(sum(len(windows_of(mel, frames, overlap)) for mel in mels.values())) as bar:
        return _by_language(mels, transcriber, run)


def _by_language(
    mels: dict[str, np.ndarray], transcriber: Transcriber, run: Callable[[str | None, list[np.ndarray]], list[dict]]
) -> dict[str, dict]:
    """{path: result} for the files' whole log-mels `mels`, in order: `run(language, their
    log-mels)` on the files of each language (detected from a file's first window unless given)."""
    groups: dict[str | None, list[str]] = {}
    for path, mel in mels.items():
        groups.setdefault(transcriber.file_language(mel), []).append(path)
    results = {}
    for language, group in groups.items():
        for path, result in zip(group, run(language, [mels[path] for path in group]), strict=True):
            results[path] = {**result, "language": language}
    return {path: results[path] for path in mels}


def _each_readable(paths: Sequence[str], read: Callable[[str], object], on_error) -> dict:
    """{path: read(path)} for each distinct path, in order; a file that cannot be read
    (`AudioFileError`) goes to `on_error` and is left out."""
    results = {}
    for path in dict.fromkeys(paths):
        try:
            results[path] = read(path)
        except AudioFileError as e:
            on_error(e)
    return results


def _progress(total: int, unit: str = "window", desc: str = "transcribing", enabled: bool = True):
    """A progress bar on stderr (shown on a terminal only)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=None if enabled else True, file=sys.stderr)
