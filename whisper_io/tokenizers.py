"""Tokenizers behind one small interface, chosen from a model's vocabulary size.

- `WhisperTokenizer`: OpenAI Whisper's tiktoken vocabularies (GPT-2 for `.en` models, the
  multilingual one otherwise) with Whisper's special tokens, read from the `openai-whisper`
  package. That package's `__init__` imports torch, but its tokenizer module needs only
  `tiktoken`, so it is loaded on its own: the JAX path stays torch-free.
- `ByteTokenizer`: UTF-8 bytes (ids 0-255) plus end-of-text (256) and start-of-transcript (257),
  for models trained from scratch; no vocabulary file, no download.

Both give what training and greedy decoding need: `encode`/`decode` of text, the forced start
sequence, the tokens never to sample (`suppress_tokens`) and those not to sample first
(`blank_tokens`), as Whisper's own decoder uses them.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from whisper_config import ModelConfig

TASKS = ("transcribe", "translate")
WHISPER_EN_VOCAB = 51864  # GPT-2's 50257 tokens + Whisper's specials (99 languages)
WHISPER_TEXT_VOCAB = 51765  # n_vocab minus language tokens (OpenAI's `num_languages` rule)


class TokenizerError(ValueError):
    """No tokenizer fits a model, or a tokenizer option is invalid."""


class Tokenizer:
    """The interface: ids of the special tokens, text in and out, and decoding constraints."""

    name: str
    eot: int  # end of text
    sot: int  # start of transcript
    vocab_size: int  # ids this tokenizer can produce; a model needs n_vocab >= vocab_size
    language_codes: tuple[str, ...] = ()  # codes with a language token, in id order
    language_tokens: tuple[int, ...] = ()
    no_timestamps: int | None = None  # <|notimestamps|>, the last token of a text-only prompt
    timestamp_begin: int | None = None  # <|0.00|>; every id from it on is a timestamp
    no_speech: int | None = None  # <|nospeech|>, whose probability after the start says "silence"
    sot_prev: int | None = None  # <|startofprev|>, which opens a previous-text prompt

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of the ordinary tokens in `ids`; special tokens are skipped."""
        raise NotImplementedError

    def decode_all(self, ids) -> str:
        """Text of `ids` but timestamps, special tokens written out (what OpenAI's compression
        ratio check reads)."""
        return self.decode(ids)

    def sot_sequence(self, language: str | None = None, task: str = "transcribe") -> tuple[int, ...]:
        """The forced decoder prompt: start of transcript, then language and task where the
        vocabulary has them, then no-timestamps (the text-only mode)."""
        raise NotImplementedError

    @property
    def suppress_tokens(self) -> tuple[int, ...]:
        """Ids never sampled (Whisper's default `suppress_tokens="-1"` set)."""
        raise NotImplementedError

    def split_to_word_tokens(self, ids: list[int], language: str | None = None) -> tuple[list[str], list[list[int]]]:
        """`ids` cut into words, each with its tokens (what word timestamps are given to)."""
        raise TokenizerError(f"the {self.name} vocabulary has no word splitting (word timestamps need Whisper's)")

    @property
    def blank_tokens(self) -> tuple[int, ...]:
        """Ids not sampled as the first text token: a lone space and end of text."""
        return (*self.encode(" "), self.eot)

    @property
    def multilingual(self) -> bool:
        return bool(self.language_tokens)


