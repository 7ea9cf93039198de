"""Chunked mode against sequential mode on a batch of files: speed, and how far the texts differ.

    python bench/transcribe_chunked.py [--size tiny] [--files 8] [--minutes 1] [--batch-size 8] [--beam-size 5]
    python bench/transcribe_chunked.py --checkpoint CKPT --audio a.wav b.flac ... [--language en]
    python bench/transcribe_chunked.py --checkpoint CKPT --manifest long.jsonl   # with reference texts

`flax_whisper` transcribes the files with `--mode sequential` (OpenAI's `transcribe()` loop, one
window at a time per file: `--batch-size 1`; then the files' loops together, their windows in
shared batches of `--batch-size`) and with `--mode chunked` (overlapping windows of all files in
shared batches, stitched by timestamps), at temperature 0, greedily or with `--beam-size` beams
(patience 1), each twice (the first run compiles). Prints seconds of the second run, the
real-time factor, each over sequential, and the word error rate of the chunked text against the
sequential text (jiwer), per file and over all files.

Without `--checkpoint`, a random OpenAI-format model of `--size` dimensions (OpenAI's own
initialisation, seed 0) and `--files` recordings of `--minutes` of real speech (the test suite's
espeak-ng recording, repeated, each file starting elsewhere in it). A random model's text says
nothing about the audio, so its error rate only shows that the modes decode different windows:
run it on a trained checkpoint and real recordings for the number that matters. `--manifest`
(JSONL rows of "audio", relative to the file, and "text") also prints each mode's word error
rate against the reference texts (lower case, punctuation removed).

The model `data/longform/` trains has 5 s windows and was never taught previous-text prompts:

    python bench/transcribe_chunked.py --checkpoint runs/longform/model \
        --manifest data/longform/long.jsonl --chunk-overlap 1 --condition-on-previous-text False
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_16k.wav"


def random_setup(args, folder: Path) -> tuple[str, list[str]]:
    """A random model's checkpoint and `--files` recordings in `folder`."""
    import soundfile
    import torch
    import whisper

    from whisper_config import ModelConfig

    config = ModelConfig.from_preset("whisper", args.size)
    torch.manual_seed(0)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**config.openai_dims())).eval()
    checkpoint = folder / "random.pt"
    torch.save({"dims": config.openai_dims(), "model_state_dict": model.state_dict()}, checkpoint)
    speech = soundfile.read(SPEECH, dtype="float32")[0]
    samples = int(args.minutes * 60 * 16000)
    paths = []
    for i in range(args.files):
        audio = np.tile(np.roll(speech, i * 7919), samples // len(speech) + 1)[:samples]
        soundfile.write(folder / f"speech{i}.wav", audio, 16000)
        paths.append(str(folder / f"speech{i}.wav"))
    return str(checkpoint), paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="windows decoded together (shared batches)")
    parser.add_argument("--checkpoint", help="a trained checkpoint (any format convert reads)")
    parser.add_argument("--audio", nargs="+", help="with --checkpoint: the recordings")
    parser.add_argument("--language", default="en")
    parser.add_argument("--manifest", help="with --checkpoint: JSONL of recordings and their reference texts")
    parser.add_argument("--beam-size", type=int, help="beam search with this many beams (default: greedy)")
    parser.add_argument("--chunk-overlap", type=float, default=5.0, help="chunked: seconds seen on each side")
    parser.add_argument("--condition-on-previous-text", choices=("True", "False"), default="True")
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.audio or args.manifest) or (args.audio and args.manifest):
        parser.error("--checkpoint goes with --audio or --manifest")

    import jiwer

    from transcribe.pipeline import Transcriber, transcribe_files
    from transcribe.sequential import LongFormOptions
    from whisper_io import load_audio
    from whisper_io.decoding import BeamSearch

    workdir = tempfile.TemporaryDirectory()  # the random checkpoint and recordings, removed at exit
    references = None
    if args.manifest:
        rows = [json.loads(line) for line in Path(args.manifest).read_text().splitlines() if line.strip()]
        folder = Path(args.manifest).parent
        paths, references = [str(folder / row["audio"]) for row in rows], [row["text"] for row in rows]
        checkpoint = args.checkpoint
    else:
        checkpoint, paths = (args.checkpoint, args.audio) if args.checkpoint else random_setup(args, Path(workdir.name))
    seconds = sum(len(load_audio(p)) for p in paths) / 16000
    condition = args.condition_on_previous_text == "True"
    options = LongFormOptions(temperatures=(0.0,), condition_on_previous_text=condition)
    beam = None if args.beam_size is None else BeamSearch(args.beam_size)
    search = "greedy" if beam is None else f"beam search ({beam.beam_size} beams)"
    print(f"{len(paths)} files, {seconds:.0f} s of audio, {search} at temperature 0, batch {args.batch_size}")

    results = {}
    runs = {"sequential": ("sequential", 1), "sequential, shared": ("sequential", args.batch_size)}
    runs["chunked"] = ("chunked", args.batch_size)
    for name, (mode, batch) in runs.items():
        transcriber = Transcriber.load(
            checkpoint, "flax", args.language, batch_size=batch, mode=mode, long_form=options, beam=beam,
            chunk_overlap=args.chunk_overlap,
        )  # fmt: skip
        for attempt in ("first", "second"):
            started = time.perf_counter()
            texts = transcribe_files(paths, transcriber, print)
            results[(name, attempt)] = (time.perf_counter() - started, texts)

    sequential, chunked = results[("sequential", "second")], results[("chunked", "second")]
    shared = results[("sequential, shared", "second")]
    print(f"{'':32s} {'seconds':>8s} {'x real time':>12s}")
    for (name, attempt), (elapsed, _) in results.items():
        print(f"{name + ' (' + attempt + ' run)':32s} {elapsed:8.2f} {seconds / elapsed:12.1f}")
    print(f"sequential in shared batches is {sequential[0] / shared[0]:.2f}x as fast as one file at a time")
    print(f"chunked is {sequential[0] / chunked[0]:.2f}x as fast as sequential (second runs)")
    same = sum(shared[1][p]["text"] == sequential[1][p]["text"] for p in paths)
    print(f"sequential in shared batches gives the same text as one file at a time for {same} of {len(paths)} files")
    reference = [sequential[1][p]["text"].strip() or "-" for p in paths]
    hypothesis = [chunked[1][p]["text"].strip() or "-" for p in paths]
    for path, ref, hyp in zip(paths, reference, hypothesis, strict=True):
        print(f"  {Path(path).name}: WER of chunked against sequential {jiwer.wer(ref, hyp):.1%}")
    print(f"WER of chunked against sequential, all files: {jiwer.wer(reference, hypothesis):.1%}")
    if references is not None:
        truth = [normalized(text) for text in references]
        for name in runs:
            texts = [normalized(results[(name, "second")][1][p]["text"]) or "-" for p in paths]
            print(f"WER of {name} against the reference texts: {jiwer.wer(truth, texts):.1%}")


def normalized(text: str) -> str:
    """Lower case, punctuation removed, single spaces."""
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


if __name__ == "__main__":
    main()
