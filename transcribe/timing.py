"""Word-level timestamps from cross-attention, as OpenAI's `word_timestamps=True` computes them.

The tokens of a window's segments are run through the decoder once more, after the text-only
prompt; the cross-attention scores of the alignment heads (the checkpoint's `alignment_heads`,
else every head of the decoder's second half of layers, OpenAI's rule for models without them)
are turned into a token-by-frame matrix (softmax over the window's frames, standardised over
tokens, median-filtered over frames, averaged over heads), and dynamic time warping through it
gives the frame where each token starts. Words are the tokenizer's (spaces, or unicode points
for languages written without them); punctuation is merged into its neighbours, and long words
at sentence and segment boundaries are cut to twice the median word duration, OpenAI's rules.

`scores(window, tokens)` is the one framework-specific part: the decoder's logits (T, n_vocab)
and the alignment heads' scores before the softmax (heads, T, frames / 2), NumPy float32.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from whisper_config import ModelConfig
from whisper_io.audio_files import FRAMES_PER_SECOND, HOP_LENGTH, SAMPLE_RATE
from whisper_io.tokenizers import Tokenizer

TOKENS_PER_SECOND = FRAMES_PER_SECOND / 2  # encoder positions per second: 50
MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"

# (window (n_mels, frames), tokens) -> (logits (T, n_vocab), alignment heads' scores (heads, T, frames / 2))
Scores = Callable[[np.ndarray, Sequence[int]], tuple[np.ndarray, np.ndarray]]


def alignment_heads(config: ModelConfig) -> list[tuple[int, int]]:
    """(layer, head) pairs whose cross-attention follows the audio: the checkpoint's, else every
    head of the second half of the decoder's layers (OpenAI's default)."""
    if config.alignment_heads is not None:
        return [divmod(h, config.n_text_head) for h in sorted(set(config.alignment_heads))]
    layers = range(config.n_text_layer // 2, config.n_text_layer)
    return [(layer, head) for layer in layers for head in range(config.n_text_head)]


@dataclasses.dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """The median of each `width` neighbours along the last axis, the edges reflected."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through the cost matrix x (N, M) from (0, 0) to (N - 1, M - 1):
    (token indices, frame indices) along it. OpenAI's recurrence (float32 costs, its tie-breaking:
    a diagonal or vertical step only when strictly cheapest), computed one anti-diagonal at a time."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, np.float32)
    cost[0, 0] = 0
    trace = np.full((n + 1, m + 1), -1, np.int8)
    for diagonal in range(2, n + m + 1):
        i = np.arange(max(1, diagonal - m), min(n, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        step = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        best = np.choose(step, [c0, c1, c2])
        cost[i, j] = (x[i - 1, j - 1] + best.astype(np.float64)).astype(np.float32)
        trace[i, j] = step
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    path = np.asarray(path[::-1])
    return path[:, 0], path[:, 1]


def find_alignment(
    scores: Scores,
    tokenizer: Tokenizer,
    language: str | None,
    task: str,
    text_tokens: list[int],
    window: np.ndarray,
    num_frames: int,
) -> list[WordTiming]:
    """The words of `text_tokens` (one window's text) with their start and end in seconds from
    the window's start and the mean probability of their tokens."""
    if not text_tokens:
        return []
    prompt = list(tokenizer.sot_sequence(language, task))  # ends in <|notimestamps|>
    logits, qk = scores(window, [*prompt, *text_tokens, tokenizer.eot])
    start = len(prompt) - 1  # the position that predicts the first text token
    sampled = logits[start : start + len(text_tokens), : tokenizer.eot].astype(np.float64)
    sampled = np.exp(sampled - sampled.max(-1, keepdims=True))
    probabilities = (sampled / sampled.sum(-1, keepdims=True))[np.arange(len(text_tokens)), text_tokens]

    weights = qk[:, :, : num_frames // 2].astype(np.float32)
    weights = np.exp(weights - weights.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).astype(np.float64)
    # Standardised over tokens in float64: frames where every token's weight is a float32
    # denormal keep a nonzero spread, as torch's float32 std_mean keeps it.
    # A frame where every token has the same weight gives 0 / 0 there, as in OpenAI's torch code
    # (which does not warn about it).
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = (weights - weights.mean(-2, keepdims=True)) / weights.std(-2, keepdims=True)
    matrix = median_filter(weights, MEDIAN_FILTER_WIDTH).mean(0)[start:-1]
    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    return [
        WordTiming(word, tokens, float(jump_times[i]), float(jump_times[j]), float(np.mean(probabilities[i:j])))
        for word, tokens, i, j in zip(words, word_tokens, boundaries[:-1], boundaries[1:], strict=False)
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Opening punctuation joins the following word, closing punctuation the previous one."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word, following.tokens = previous.word + following.word, previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word, previous.tokens = previous.word + following.word, previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(
    segments: list[dict],
    scores: Scores,
    tokenizer: Tokenizer,
    language: str | None,
    task: str,
    window: np.ndarray,
    num_frames: int,
    last_speech_timestamp: float,
    prepended: str = PREPEND_PUNCTUATIONS,
    appended: str = APPEND_PUNCTUATIONS,
) -> None:
    """Sets `words` ({word, start, end, probability}) on each of one window's `segments`, and
    moves a segment's start and end to its words' where OpenAI's rules say so."""
    if not segments:
        return
    per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    alignment = find_alignment(
        scores, tokenizer, language, task, list(itertools.chain(*per_segment)), window, num_frames
    )
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):  # words at sentence boundaries are at most twice the median long
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - longest
    merge_punctuations(alignment, prepended, appended)

    offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    index = 0
    for segment, tokens in zip(segments, per_segment, strict=True):
        saved, words = 0, []
        while index < len(alignment) and saved < len(tokens):
            timing = alignment[index]
            if timing.word:
                words.append({
                    "word": timing.word,
                    "start": round(offset + timing.start, 2),
                    "end": round(offset + timing.end, 2),
                    "probability": timing.probability,
                })  # fmt: skip
            saved += len(timing.tokens)
            index += 1
        if words:
            _fit_segment_ends(segment, words, median, longest, last_speech_timestamp)
            last_speech_timestamp = segment["end"]
        segment["words"] = words


def _fit_segment_ends(segment: dict, words: list[dict], median: float, longest: float, last_speech: float) -> None:
    """OpenAI's boundary rules: after a pause the first words are at most twice the median long;
    the segment's start and end move to its words' unless a word reaches far beyond them."""
    first = words[0]
    if first["end"] - last_speech > median * 4 and (
        first["end"] - first["start"] > longest or (len(words) > 1 and words[1]["end"] - first["start"] > longest * 2)
    ):
        if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
            boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
            first["end"] = words[1]["start"] = boundary
        first["start"] = max(0, first["end"] - longest)
    if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
        first["start"] = max(0, min(first["end"] - median, segment["start"]))
    else:
        segment["start"] = first["start"]
    last = words[-1]
    if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
        last["end"] = max(last["start"] + median, segment["end"])
    else:
        segment["end"] = last["end"]


def last_word_end(segments: list[dict]) -> float | None:
    """The end of the last word of `segments`, else of the last segment (OpenAI's `get_end`)."""
    ends = (w["end"] for s in reversed(segments) for w in reversed(s.get("words", [])))
    return next(ends, segments[-1]["end"] if segments else None)
