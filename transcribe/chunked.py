"""Chunked long-form transcription (whisper-jax's batched chunks), for throughput.

A recording is cut into overlapping windows of `frames` mel frames (30 s), one starting every
`frames - 2 * overlap` (20 s with the default 5 s of overlap), so that each window owns its
middle (the first from the start, the last to the end) and sees `overlap` of audio on each side
of it. Every window of every file is decoded on its own, with timestamps after the text-only
prompt, in fixed-size batches shared across files: no window waits for the text before it, so
one program decodes them all, as many at a time as the batch holds. The windows' segments are
then stitched by their timestamps: each segment belongs to the window that owns its midpoint.
Without previous-text prompts and temperature fallback the text can differ from the sequential
mode's (the README states by how much).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transcribe.sequential import Decoded, LongFormOptions, cut_segments, is_silence, padded_window
from whisper_io.audio_files import FRAMES_PER_SECOND, HOP_LENGTH, SAMPLE_RATE
from whisper_io.tokenizers import Tokenizer

DEFAULT_OVERLAP = 5.0  # seconds of audio on each side of a window's own part (a sixth of 30 s)


def chunk_windows(content: int, frames: int, overlap: int) -> list[tuple[int, int, int]]:
    """(first frame, owned from, owned to) of each window over `content` mel frames: windows of
    `frames` every `frames - 2 * overlap`, owning contiguous parts that cover all the content."""
    if not 0 <= 2 * overlap < frames:
        raise ValueError(f"an overlap of {overlap} frames on each side leaves nothing of a {frames}-frame window")
    step = frames - 2 * overlap
    starts = [0]
    while starts[-1] + frames < content:
        starts.append(starts[-1] + step)
    last = len(starts) - 1
    return [
        (start, 0 if i == 0 else start + overlap, content if i == last else start + frames - overlap)
        for i, start in enumerate(starts)
    ]


def windows_of(mel: np.ndarray, frames: int, overlap: float) -> list[tuple[int, int, int]]:
    """`chunk_windows` of a file's log-mel (n_mels, content frames + `frames` of silence), with
    `overlap` in seconds."""
    return chunk_windows(mel.shape[-1] - frames, frames, round(overlap * FRAMES_PER_SECOND))


def stitch(
    windows: list[tuple[int, int, int]],
    decoded: list[Decoded],
    content: int,
    frames: int,
    tokenizer: Tokenizer,
    options: LongFormOptions,
) -> dict:
    """The windows' segments, each kept by the window that owns its midpoint, in time order ->
    {"text", "segments"} in `transcribe()`'s shape. Silent windows (as the sequential mode
    judges them) and segments without text are left out."""
    segments = []
    for (start, own_from, own_to), result in zip(windows, decoded, strict=True):
        if is_silence(result, options):
            continue
        offset = start * HOP_LENGTH / SAMPLE_RATE
        pieces, _, _ = cut_segments(result.tokens, tokenizer.timestamp_begin, min(frames, content - start))
        for a, b, ids in pieces:
            middle = start + (a + b) / 2 * FRAMES_PER_SECOND
            owned = own_from <= middle and (middle < own_to or own_to == content)  # the last owns the end
            text = tokenizer.decode(ids)
            if owned and text.strip():
                segments.append({
                    "id": len(segments),
                    "seek": start,
                    "start": offset + a,
                    "end": offset + b,
                    "text": text,
                    "tokens": ids,
                    "temperature": result.temperature,
                    "avg_logprob": result.avg_logprob,
                    "compression_ratio": result.compression_ratio,
                    "no_speech_prob": result.no_speech_prob,
                })  # fmt: skip
    return {"text": "".join(s["text"] for s in segments), "segments": segments}


def transcribe_chunked(
    mels: list[np.ndarray],
    frames: int,
    overlap: float,
    decode_batch: Callable[[list[np.ndarray]], list[Decoded]],
    batch_size: int,
    tokenizer: Tokenizer,
    options: LongFormOptions,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """mels: each file's log-mel (n_mels, content frames + `frames` of silence) -> each file's
    {"text", "segments"}. `decode_batch(windows)` decodes up to `batch_size` windows (n_mels,
    frames) with timestamps; the windows of all files go to it in order, a batch at a time. As
    in the sequential mode, a window reaching past the end of its file is zero-padded there."""
    plans = [windows_of(mel, frames, overlap) for mel in mels]
    jobs = [(f, start) for f, plan in enumerate(plans) for start, _, _ in plan]
    results: dict[tuple[int, int], Decoded] = {}
    pending: list[tuple[int, int]] = []

    def flush() -> None:
        windows = [padded_window(mels[f], start, min(frames, mels[f].shape[-1] - frames - start), frames)
                   for f, start in pending]  # fmt: skip
        for job, result in zip(pending, decode_batch(windows), strict=True):
            results[job] = result
        if on_progress:
            on_progress(len(pending))
        pending.clear()

    for job in jobs:
        pending.append(job)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return [
        stitch(plan, [results[(f, start)] for start, _, _ in plan], mel.shape[-1] - frames, frames, tokenizer, options)
        for f, (mel, plan) in enumerate(zip(mels, plans, strict=True))
    ]
