"""`python -m flax_whisper.transcribe AUDIO... --checkpoint CKPT`: one greedy transcript per file.

Each file is read (any format libsndfile reads, mixed to mono, resampled to 16 kHz), cut into
windows of the model's audio context (30 s for Whisper's 1500 positions), turned into log-mel
features by `flax_whisper.audio`, and decoded greedily with the forced Whisper prompt. Windows of
all files share fixed-size batches (the last one padded), so decoding compiles once. The texts of
a file's windows are joined with spaces: there is no timestamp-based segmentation or
previous-window prompt as in Whisper's own `transcribe`.

A file that cannot be read is reported on stderr with its path; the other files are still
transcribed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence

import numpy as np

from flax_whisper.audio import HOP_LENGTH, log_mel_spectrogram
from whisper_config import ConfigError, InputError, ModelConfig
from whisper_io import AudioFileError, TokenizerError, decoding_options, load_audio, text_tokens, tokenizer_for
from whisper_io.decoding import DecodingOptions
from whisper_io.tokenizers import TASKS, Tokenizer


def window_samples(config: ModelConfig) -> int:
    """Audio samples per window: the `2 * n_audio_ctx` mel frames the encoder takes."""
    return 2 * config.n_audio_ctx * HOP_LENGTH


def mel_windows(audio: np.ndarray, config: ModelConfig) -> np.ndarray:
    """audio (N,) 16 kHz -> (ceil(N / window), n_mels, 2 * n_audio_ctx) log-mel windows.

    The audio is zero-padded to whole windows and its spectrogram is taken in one piece, so the
    8-decade floor is set by the loudest frame of the file, as in Whisper.
    """
    size = window_samples(config)
    n_windows = max(1, math.ceil(len(audio) / size))
    padded = np.zeros(n_windows * size, np.float32)
    padded[: len(audio)] = audio
    mel = np.asarray(log_mel_spectrogram(padded, config.n_mels))  # (n_mels, n_windows * frames)
    return np.array(mel.reshape(config.n_mels, n_windows, -1).transpose(1, 0, 2))  # a writable copy


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
    ) -> Transcriber:
        from convert.checkpoints import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        config = ckpt.config
        if config.n_mels not in (80, 128):
            raise ConfigError(f"{checkpoint}: n_mels={config.n_mels}; the log-mel frontend computes 80 or 128 bins")
        tokenizer = tokenizer_for(config)
        prompt, options = decoding_options(tokenizer, config, language, task, max_new_tokens)
        if framework == "flax":
            from convert.core import new_flax_model
            from flax_whisper.decoding import greedy_decode

            model = new_flax_model(config, ckpt.tensors)
        elif framework == "torch":
            from convert.core import new_torch_model
            from torch_ref.decoding import greedy_decode

            model = new_torch_model(config, ckpt.tensors)
        else:
            raise ValueError(f"framework must be 'flax' or 'torch', got {framework!r}")
        model.eval()

        def run(mel: np.ndarray, prompts: np.ndarray) -> np.ndarray:
            return np.asarray(greedy_decode(model, mel, prompts, options))

        return cls(config, tokenizer, prompt, options, run, batch_size)

    def decode(self, mel: np.ndarray) -> tuple[list[str], list[int]]:
        """mel (n <= batch_size, n_mels, frames) -> (texts, prompt language tokens), padded to a full batch."""
        n = mel.shape[0]
        batch = np.zeros((self.batch_size, *mel.shape[1:]), np.float32)
        batch[:n] = mel
        tokens = self.run(batch, np.tile(np.asarray(self.prompt), (self.batch_size, 1)))[:n]
        texts = [self.tokenizer.decode(ids).strip() for ids in text_tokens(tokens, len(self.prompt), self.options.eot)]
        return texts, tokens[:, 1].tolist()

    def language_of(self, token: int) -> str | None:
        codes = dict(zip(self.tokenizer.language_tokens, self.tokenizer.language_codes, strict=True))
        return codes.get(token)


def transcribe_files(
    paths: Sequence[str], transcriber: Transcriber, on_error: Callable[[AudioFileError], None]
) -> dict[str, dict]:
    """{path: {"text", "language", "windows"}} for every readable file, in `paths` order.

    Unreadable files go to `on_error` and are left out; the rest are batched together.
    """
    windows: list[tuple[str, np.ndarray]] = []
    for path in paths:
        try:
            audio = load_audio(path)
        except AudioFileError as e:
            on_error(e)
            continue
        windows.extend((path, w) for w in mel_windows(audio, transcriber.config))

    texts: dict[str, list[str]] = {}
    languages: dict[str, str | None] = {}
    progress = _progress(len(windows))
    for start in range(0, len(windows), transcriber.batch_size):
        chunk = windows[start : start + transcriber.batch_size]
        decoded, language_tokens = transcriber.decode(np.stack([w for _, w in chunk]))
        for (path, _), text, token in zip(chunk, decoded, language_tokens, strict=True):
            texts.setdefault(path, []).append(text)
            languages.setdefault(path, transcriber.language_of(token))
        progress.update(len(chunk))
    progress.close()
    return {
        path: {"text": " ".join(t for t in texts[path] if t), "language": languages[path], "windows": len(texts[path])}
        for path in dict.fromkeys(paths)
        if path in texts
    }


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="window", desc="transcribing", disable=None, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flax_whisper.transcribe",
        description="Transcribe audio files greedily with a checkpoint of any format `convert` reads "
        "(flax or torch directory, OpenAI .pt). Prints `PATH: TEXT` per file.",
    )
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3, ...; any sample rate)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or OpenAI .pt file")
    parser.add_argument(
        "--framework", choices=("flax", "torch"), default="flax", help="flax_whisper (default) or torch_ref"
    )
    parser.add_argument(
        "--language", help="language code, e.g. en (default: detected per window if the vocabulary has languages)"
    )
    parser.add_argument("--task", choices=TASKS, default="transcribe")
    parser.add_argument("--batch-size", type=int, default=8, help="windows decoded together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens sampled per window (default: what n_text_ctx holds)")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per file instead of PATH: TEXT")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    try:
        transcriber = Transcriber.load(
            args.checkpoint, args.framework, args.language, args.task, args.batch_size, args.max_new_tokens
        )
    except (ConfigError, InputError, TokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    failed = []

    def report(error: AudioFileError) -> None:
        failed.append(error.path)
        print(f"error: {error}", file=sys.stderr)

    results = transcribe_files(args.audio, transcriber, report)
    for path, result in results.items():
        print(json.dumps({"path": path, **result}, ensure_ascii=False) if args.jsonl else f"{path}: {result['text']}")
    if failed:
        print(f"{len(failed)} of {len(args.audio)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