@functools.cache
def _openai_tokenizer_module() -> ModuleType:
    """`whisper/tokenizer.py` from the openai-whisper package, without running `whisper/__init__`."""
    if "whisper.tokenizer" in sys.modules:
        return sys.modules["whisper.tokenizer"]
    spec = importlib.util.find_spec("whisper")
    locations = [] if spec is None else list(spec.submodule_search_locations or [])
    path = Path(locations[0]) / "tokenizer.py" if locations else None
    if path is None or not (path.parent / "assets" / "multilingual.tiktoken").is_file():
        raise TokenizerError(
            "the Whisper tokenizer needs the openai-whisper package (pip install openai-whisper, "
            "or `pip install tiktoken && pip install --no-deps openai-whisper` to avoid pulling torch)"
        )
    module_spec = importlib.util.spec_from_file_location("_openai_whisper_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class WhisperTokenizer(Tokenizer):
    """OpenAI Whisper's tokenizer for a vocabulary of `n_vocab` ids (51864 `.en`, 51865, 51866 v3)."""

    def __init__(self, n_vocab: int):
        if n_vocab < WHISPER_EN_VOCAB:
            raise TokenizerError(f"Whisper vocabularies have at least {WHISPER_EN_VOCAB} ids, got n_vocab={n_vocab}")
        self._module = _openai_tokenizer_module()
        self._is_multilingual = is_multilingual = n_vocab >= WHISPER_EN_VOCAB + 1
        self.num_languages = n_vocab - WHISPER_TEXT_VOCAB - int(is_multilingual)
        if self.num_languages > len(self._module.LANGUAGES):
            raise TokenizerError(f"n_vocab={n_vocab} implies {self.num_languages} languages; Whisper knows fewer")
        self._base = self._get(language=None, task=None)
        self.name = "whisper-multilingual" if is_multilingual else "whisper-gpt2"
        self.eot, self.sot = self._base.eot, self._base.sot
        self.vocab_size = self._base.encoding.n_vocab
        self.no_timestamps = self._base.no_timestamps
        self.timestamp_begin = self._base.timestamp_begin
        self.no_speech = self._base.no_speech
        self.sot_prev, self.transcribe, self.translate = (
            self._base.sot_prev,
            self._base.transcribe,
            self._base.translate,
        )
        if is_multilingual:
            self.language_tokens = tuple(self._base.all_language_tokens)
            self.language_codes = tuple(self._base.all_language_codes)

    def _get(self, language, task):
        try:
            return self._module.get_tokenizer(
                self._is_multilingual, num_languages=self.num_languages, language=language, task=task
            )
        except ValueError as e:  # unknown language
            raise TokenizerError(str(e)) from None

    def encode(self, text: str) -> list[int]:
        return self._base.encoding.encode(text)

    def decode(self, ids) -> str:
        return self._base.encoding.decode([int(i) for i in ids if int(i) < self.eot])

    def decode_all(self, ids) -> str:
        return self._base.encoding.decode([int(i) for i in ids if int(i) < self.timestamp_begin])

    def sot_sequence(self, language: str | None = None, task: str = "transcribe") -> tuple[int, ...]:
        if task not in TASKS:
            raise TokenizerError(f"task must be one of {TASKS}, got {task!r}")
        if not self._is_multilingual:
            if language not in (None, "en", "english") or task != "transcribe":
                raise TokenizerError("an English-only (.en) Whisper vocabulary has no language or task tokens")
            return tuple(self._base.sot_sequence_including_notimestamps)
        # Without a language the "en" slot is a placeholder that language detection overwrites.
        return tuple(self._get(language or "en", task).sot_sequence_including_notimestamps)

    def split_to_word_tokens(self, ids: list[int], language: str | None = None) -> tuple[list[str], list[list[int]]]:
        """OpenAI's split: at spaces and punctuation, or at every whole unicode character for
        languages written without spaces (zh, ja, th, lo, my, yue)."""
        tokenizer = self._get(language, None) if self._is_multilingual else self._base
        return tokenizer.split_to_word_tokens([int(i) for i in ids])

    @property
    def suppress_tokens(self) -> tuple[int, ...]:
        base = self._base
        ids = {*base.non_speech_tokens, base.transcribe, base.translate, base.sot, base.sot_prev, base.sot_lm}
        ids.add(base.no_speech)
        return tuple(sorted(ids))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, end of text 256, start of transcript 257.

    A model may have more ids than the 258 used (e.g. padded to a multiple of 64); the extra ids
    are suppressed when decoding.
    """

    name = "bytes"
    eot = 256
    sot = 257
    vocab_size = 258

    def __init__(self, n_vocab: int = 258):
        if n_vocab < self.vocab_size:
            raise TokenizerError(f"the byte-level tokenizer needs n_vocab >= {self.vocab_size}, got {n_vocab}")
        self.n_vocab = n_vocab

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def sot_sequence(self, language: str | None = None, task: str = "transcribe") -> tuple[int, ...]:
        if language is not None or task != "transcribe":
            raise TokenizerError("the byte-level tokenizer has no language or task tokens")
        return (self.sot,)

    @property
    def suppress_tokens(self) -> tuple[int, ...]:
        return (self.sot, *range(self.vocab_size, self.n_vocab))


def tokenizer_for(config: ModelConfig) -> Tokenizer:
    """The tokenizer a model's vocabulary was built for: Whisper's when `n_vocab >= 51864`, else
    bytes. The config's decoder start token must be that tokenizer's start of transcript."""
    whisper_sized = config.n_vocab >= WHISPER_EN_VOCAB
    tokenizer = WhisperTokenizer(config.n_vocab) if whisper_sized else ByteTokenizer(config.n_vocab)
    if config.start_token_id != tokenizer.sot:
        raise TokenizerError(
            f"n_vocab={config.n_vocab} selects the {tokenizer.name} tokenizer, whose start of transcript is "
            f"{tokenizer.sot}, but the config's decoder_start_token_id is {config.start_token_id}"
        )
    return tokenizer
