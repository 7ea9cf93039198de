"""`python -m transcribe AUDIO... --checkpoint CKPT`: transcripts of audio files (see the README).

Without `--output-dir`, prints `PATH: TEXT` per file (`--output-format json`: one JSON object per
file, its `path` added; `srt`, `vtt`, `tsv`: the subtitles of a single file). With it, writes
`DIR/<name>.<format>` for each file in `--output-format` (default `all`), as `openai-whisper`'s
command does, refusing to replace an existing file unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from transcribe.chunked import DEFAULT_OVERLAP
from transcribe.outputs import FORMATS, RENDERERS, SubtitleOptions, check_outputs, write_outputs
from transcribe.pipeline import MODES, Transcriber, transcribe_files
from transcribe.sequential import LongFormOptions
from transcribe.timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS
from whisper_config import ConfigError, InputError
from whisper_io import AudioFileError, TokenizerError, huge_pages
from whisper_io.decoding import BeamSearch
from whisper_io.outputs import OutputError
from whisper_io.tokenizers import TASKS


def str_to_bool(value: str) -> bool:
    """openai-whisper's boolean option values."""
    choices = {"True": True, "False": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")
    return choices[value]


def optional_float(value: str) -> float | None:
    return None if value == "None" else float(value)


def temperatures(first: float, increment: float) -> tuple[float, ...]:
    """openai-whisper's fallback schedule: `first`, then up by `increment` to 1.0."""
    if increment <= 0:
        return (first,)
    return tuple(float(t) for t in np.arange(first, 1.0 + 1e-6, increment))


def parser(prog: str = "python -m transcribe") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Transcribe audio files with a checkpoint of any format `convert` reads (flax, torch or "
        "Hugging Face directory, OpenAI .pt): greedily by default, as openai-whisper's transcribe() does.",
        epilog=huge_pages.HELP,
    )
    p.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG, MP3, ...; any sample rate)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (flax, torch, Hugging Face) or OpenAI .pt")
    p.add_argument("--framework", choices=("flax", "torch"), default="flax", help="flax_whisper (default) or torch_ref")
    p.add_argument(
        "--language", help="language code, e.g. en (default: detected per file, when the vocabulary has them)"
    )
    p.add_argument("--task", choices=TASKS, default="transcribe")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows decoded together (default 8); sequential mode: the windows several files ask for at once, "
        "1 for one file after another",
    )
    p.add_argument(
        "--max-new-tokens", type=int, help="tokens sampled per window at most (default: n_text_ctx // 2, as OpenAI)"
    )
    p.add_argument("--beam-size", type=int, help="beam search with this many beams (default: greedy decoding)")
    p.add_argument("--patience", type=float, default=1.0, help="beam search: stop at beam_size * patience finished")
    p.add_argument(
        "--length-penalty", type=float, help="beam search: rank by ((5 + length) / 6) ** this (default: length)"
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="sequential: OpenAI transcribe()'s long-form loop (timestamps, previous-text prompts, temperature "
        "fallback; the default when the vocabulary has timestamps); chunked: overlapping windows of all files "
        "decoded in shared batches and stitched by timestamps (throughput); windows: independent 30 s windows "
        "of text",
    )
    p.add_argument(
        "--chunk-overlap",
        type=float,
        default=DEFAULT_OVERLAP,
        help=f"chunked: seconds of audio each window sees on either side of its own part (default {DEFAULT_OVERLAP:g})",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sequential: the first temperature (default 0)")
    p.add_argument(
        "--temperature-increment-on-fallback",
        type=float,
        default=0.2,
        help="sequential: the temperature steps tried up to 1.0 when a window fails the checks below (default 0.2; "
        "0: no fallback)",
    )
    p.add_argument("--best-of", type=int, help="sequential: candidates sampled above temperature 0 (default 1)")
    p.add_argument(
        "--compression-ratio-threshold",
        type=optional_float,
        default=2.4,
        help="sequential: fall back when the text compresses more than this (default 2.4; None: never)",
    )
    p.add_argument(
        "--logprob-threshold",
        type=optional_float,
        default=-1.0,
        help="sequential: fall back when the average log-probability is below this (default -1.0)",
    )
    p.add_argument(
        "--no-speech-threshold",
        type=optional_float,
        default=0.6,
        help="sequential: a window whose no-speech probability is above this and whose average "
        "log-probability is below --logprob-threshold is silence, skipped (default 0.6)",
    )
    p.add_argument(
        "--condition-on-previous-text",
        type=str_to_bool,
        default=True,
        help="sequential: prompt each window with the text before it (True, the default, or False)",
    )
    p.add_argument("--initial-prompt", help="sequential: text to prompt the first window with")  # fmt: skip
    p.add_argument(
        "--word-timestamps",
        type=str_to_bool,
        default=False,
        help="sequential: word-level timestamps from cross-attention (True or False, the default)",
    )
    p.add_argument(
        "--carry-initial-prompt",
        type=str_to_bool,
        default=False,
        help="sequential: start every window's prompt with --initial-prompt (True or False, the default)",
    )
    p.add_argument(
        "--clip-timestamps",
        default="0",
        help="sequential: comma-separated start,end,start,end,... seconds of the parts to transcribe; "
        "a missing last end is the end of the file (default 0: all of it)",
    )
    p.add_argument(
        "--hallucination-silence-threshold",
        type=optional_float,
        help="with --word-timestamps: skip silences longer than this many seconds around a likely hallucination",
    )
    p.add_argument(
        "--highlight-words",
        type=str_to_bool,
        default=False,
        help="with --word-timestamps: underline each word as it is spoken in srt and vtt (True or False)",
    )
    p.add_argument("--max-line-width", type=int, help="with --word-timestamps: characters in a subtitle line, at most")
    p.add_argument(
        "--max-line-count", type=int, help="with --word-timestamps and --max-line-width: lines in a subtitle"
    )
    p.add_argument(
        "--max-words-per-line", type=int, help="with --word-timestamps, without --max-line-width: words in a line"
    )
    p.add_argument(
        "--prepend-punctuations",
        default=PREPEND_PUNCTUATIONS,
        help="with --word-timestamps: these join the following word",
    )
    p.add_argument(
        "--append-punctuations",
        default=APPEND_PUNCTUATIONS,
        help="with --word-timestamps: these join the previous word",
    )
    p.add_argument(
        "--output-format",
        "-f",
        choices=(*FORMATS, "all"),
        help="txt, vtt, srt, tsv, json or all (default: all with --output-dir, else PATH: TEXT lines)",
    )
    p.add_argument("--output-dir", "-o", help="write DIR/<audio name>.<format> files instead of printing")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.add_argument("--jsonl", action="store_true", help="the same as --output-format json")
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="flax: keep compiled programs in DIR for the next run ('off': none; default: "
        "$FLAX_WHISPER_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/flax_whisper/xla)",
    )
    return p


