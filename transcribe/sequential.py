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
`condition_on_previous_text`) the prompt starts afresh. `clip_timestamps` limits the loop to
parts of the recording; `carry_initial_prompt` starts every prompt with the initial one; with
word timestamps, `seek` moves to the last word's end, and `hallucination_silence_threshold`
skips silences around words that look hallucinated.

`decode(window, previous, temperature)` is the one framework-specific part: it decodes one
window (n_mels, frames) after the `previous` tokens and returns a `Decoded`. The loop itself
(`sequential_steps`) asks for one such decoding at a time, so that `transcribe_sequential`
drives one recording and `transcribe_many` several at once, decoding the windows the recordings
ask for at the same temperature in shared batches.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Generator, Sequence

import numpy as np

from transcribe.timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, last_word_end
from whisper_config import InputError
from whisper_io.audio_files import FRAMES_PER_SECOND, HOP_LENGTH, SAMPLE_RATE
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
    # Seconds: start, end, start, end, ... of the parts to transcribe (an odd count ends at the
    # end of the file).
    clip_timestamps: tuple[float, ...] = (0.0,)
    carry_initial_prompt: bool = False  # the initial prompt starts every window's prompt
    # With word timestamps: skip silences longer than this (seconds) around likely hallucinations.
    hallucination_silence_threshold: float | None = None

    def __post_init__(self):
        if not self.temperatures or any(not t >= 0 for t in self.temperatures):
            raise InputError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if any(not 0 <= t < float("inf") for t in self.clip_timestamps):
            raise InputError(f"clip timestamps must be seconds >= 0, got {self.clip_timestamps}")
        if self.hallucination_silence_threshold is not None and not self.word_timestamps:
            raise InputError("the hallucination silence threshold needs word timestamps")


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


@dataclasses.dataclass(frozen=True)
class Request:
    """One decoding the loop asks for: `window` (n_mels, frames) after the `previous` tokens."""

    window: np.ndarray
    previous: list[int]
    temperature: float


def transcribe_sequential(
    mel: np.ndarray,
    frames: int,
    decode: Callable[[np.ndarray, Sequence[int], float], Decoded],
    tokenizer: Tokenizer,
    options: LongFormOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
    align: Callable[[list[dict], np.ndarray, int, float], None] | None = None,
    text_context: int = 448,
) -> dict:
    """mel (n_mels, content frames + `frames`): a recording's log-mel with `frames` of padding
    (one window of 30 s silence) -> {"text", "segments"} as OpenAI's `transcribe()` returns them.
    `on_progress(frames)` is told how far `seek` moved after each window. With
    `options.word_timestamps`, `align(segments, window, frames, last speech end)` gives one
    window's segments their `words` (`transcribe.timing.add_word_timestamps`), and `seek` moves
    to the end of the last word unless the window ended in a lone timestamp. `text_context` is
    the decoder's `n_text_ctx` (how much previous text a prompt holds)."""
    steps = sequential_steps(mel, frames, tokenizer, options, on_progress, align, text_context)
    try:
        request = next(steps)
        while True:
            request = steps.send(decode(request.window, request.previous, request.temperature))
    except StopIteration as finished:
        return finished.value


def transcribe_many(
    steps: Sequence[Generator[Request, Decoded, dict]],
    decode_many: Callable[[list[Request]], list[Decoded]],
    batch_size: int,
) -> list[dict]:
    """Several recordings' loops (`sequential_steps`) at once -> their results, in order. Each
    round, the oldest pending request and up to `batch_size - 1` others at the same temperature
    go to `decode_many` as one batch; a loop whose window is decoded asks for its next."""
    pending: dict[int, Request] = {}
    results: dict[int, dict] = {}

    def advance(index: int, decoded: Decoded | None) -> None:
        try:
            pending[index] = next(steps[index]) if decoded is None else steps[index].send(decoded)
        except StopIteration as finished:
            results[index] = finished.value

    for index in range(len(steps)):
        advance(index, None)
    while pending:
        temperature = next(iter(pending.values())).temperature
        chosen = [i for i, r in pending.items() if r.temperature == temperature][:batch_size]
        requests = [pending.pop(i) for i in chosen]
        for index, decoded in zip(chosen, decode_many(requests), strict=True):
            advance(index, decoded)
    return [results[i] for i in range(len(steps))]


