"""A transcription result written as `openai-whisper` writes it: txt, vtt, srt, tsv and json.

A result is the dict `openai-whisper`'s `transcribe()` returns: `text`, `language` and
`segments`, each segment with `id`, `seek`, `start`, `end` (seconds), `text` and `tokens`. The
formats are `openai-whisper`'s, byte for byte (tested against its writers): `txt` one segment's
text per line; `vtt` and `srt` one cue per segment (`-->` in a text becomes `->`), or, for a
result with word timestamps, cues laid out from the words (`SubtitleOptions`); `tsv` start
and end in integer milliseconds; `json` the result itself.

Files go to `OUTPUT_DIR/<audio file name without extension>.<format>`, each written to a
temporary sibling and renamed into place; an existing file is replaced only with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from whisper_io.outputs import OutputError

FORMATS = ("txt", "vtt", "srt", "tsv", "json")


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """Seconds as `[HH:]MM:SS.mmm`, rounded to the millisecond."""
    if seconds < 0:
        raise ValueError(f"a timestamp cannot be negative, got {seconds}")
    milliseconds = round(seconds * 1000.0)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole, milliseconds = divmod(milliseconds, 1_000)
    prefix = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{prefix}{minutes:02d}:{whole:02d}{decimal_marker}{milliseconds:03d}"


@dataclasses.dataclass(frozen=True)
class SubtitleOptions:
    """How the subtitles of a result with word timestamps are laid out (`openai-whisper`'s writer
    options): lines of at most `max_line_width` characters, cues of at most `max_line_count`
    lines (with a width; else one cue per segment), at most `max_words_per_line` words a line
    (without a width), and each word underlined in turn with `highlight_words`."""

    max_line_width: int | None = None
    max_line_count: int | None = None
    highlight_words: bool = False
    max_words_per_line: int | None = None


def _word_subtitles(segments: list[dict], options: SubtitleOptions):
    """The words of `segments` grouped into subtitles: copies of the word timings, a word that
    starts a line stripped (and after a line break prefixed with one), as OpenAI groups them."""
    preserve_segments = options.max_line_count is None or options.max_line_width is None
    width, per_line = options.max_line_width or 1000, options.max_words_per_line or 1000
    line_len, line_count, subtitle = 0, 1, []
    last = next((w["start"] for s in segments for w in s["words"]), segments[0]["start"] if segments else None) or 0.0
    for segment in segments:
        index, count = 0, per_line
        while index < len(segment["words"]):
            count = min(count, len(segment["words"]) - index)
            for i, original in enumerate(segment["words"][index : index + count]):
                timing = dict(original)
                long_pause = not preserve_segments and timing["start"] - last > 3.0
                has_room = line_len + len(timing["word"]) <= width
                segment_break = i == 0 and len(subtitle) > 0 and preserve_segments
                if line_len > 0 and has_room and not long_pause and not segment_break:
                    line_len += len(timing["word"])  # the line goes on
                else:
                    timing["word"] = timing["word"].strip()
                    full = options.max_line_count is not None and (long_pause or line_count >= options.max_line_count)
                    if (subtitle and full) or segment_break:
                        yield subtitle
                        subtitle, line_count = [], 1
                    elif line_len > 0:  # a new line in the same subtitle
                        line_count += 1
                        timing["word"] = "\n" + timing["word"]
                    line_len = len(timing["word"].strip())
                subtitle.append(timing)
                last = timing["start"]
            index += per_line
    if subtitle:
        yield subtitle


def _cues(result: dict, always_include_hours: bool, decimal_marker: str, options: SubtitleOptions | None = None):
    """(start, end, text) of each subtitle: one per segment, or laid out from the words when the
    result has word timestamps."""
    options = options or SubtitleOptions()
    segments = result["segments"]

    def stamp(seconds: float) -> str:
        return format_timestamp(seconds, always_include_hours, decimal_marker)

    if not segments or "words" not in segments[0]:
        for segment in segments:
            yield stamp(segment["start"]), stamp(segment["end"]), segment["text"].strip().replace("-->", "->")
        return

    def word_stamp(seconds: float) -> str:
        # A word's start can come out a little below 0 (OpenAI's rule moving a long word's start
        # back by the longest duration, near a recording's start); openai-whisper's writers fail
        # there. The cue starts at 0.
        return stamp(max(seconds, 0.0))

    for subtitle in _word_subtitles(segments, options):
        start, end = word_stamp(subtitle[0]["start"]), word_stamp(subtitle[-1]["end"])
        text = "".join(w["word"] for w in subtitle)
        if not options.highlight_words:
            yield start, end, text
            continue
        last, words = start, [w["word"] for w in subtitle]
        for i, timing in enumerate(subtitle):
            word_start, word_end = word_stamp(timing["start"]), word_stamp(timing["end"])
            if last != word_start:
                yield last, word_start, text
            underlined = [re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", w) if j == i else w for j, w in enumerate(words)]
            yield word_start, word_end, "".join(underlined)
            last = word_end


def to_txt(result: dict, options: SubtitleOptions | None = None) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in result["segments"])


def to_vtt(result: dict, options: SubtitleOptions | None = None) -> str:
    cues = _cues(result, False, ".", options)
    return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in cues)


def to_srt(result: dict, options: SubtitleOptions | None = None) -> str:
    cues = enumerate(_cues(result, True, ",", options), start=1)
    return "".join(f"{index}\n{start} --> {end}\n{text}\n\n" for index, (start, end, text) in cues)


def to_tsv(result: dict, options: SubtitleOptions | None = None) -> str:
    rows = [
        f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
        for s in result["segments"]
    ]
    return "start\tend\ttext\n" + "".join(rows)


def to_json(result: dict, options: SubtitleOptions | None = None) -> str:
    return json.dumps(result)


RENDERERS: dict[str, Callable[[dict, SubtitleOptions | None], str]] = {
    "txt": to_txt,
    "vtt": to_vtt,
    "srt": to_srt,
    "tsv": to_tsv,
    "json": to_json,
}


def output_paths(audio_path: str, output_dir: str | os.PathLike, formats: tuple[str, ...]) -> list[Path]:
    stem = os.path.splitext(os.path.basename(audio_path))[0]
    return [Path(output_dir) / f"{stem}.{fmt}" for fmt in formats]


def check_outputs(audio_paths, output_dir: str | os.PathLike, formats: tuple[str, ...], overwrite: bool) -> None:
    """Before anything is decoded: `output_dir` is a folder (created if missing), two inputs do
    not share an output name, and no output exists unless `overwrite`."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder")
    seen: dict[Path, str] = {}
    for audio in audio_paths:
        for path in output_paths(audio, folder, formats):
            if path in seen and seen[path] != audio:
                raise OutputError(f"{seen[path]} and {audio} would both be written to {path}")
            seen[path] = audio
            if path.exists() and not overwrite:
                raise OutputError(f"{path}: exists; pass --overwrite to replace it")


def write_outputs(
    result: dict,
    audio_path: str,
    output_dir: str | os.PathLike,
    formats: tuple[str, ...],
    options: SubtitleOptions | None = None,
) -> list[Path]:
    """Write `result` in each of `formats` beside each other in `output_dir`; returns the paths."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, path in zip(formats, output_paths(audio_path, output_dir, formats), strict=True):
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "w", encoding="utf-8") as out:
            out.write(RENDERERS[fmt](result, options))
        os.replace(partial, path)
        written.append(path)
    return written
