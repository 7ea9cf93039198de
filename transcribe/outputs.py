"""A transcription result written as `openai-whisper` writes it: txt, vtt, srt, tsv and json.

A result is the dict `openai-whisper`'s `transcribe()` returns: `text`, `language` and
`segments`, each segment with `id`, `seek`, `start`, `end` (seconds), `text` and `tokens`. The
formats are `openai-whisper`'s, byte for byte (tested against its writers): `txt` one segment's
text per line; `vtt` and `srt` one cue per segment (`-->` in a text becomes `->`); `tsv` start
and end in integer milliseconds; `json` the result itself.

Files go to `OUTPUT_DIR/<audio file name without extension>.<format>`, each written to a
temporary sibling and renamed into place; an existing file is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
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


def _cues(result: dict, always_include_hours: bool, decimal_marker: str):
    for segment in result["segments"]:
        start = format_timestamp(segment["start"], always_include_hours, decimal_marker)
        end = format_timestamp(segment["end"], always_include_hours, decimal_marker)
        yield start, end, segment["text"].strip().replace("-->", "->")


def to_txt(result: dict) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in result["segments"])


def to_vtt(result: dict) -> str:
    return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in _cues(result, False, "."))


def to_srt(result: dict) -> str:
    cues = enumerate(_cues(result, True, ","), start=1)
    return "".join(f"{index}\n{start} --> {end}\n{text}\n\n" for index, (start, end, text) in cues)


def to_tsv(result: dict) -> str:
    rows = [
        f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
        for s in result["segments"]
    ]
    return "start\tend\ttext\n" + "".join(rows)


def to_json(result: dict) -> str:
    return json.dumps(result)


RENDERERS: dict[str, Callable[[dict], str]] = {
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


def write_outputs(result: dict, audio_path: str, output_dir: str | os.PathLike, formats: tuple[str, ...]) -> list[Path]:
    """Write `result` in each of `formats` beside each other in `output_dir`; returns the paths."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, path in zip(formats, output_paths(audio_path, output_dir, formats), strict=True):
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "w", encoding="utf-8") as out:
            out.write(RENDERERS[fmt](result))
        os.replace(partial, path)
        written.append(path)
    return written