def main(argv: list[str] | None = None, prog: str = "python -m transcribe") -> int:
    cli = parser(prog)
    args = cli.parse_args(argv)
    if args.batch_size < 1:
        cli.error("--batch-size must be at least 1")
    if args.beam_size is None and (args.patience != 1.0 or args.length_penalty is not None):
        cli.error("--patience and --length-penalty need --beam-size")
    subtitles = SubtitleOptions(args.max_line_width, args.max_line_count, args.highlight_words, args.max_words_per_line)
    for name, value in (
        ("--hallucination-silence-threshold", args.hallucination_silence_threshold),
        *((f"--{k.replace('_', '-')}", v) for k, v in dataclasses.asdict(subtitles).items()),
    ):
        if value not in (None, False) and not args.word_timestamps:
            cli.error(f"{name} needs --word-timestamps True")
    for name in ("max_line_width", "max_line_count", "max_words_per_line"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            cli.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.word_timestamps and args.task == "translate":
        print("notice: word timestamps on translations may not be reliable", file=sys.stderr)
    if args.max_line_count and not args.max_line_width:
        print("notice: --max-line-count has no effect without --max-line-width", file=sys.stderr)
    if args.max_words_per_line and args.max_line_width:
        print("notice: --max-words-per-line has no effect with --max-line-width", file=sys.stderr)
    try:
        clips = tuple(float(t) for t in args.clip_timestamps.split(",") if t.strip())
    except ValueError:
        cli.error(f"--clip-timestamps takes comma-separated seconds, got {args.clip_timestamps!r}")
    try:
        beam = None if args.beam_size is None else BeamSearch(args.beam_size, args.patience, args.length_penalty)
        long_form = LongFormOptions(
            temperatures(args.temperature, args.temperature_increment_on_fallback),
            args.compression_ratio_threshold,
            args.logprob_threshold,
            args.no_speech_threshold,
            args.condition_on_previous_text,
            args.initial_prompt,
            args.word_timestamps,
            args.prepend_punctuations,
            args.append_punctuations,
            clips,
            args.carry_initial_prompt,
            args.hallucination_silence_threshold,
        )
    except InputError as e:
        cli.error(str(e))
    if args.mode in ("windows", "chunked") and args.word_timestamps:
        cli.error("--word-timestamps needs --mode sequential")
    if args.chunk_overlap < 0:
        cli.error("--chunk-overlap must be at least 0")
    if args.best_of is not None and args.best_of < 1:
        cli.error("--best-of must be at least 1")
    fmt = "json" if args.jsonl else args.output_format
    formats = FORMATS if fmt == "all" or (fmt is None and args.output_dir) else (fmt,) if fmt else ()
    if not args.output_dir and fmt == "all":
        cli.error("--output-format all writes one file per format: give --output-dir")
    if not args.output_dir and fmt in ("vtt", "srt", "tsv") and len(set(args.audio)) > 1:
        cli.error(f"--output-format {fmt} prints one file's transcript: give --output-dir for several")

    try:
        if args.output_dir:
            check_outputs(args.audio, args.output_dir, formats, args.overwrite)
        if args.framework == "flax":
            from flax_whisper.compile_cache import use_compile_cache

            use_compile_cache(args.compile_cache)
        transcriber = Transcriber.load(
            args.checkpoint, args.framework, args.language, args.task, args.batch_size, args.max_new_tokens, beam,
            args.mode, long_form, args.best_of, args.chunk_overlap,
        )  # fmt: skip
        if transcriber.mode == "windows" and args.mode is None:
            print(f"notice: the {transcriber.tokenizer.name} vocabulary has no timestamps: --mode windows",
                  file=sys.stderr)  # fmt: skip
    except (ConfigError, InputError, TokenizerError, OutputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    failed = []

    def report(error: AudioFileError) -> None:
        failed.append(error.path)
        print(f"error: {error}", file=sys.stderr)

    results = transcribe_files(args.audio, transcriber, report)
    for path, result in results.items():
        if args.output_dir:
            for written in write_outputs(result, path, args.output_dir, formats, subtitles):
                print(f"{path}: {written}", file=sys.stderr)
        elif fmt == "json":
            print(json.dumps({"path": path, **result}, ensure_ascii=False))
        elif fmt in (None, "txt"):
            print(f"{path}: {result['text'].strip()}")
        else:
            sys.stdout.write(RENDERERS[fmt](result, subtitles))
    if failed:
        print(f"{len(failed)} of {len(args.audio)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()
    sys.exit(main())
