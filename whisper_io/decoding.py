"""Decoding settings shared by `flax_whisper.decoding` and `torch_ref.decoding`.

Both frameworks run the same algorithm as OpenAI Whisper's `decode` at temperature 0: feed the
forced prompt (start of transcript, language, task, and no-timestamps unless timestamps are
sampled), then repeatedly take the arg-max of the last logits after suppressing
`suppress_tokens` (and, for the first sampled token only, `blank_tokens`), until every row has
produced end of text or `max_new_tokens` were sampled. Rows that finished keep receiving end of
text.

At a temperature above 0 each token is instead drawn from softmax(logits / temperature) of the
same masked logits (OpenAI's sampling). Alongside the tokens both report each row's sum of the
log-probabilities (log-softmax of the masked logits) of its sampled tokens up to and including
its end of text, and the probability of <|nospeech|> after the start token (OpenAI's
`sum_logprob` and `no_speech_prob`).

With timestamps (`timestamp_begin` set), OpenAI's timestamp rules (`ApplyTimestampRules`) mask
the logits after those suppressions, from the tokens sampled so far: <|notimestamps|> never;
timestamps come in pairs (after a lone timestamp only another timestamp or end of text, after
a pair no timestamp), never decrease, and a segment has nonzero length; the first token is a
timestamp no later than `max_initial_timestamp_index`; and when the timestamps' total
probability exceeds that of the likeliest text token, a timestamp is taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from whisper_config import InputError, ModelConfig
from whisper_io.tokenizers import Tokenizer, TokenizerError


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """Plain ints and tuples, hashable, so that a jitted decoder can take them as static."""

    eot: int
    max_new_tokens: int
    suppress_tokens: tuple[int, ...] = ()
    blank_tokens: tuple[int, ...] = ()  # suppressed at the first sampled position only
    # When given, prompt column 1 is overwritten per row by the arg-max over these ids of the
    # logits after the start token alone (Whisper's language detection).
    language_tokens: tuple[int, ...] = ()
    # Timestamps (see above): None samples text only.
    timestamp_begin: int | None = None
    no_timestamps: int | None = None
    max_initial_timestamp_index: int | None = None
    # 0: the arg-max; above: a sample from softmax(logits / temperature) (a random key needed).
    temperature: float = 0.0
    # The probability of `no_speech` after the prompt's `sot` is reported (OpenAI's no-speech
    # probability); None reports NaN.
    sot: int | None = None
    no_speech: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """OpenAI's beam search settings: `beam_size` beams per utterance; decoding stops once each
    utterance has `round(beam_size * patience)` finished candidates (or at `max_new_tokens`);
    candidates are ranked by sum of log-probabilities over length (`length_penalty` None) or
    over `((5 + length) / 6) ** length_penalty`.

    Each step, every beam proposes its `beam_size + 1` likeliest next tokens; the proposals of an
    utterance are ranked by their sums (ties: beam order, then the proposal's rank); proposals
    ending in end of text are set aside as finished until `beam_size` others have been kept as
    the next beams. At the start all beams are the prompt, so only the first one proposes.
    Utterances with fewer than `beam_size` finished candidates at the end take their remaining
    beams, best first.

    In a batch, each utterance is searched as it would be alone, its prompt of its own length:
    one holding its candidates stops while the others go on. (OpenAI's batched `decode` keeps
    stepping it, which changes its result only when patience < 1, through the beams it ends
    with; its `transcribe()` searches one window at a time.)"""

    beam_size: int = 5
    patience: float = 1.0
    length_penalty: float | None = None

    def __post_init__(self):
        if self.beam_size < 1 or self.patience <= 0:
            raise InputError(f"beam_size must be >= 1 and patience > 0, got {self.beam_size} and {self.patience}")

    @property
    def max_candidates(self) -> int:
        return round(self.beam_size * self.patience)


def max_new_tokens_for(config: ModelConfig, prompt_length: int) -> int:
    """The most tokens that can be sampled after a prompt: every fed token needs a position,
    and the last sampled token is never fed (OpenAI stops at `n_text_ctx + 1` tokens too)."""
    return config.n_text_ctx - prompt_length + 1


def check_decoding_length(config: ModelConfig, prompt_length: int, max_new_tokens: int) -> None:
    most = max_new_tokens_for(config, prompt_length)
    if prompt_length < 1 or max_new_tokens > most:
        raise InputError(
            f"a prompt of {prompt_length} tokens leaves room for at most {most} new tokens "
            f"(n_text_ctx={config.n_text_ctx}), got max_new_tokens={max_new_tokens}"
        )


def checked_prompt_length(config: ModelConfig, width: int, max_new_tokens: int, prompt_length: int | None) -> int:
    """How many of a prompt's `width` columns are its tokens: all (None; then `max_new_tokens` must
    fit after them), or the first `prompt_length` (the rest padding, so that prompts of several
    lengths share one compiled program; `max_new_tokens` is then a most, cut to the room the
    context leaves, as OpenAI stops at `n_text_ctx + 1` tokens)."""
    if prompt_length is None:
        check_decoding_length(config, width, max_new_tokens)
        return width
    if not 1 <= prompt_length <= width <= config.n_text_ctx:
        raise InputError(
            f"prompt_length {prompt_length} must be within the prompt's {width} columns, which the "
            f"context (n_text_ctx={config.n_text_ctx}) must hold"
        )
    return int(prompt_length)


def prompt_lengths(config: ModelConfig, shape: tuple[int, int], max_new_tokens: int, prompt_length) -> np.ndarray:
    """Each row's number of real prompt columns (B,) int32, from `prompt_length`: None (all
    columns), one for every row, or one per row; each checked as `checked_prompt_length` does."""
    batch, width = shape
    if prompt_length is None or np.ndim(prompt_length) == 0:
        return np.full(batch, checked_prompt_length(config, width, max_new_tokens, prompt_length), np.int32)
    lengths = np.asarray(prompt_length)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise InputError(f"prompt_length must be one integer or one per row ({batch}), got {lengths.tolist()}")
    for n in np.unique(lengths):
        checked_prompt_length(config, width, max_new_tokens, int(n))
    return lengths.astype(np.int32)


# Decoding steps between two checks that every row has finished, by the kind of device: a loop
# whose end is decided by data makes a GPU runtime copy the flag to the host and wait for the
# device at every check (XLA's while loop with no known trip count, torch's `bool(tensor)`), so
# the host cannot queue the next step's kernels while the device runs this one. Checking every
# `n` steps runs `n` steps as a loop of known length in between; steps after every row finished
# change nothing, and cost at most `n - 1` steps. CPUs and TPUs (whose loops run on the device)
# gain nothing from it.
CHECK_EVERY = {"gpu": 8, "cuda": 8}


def steps_per_check(device_kind: str, requested: int | None = None) -> int:
    """Decoding steps between checks for `device_kind` (jax's backend or torch's device type):
    `requested` when given (a positive integer), else `CHECK_EVERY`'s (1 where absent)."""
    if requested is None:
        return CHECK_EVERY.get(device_kind, 1)
    if isinstance(requested, bool) or not isinstance(requested, int | np.integer) or requested < 1:
        raise InputError(f"check_every must be a positive integer, got {requested!r}")
    return int(requested)


