"""Transcribing files: windows of log-mel, decoded in shared batches, gathered per file.

Each file is read (any format libsndfile reads, mixed to mono, resampled to 16 kHz), cut into
windows of the model's audio context (30 s for Whisper's 1500 positions), turned into log-mel
features by `flax_whisper.audio`, and decoded greedily with the forced Whisper prompt, in
`flax_whisper` or `torch_ref`. Files are streamed: a first pass finds each file's loudest frame
(Whisper's 8-decade floor is set per recording) and its length, a second pass feeds its windows
to the decoder, so memory does not grow with the length of a recording. Windows of all files
share fixed-size batches (the last one padded), so decoding compiles once.

A file's result has `openai-whisper`'s shape: `text`, `language` (detected from its first
window when not given) and `segments`. Each window is one segment for now, its `start` and
`end` the window's bounds in the recording: there is no timestamp decoding, previous-text prompt
or seeking as in Whisper's own `transcribe()` yet.

A file that cannot be read goes to `on_error` with its path; the other files are transcribed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import numpy as np

from flax_whisper.audio import HOP_LENGTH, SAMPLE_RATE, LogMelWindows
from whisper_config import ConfigError, ModelConfig
from whisper_io import AudioFileError, decoding_options, text_tokens, tokenizer_for
from whisper_io.audio_files import stream_audio
from whisper_io.decoding import BeamSearch, DecodingOptions
from whisper_io.tokenizers import Tokenizer


def window_samples(config: ModelConfig) -> int:
    """Audio samples per window: the `2 * n_audio_ctx` mel frames the encoder takes."""
    return 2 * config.n_audio_ctx * HOP_LENGTH


def mel_windows(audio: np.ndarray, config: ModelConfig) -> np.ndarray:
    """audio (N,) 16 kHz -> (ceil(N / window), n_mels, 2 * n_audio_ctx) log-mel windows.

    The audio is zero-padded to whole windows and its spectrogram is taken as one piece, so the
    8-decade floor is set by the loudest frame of the recording, as in Whisper.
    """
    return np.stack(list(LogMelWindows(lambda: [audio], config.n_mels, 2 * config.n_audio_ctx)))


def file_windows(path: str, config: ModelConfig) -> LogMelWindows:
    """The log-mel windows of an audio file, streamed from disk (see `LogMelWindows`). The first
    pass runs here, so an unreadable file raises `AudioFileError` before any window is used."""
    return LogMelWindows(lambda: stream_audio(path), config.n_mels, 2 * config.n_audio_ctx)


@dataclasses.dataclass
class Transcriber:
    """A loaded model with its tokenizer and decoding settings; `decode` runs one batch."""

    config: ModelConfig
    tokenizer: Tokenizer
    prompt: tuple[int, ...]
    options: DecodingOptions
    run: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (mel (B, n_mels, F), prompt (B, P)) -> tokens
    batch_size: int

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
    ) -> Transcriber:
        """The model of `checkpoint` in `framework`, decoding greedily, or with `beam` search."""
        from convert.checkpoints import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        config = ckpt.config
        if config.n_mels not in (80, 128):
            raise ConfigError(f"{checkpoint}: n_mels={config.n_mels}; the log-mel frontend computes 80 or 128 bins")
        tokenizer = tokenizer_for(config)
        prompt, options = decoding_options(tokenizer, config, language, task, max_new_tokens)
        if framework == "flax":
            from convert.core import new_flax_model
            from flax_whisper.decoding import beam_search_decode, greedy_decode

            model = new_flax_model(config, ckpt.tensors)
        elif framework == "torch":
            from convert.core import new_torch_model
            from torch_ref.decoding import beam_search_decode, greedy_decode

            model = new_torch_model(config, ckpt.tensors)
        else:
            raise ValueError(f"framework must be 'flax' or 'torch', got {framework!r}")
        model.eval()

        def run(mel: np.ndarray, prompts: np.ndarray) -> np.ndarray:
            if beam is None:
                return np.asarray(greedy_decode(model, mel, prompts, options))
            return np.asarray(beam_search_decode(model, mel, prompts, options, beam)[0])

        return cls(config, tokenizer, prompt, options, run, batch_size)

    def decode(self, mel: np.ndarray) -> tuple[list[list[int]], list[int]]:
        """mel (n <= batch_size, n_mels, frames) -> (text tokens of each window, prompt language
        tokens), padded to a full batch."""
        n = mel.shape[0]
        batch = np.zeros((self.batch_size, *mel.shape[1:]), np.float32)
        batch[:n] = mel
        tokens = self.run(batch, np.tile(np.asarray(self.prompt), (self.batch_size, 1)))[:n]
        return text_tokens(tokens, len(self.prompt), self.options.eot), tokens[:, 1].tolist()

    def language_of(self, token: int) -> str | None:
        codes = dict(zip(self.tokenizer.language_tokens, self.tokenizer.language_codes, strict=True))
        return codes.get(token)


def transcribe_files(
    paths: Sequence[str], transcriber: Transcriber, on_error: Callable[[AudioFileError], None]
) -> dict[str, dict]:
    """{path: result} for every readable file, in `paths` order (a result as the module says).

    Unreadable files go to `on_error` and are left out; the windows of the rest are decoded in
    shared batches, streamed so that at most a batch of windows is held at a time.
    """
    files: dict[str, LogMelWindows | None] = {}
    for path in dict.fromkeys(paths):
        try:
            files[path] = file_windows(path, transcriber.config)
        except AudioFileError as e:
            on_error(e)

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


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="window", desc="transcribing", disable=None, file=sys.stderr)