def sequential_steps(
    mel: np.ndarray,
    frames: int,
    tokenizer: Tokenizer,
    options: LongFormOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
    align: Callable[[list[dict], np.ndarray, int, float], None] | None = None,
    text_context: int = 448,
) -> Generator[Request, Decoded, dict]:
    """The loop of `transcribe_sequential` (the same arguments but `decode`) as a generator: it
    yields each `Request`, is sent its `Decoded`, and returns the result."""
    options = options or LongFormOptions()
    begin = tokenizer.timestamp_begin
    if begin is None:
        raise InputError(f"long-form transcription needs timestamps; the {tokenizer.name} vocabulary has none")
    if options.word_timestamps and align is None:
        raise InputError("word timestamps need an aligner (the model's cross-attention scores)")
    content = mel.shape[-1] - frames
    initial = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
    remaining = text_context // 2 - 1 - len(initial)  # of the previous text, with a carried initial prompt
    all_tokens, segments = list(initial), []
    prompt_since, last_speech = 0, 0.0
    clips = seek_clips(options.clip_timestamps, content)
    clip, seek = 0, clips[0][0]

    def decode_with_fallback(window: np.ndarray, previous: list[int]):
        for temperature in options.temperatures:
            result = yield Request(window, previous, temperature)
            if not needs_fallback(result, options):
                break
        return result

    while clip < len(clips):
        clip_start, clip_end = clips[clip]
        seek = max(seek, clip_start)
        if seek >= clip_end:
            clip += 1
            if clip < len(clips):
                seek = clips[clip][0]
            continue
        offset = seek * HOP_LENGTH / SAMPLE_RATE
        size = min(frames, content - seek, clip_end - seek)
        window = padded_window(mel, seek, size, frames)
        if options.carry_initial_prompt:
            previous = initial + all_tokens[max(len(initial), prompt_since) :][-remaining:]
        else:
            previous = all_tokens[prompt_since:]
        result = yield from decode_with_fallback(window, previous)
        if is_silence(result, options):
            seek += size
            if on_progress:
                on_progress(size)
            continue

        previous_seek = seek
        pieces, consumed, single_ending = cut_segments(result.tokens, begin, size)
        window_segments = [_segment(seek, offset + a, offset + b, ids, result, tokenizer) for a, b, ids in pieces]
        seek += consumed

        if options.word_timestamps:
            align(window_segments, window, size, last_speech)
            end = last_word_end(window_segments)
            if not single_ending and end is not None and end > offset:
                seek = round(end * FRAMES_PER_SECOND)
            threshold = options.hallucination_silence_threshold
            if threshold is not None:
                seek, skip = _hallucination_seek(
                    window_segments, threshold, seek, previous_seek, frames, size, content, last_speech, single_ending
                )
                if skip:
                    continue
            end = last_word_end(window_segments)
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


def padded_window(mel: np.ndarray, start: int, size: int, frames: int) -> np.ndarray:
    """`size` mel frames of `mel` (n_mels, F) from `start`, zero-padded to `frames` (as OpenAI
    pads a short window: zeros, not silence's log-mel)."""
    window = np.zeros((mel.shape[0], frames), np.float32)
    window[:, :size] = mel[:, start : start + size]
    return window


def cut_segments(tokens: list[int], begin: int, size: int) -> tuple[list[tuple[float, float, list[int]]], int, bool]:
    """One window's tokens (`size` mel frames of audio) -> its segments (start and end seconds
    from the window's start, tokens), the frames they consume, and whether the window ended in a
    lone timestamp. Segments end at consecutive timestamps; without a pair the window is one
    segment, up to its last timestamp if it has one."""
    stride = 2  # mel frames per encoder position, so per timestamp step
    precision = stride * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp step: 0.02
    stamps = [t >= begin for t in tokens]
    single_ending = stamps[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if stamps[i] and stamps[i + 1]]
    if not cuts:
        duration = size * HOP_LENGTH / SAMPLE_RATE
        times = [t for t in tokens if t >= begin]
        if times and times[-1] != begin:
            duration = (times[-1] - begin) * precision
        return [(0.0, duration, list(tokens))], size, single_ending
    if single_ending:
        cuts.append(len(tokens))
    pieces, last = [], 0
    for cut in cuts:
        ids = list(tokens[last:cut])
        pieces.append(((ids[0] - begin) * precision, (ids[-1] - begin) * precision, ids))
        last = cut
    return pieces, size if single_ending else (tokens[last - 1] - begin) * stride, single_ending


def seek_clips(clip_timestamps: Sequence[float], content: int) -> list[tuple[int, int]]:
    """(start, end) mel frames of the parts to transcribe: the seconds in pairs, an odd last one
    running to the end of the `content` frames (OpenAI's `clip_timestamps`)."""
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2:
        points.append(content)
    return list(zip(points[::2], points[1::2], strict=True))


PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS  # what OpenAI leaves out of the anomaly score


def _word_anomaly(word: dict) -> float:
    """How unlike a real word: improbable, very short or very long (OpenAI's score)."""
    duration = word["end"] - word["start"]
    score = 1.0 if word.get("probability", 0.0) < 0.15 else 0.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def _is_anomaly(segment: dict | None) -> bool:
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PUNCTUATION][:8]
    score = sum(_word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _hallucination_seek(
    segments: list[dict], threshold: float, seek: int, previous_seek: int, frames: int, size: int, content: int,
    last_speech: float, single_ending: bool,
) -> tuple[int, bool]:  # fmt: skip
    """OpenAI's `hallucination_silence_threshold`: the next seek, and whether the window is
    dropped (its first words are a likely hallucination after a silence). A likely hallucination
    between silences later in the window cuts `segments` there, and the next window starts at it."""
    to_seconds, per_second = HOP_LENGTH / SAMPLE_RATE, FRAMES_PER_SECOND
    offset, window_end = previous_seek * to_seconds, (previous_seek + frames) * to_seconds
    if not single_ending:
        end = last_word_end(segments)
        if end is not None and end > offset:
            seek = round(end * per_second) if window_end - end > threshold else previous_seek + size
    first = next((s for s in segments if s["words"]), None)
    if _is_anomaly(first) and first["start"] - offset > threshold:
        return previous_seek + round((first["start"] - offset) * per_second), True
    last_end = last_speech
    for i, segment in enumerate(segments):
        if not segment["words"]:
            continue
        if _is_anomaly(segment):
            following = next((s for s in segments[i + 1 :] if s["words"]), None)
            next_start = following["words"][0]["start"] if following else offset + size * to_seconds
            start = segment["start"]
            silence_before = start - last_end > threshold or start < threshold or start - offset < 2.0
            silence_after = (
                next_start - segment["end"] > threshold or _is_anomaly(following) or window_end - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                seek = round(max(offset + 1, segment["start"]) * per_second)
                if content * to_seconds - segment["end"] < threshold:
                    seek = content
                del segments[i:]
                break
        last_end = segment["end"]
    return seek, False


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