# OpenAI's window; a timestamp step is CHUNK_SECONDS / n_audio_ctx (0.02 s for its models).
# `max_initial_timestamp` is counted in these steps, as `openai-whisper`'s `decode` counts it;
# its long-form loop (and `transcribe.sequential`) reads a step as 0.02 s (two mel frames), so
# for a model whose n_audio_ctx is not 1500 the two disagree, in both projects alike.
CHUNK_SECONDS = 30.0


def decoding_options(
    tokenizer: Tokenizer,
    config: ModelConfig,
    language: str | None = None,
    task: str = "transcribe",
    max_new_tokens: int | None = None,
    timestamps: bool = False,
    max_initial_timestamp: float | None = 1.0,
    temperature: float = 0.0,
    previous: Sequence[int] = (),
) -> tuple[tuple[int, ...], DecodingOptions]:
    """(prompt, options) for transcribing with `tokenizer`, as OpenAI's defaults do it.

    Without a `language`, a multilingual vocabulary detects one per utterance. `max_new_tokens`
    defaults to OpenAI's `sample_len`, half the text context (`n_text_ctx // 2`: the other half
    is kept for a previous-text prompt), which matching `openai-whisper` token for token needs;
    `max_new_tokens_for(config, len(prompt))` is as many as the context holds. `timestamps`
    samples timestamp tokens (the prompt then ends before <|notimestamps|>), the first no later
    than `max_initial_timestamp` seconds (None: anywhere), as OpenAI's defaults do. `previous`
    tokens (earlier text) go before the start, after <|startofprev|>, at most the last
    `n_text_ctx // 2 - 1` of them, as OpenAI's `prompt` does; the options then sample at most as
    many tokens as the context leaves (OpenAI stops at `n_text_ctx + 1` tokens).
    """
    prompt = tokenizer.sot_sequence(language, task)
    if previous:
        if tokenizer.sot_prev is None:
            raise TokenizerError(f"the {tokenizer.name} vocabulary has no <|startofprev|> token")
        kept = tuple(int(t) for t in previous)[-(config.n_text_ctx // 2 - 1) :]
        prompt = (tokenizer.sot_prev, *kept, *prompt)
    stamps = {}
    if timestamps:
        if tokenizer.timestamp_begin is None or tokenizer.no_timestamps is None:
            raise TokenizerError(f"the {tokenizer.name} vocabulary has no timestamp tokens")
        prompt = prompt[:-1] if prompt[-1] == tokenizer.no_timestamps else prompt
        precision = CHUNK_SECONDS / config.n_audio_ctx
        initial = None if max_initial_timestamp is None else round(max_initial_timestamp / precision)
        stamps = dict(
            timestamp_begin=tokenizer.timestamp_begin,
            no_timestamps=tokenizer.no_timestamps,
            max_initial_timestamp_index=initial,
        )
    default = min(config.n_text_ctx // 2, max_new_tokens_for(config, len(prompt)))
    max_new = default if max_new_tokens is None else max_new_tokens
    check_decoding_length(config, len(prompt), max_new)
    detect = language is None and tokenizer.multilingual
    if detect and previous:
        raise InputError("a previous-text prompt needs a language: detection reads the token after the start")
    options = DecodingOptions(
        eot=tokenizer.eot,
        max_new_tokens=max_new,
        suppress_tokens=tokenizer.suppress_tokens,
        blank_tokens=tokenizer.blank_tokens,
        language_tokens=tokenizer.language_tokens if detect else (),
        temperature=float(temperature),
        sot=tokenizer.sot,
        no_speech=tokenizer.no_speech,
        **stamps,
    )
    return prompt, options


def text_tokens(tokens, prompt_length: int, eot: int) -> list[list[int]]:
    """Decoded ids (B, prompt_length + max_new_tokens) -> each row's sampled ids before end of text."""
    rows = []
    for row in np.asarray(tokens)[:, prompt_length:].tolist():
        rows.append(row[: row.index(eot)] if eot in row else row)
    return rows
