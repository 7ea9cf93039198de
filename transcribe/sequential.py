"""Long-form transcription as OpenAI's `transcribe()` does it, for any framework's decoder.

A recording's log-mel (with 30 s of silence appended, as OpenAI pads it) is read window by
window from `seek`: each window is decoded with timestamps, conditioned on the text decoded so
far (a previous-text prompt), at the first temperature whose result passes the checks (its text
compresses by at most `compression_ratio_threshold`, its average log-probability is at least
`logprob_threshold`, or it is silence: a no-speech probability above `no_speech_threshold`). The
window's tokens are cut into segments at consecutive timestamp pairs and `seek` moves to the
last timestamp, or past the window when it ends in a lone timestamp or has none. A window that
is silence (no-speech probability above the threshold and a low average log-probability) is
skipped. After a window decoded above temperature 0.5 (or always, without
`condition_on_previous_text`) the prompt starts afresh.

`decode(window, previous, temperature)` is the one framework-specific part: it decodes one
window (n_mels, frames) after the `previous` tokens and returns a `Decoded`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from flax_whisper.audio import HOP_LENGTH, SAMPLE_RATE
from transcribe.timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, last_word_end
from whisper_config import InputError
from whisper_io.tokenizers import Tokenizer

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclasses.dataclass(frozen=True)
class LongFormOptions:
    """OpenAI `transcribe()`'s settings, with its defaults."""

    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS

    def __post_init__(self):
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            raise InputError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One window's decoding: its sampled tokens before end of text and their scores."""

    tokens: list[int]
    sum_logprob: float  # of the sampled tokens and the end of text
    no_speech_prob: float
    temperature: float
    compression_ratio: float

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


def compression_ratio(text: str) -> float:
    """How much zlib shrinks `text` (UTF-8): repetitive decodings compress well (OpenAI's check)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def needs_fallback(result: Decoded, options: LongFormOptions) -> bool:
    """Whether to decode the window again at the next temperature (OpenAI's rules)."""
    low = options.logprob_threshold is not None and result.avg_logprob < options.logprob_threshold
    repetitive = (
        options.compression_ratio_threshold is not None
        and result.compression_ratio > options.compression_ratio_threshold
    )
    silence = options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold and low
    return (repetitive or low) and not silence


def is_silence(result: Decoded, options: LongFormOptions) -> bool:
    """Whether the window is skipped: likely no speech, and not a confident decoding."""
    if options.no_speech_threshold is None or result.no_speech_prob <= options.no_speech_threshold:
        return False
    return not (options.logprob_threshold is not None and result.avg_logprob > options.logprob_threshold)


def transcribe_sequential(
    mel: np.ndarray,
    frames: int,
    decode: Callable[[np.ndarray, Sequence[int], float], Decoded],
    tokenizer: Tokenizer,
    options: LongFormOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
    align: Callable[[list[dict], np.ndarray, int, float], None] | None = None,
) -> dict:
    """mel (n_mels, content frames + `frames`): a recording's log-mel with `frames` of padding
    (one window of 30 s silence) -> {"text", "segments"} as OpenAI's `transcribe()` returns them.
    `on_progress(frames)` is told how far `seek` moved after each window. With
    `options.word_timestamps`, `align(segments, window, frames, last speech end)` gives one
    window's segments their `words` (`transcribe.timing.add_word_timestamps`), and `seek` moves
    to the end of the last word unless the window ended in a lone timestamp."""
    options = options or LongFormOptions()
    begin = tokenizer.timestamp_begin
    if begin is None:
        raise InputError(f"long-form transcription needs timestamps; the {tokenizer.name} vocabulary has none")
    content = mel.shape[-1] - frames
    stride = 2  # mel frames per encoder position, so per timestamp step
    precision = stride * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp step: 0.02
    initial = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
    all_tokens, segments = list(initial), []
    prompt_since, seek, last_speech = 0, 0, 0.0
    if options.word_timestamps and align is None:
        raise InputError("word timestamps need an aligner (the model's cross-attention scores)")

    def decode_with_fallback(window: np.ndarray, previous: list[int]) -> Decoded:
        for temperature in options.temperatures:
            result = decode(window, previous, temperature)
            if not needs_fallback(result, options):
                break
        return result

    while seek < content:
        offset = seek * HOP_LENGTH / SAMPLE_RATE
        size = min(frames, content - seek)
        window = np.zeros((mel.shape[0], frames), np.float32)  # OpenAI pads a short window with zeros
        window[:, :size] = mel[:, seek : seek + size]
        result = decode_with_fallback(window, all_tokens[prompt_since:])
        if is_silence(result, options):
            seek += size
            if on_progress:
                on_progress(size)
            continue

        previous_seek = seek
        tokens = result.tokens
        stamps = [t >= begin for t in tokens]
        single_ending = stamps[-2:] == [False, True]
        cuts = [i + 1 for i in range(len(tokens) - 1) if stamps[i] and stamps[i + 1]]
        window_segments = []
        if cuts:
            if single_ending:
                cuts.append(len(tokens))
            last = 0
            for cut in cuts:
                ids = tokens[last:cut]
                start, end = (ids[0] - begin) * precision, (ids[-1] - begin) * precision
                window_segments.append(_segment(seek, offset + start, offset + end, ids, result, tokenizer))
                last = cut
            seek += size if single_ending else (tokens[last - 1] - begin) * stride
        else:
            duration = size * HOP_LENGTH / SAMPLE_RATE
            times = [t for t in tokens if t >= begin]
            if times and times[-1] != begin:
                duration = (times[-1] - begin) * precision
            window_segments.append(_segment(seek, offset, offset + duration, tokens, result, tokenizer))
            seek += size

        if options.word_timestamps:
            align(window_segments, window, size, last_speech)
            end = last_word_end(window_segments)
            if not single_ending and end is not None and end > offset:
                seek = round(end * SAMPLE_RATE / HOP_LENGTH)
            if end is not None:
                last_speech = end
        for s in window_segments:  # an instantaneous or empty segment keeps its times only
            if s["start"] == s["end"] or not s["text"].strip():
                s["text"], s["tokens"] = "", []
                if options.word_timestamps:
                    s["words"] = []
        segments.extend({"id": i, **s} for i, s in enumerate(window_segments, start=len(segments)))
        all_tokens.extend(t for s in window_segments for t in s["tokens"])
        if not options.condition_on_previous_text or result.temperature > 0.5:
            prompt_since = len(all_tokens)
        if on_progress:
            on_progress(min(content, seek) - previous_seek)

    return {"text": tokenizer.decode_all(all_tokens[len(initial) :]), "segments": segments}


def _segment(seek: int, start: float, end: float, ids: list[int], result: Decoded, tokenizer: Tokenizer) -> dict:
    """One segment of OpenAI's result: where its window began, its times, text and tokens, and the
    scores of the window's decoding."""
    return {
        "seek": seek,
        "start": start,
        "end": end,
        "text": tokenizer.decode([t for t in ids if t < tokenizer.eot]),
        "tokens": list(ids),
        "temperature": result.temperature,
        "avg_logprob": result.avg_logprob,
        "compression_ratio": result.compression_ratio,
        "no_speech_prob": result.no_speech_prob,
    }
