"""Long-form transcription (`transcribe()`'s loop, temperature 0) against openai-whisper, one run.

    python bench/transcribe_longform.py [--size tiny] [--minutes 2] [--beam-size N]

A random OpenAI-format model of `--size` dimensions (OpenAI's own initialisation, seed 0) and
`--minutes` of real speech (the test suite's espeak-ng recording, repeated) are transcribed with
`whisper.transcribe` and with `transcribe.pipeline.transcribe_file` in flax_whisper and torch_ref,
each twice: the first flax run compiles its programs (the log-mel, greedy or beam decoding),
the second runs them. All three decode the same windows to the same tokens (checked), so the
times compare the same work. Prints seconds, the real-time factor (audio seconds per second)
and each time over openai-whisper's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_16k.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--beam-size", type=int, help="beam search at temperature 0 (default: greedy)")
    args = parser.parse_args()

    import soundfile
    import torch
    import whisper

    from transcribe.pipeline import Transcriber, transcribe_file
    from transcribe.sequential import LongFormOptions
    from whisper_config import ModelConfig
    from whisper_io.decoding import BeamSearch

    config = ModelConfig.from_preset("whisper", args.size)
    torch.manual_seed(0)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**config.openai_dims())).eval()
    workdir = tempfile.TemporaryDirectory()  # the checkpoint and the recording, removed at exit
    folder = Path(workdir.name)
    checkpoint = folder / "random.pt"
    torch.save({"dims": config.openai_dims(), "model_state_dict": model.state_dict()}, checkpoint)
    speech = soundfile.read(SPEECH, dtype="float32")[0]
    samples = int(args.minutes * 60 * 16000)
    audio = np.tile(speech, samples // len(speech) + 1)[:samples]
    soundfile.write(folder / "long.wav", audio, 16000)
    seconds = len(audio) / 16000

    beam = {} if args.beam_size is None else {"beam_size": args.beam_size}
    search = f"beam {args.beam_size}" if beam else "greedy"
    print(f"{args.size} (random weights), {seconds:.0f} s of speech, temperature 0, {search}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip

    def timed(run):
        started = time.perf_counter()
        result = run()
        return time.perf_counter() - started, result

    results = {}
    for attempt in ("first", "second"):
        results[("openai-whisper", attempt)] = timed(
            lambda: whisper.transcribe(model, audio, language="en", temperature=0.0, fp16=False, verbose=None, **beam)
        )
    for framework in ("flax", "torch"):
        transcriber = Transcriber.load(
            str(checkpoint), framework, "en", mode="sequential", long_form=LongFormOptions(temperatures=(0.0,)),
            beam=None if args.beam_size is None else BeamSearch(args.beam_size),
        )  # fmt: skip
        for attempt in ("first", "second"):
            results[(framework, attempt)] = timed(lambda t=transcriber: transcribe_file(str(folder / "long.wav"), t))

    reference = results[("openai-whisper", "second")]
    keys = ("seek", "start", "end", "tokens")
    expected = [{k: s[k] for k in keys} for s in reference[1]["segments"]]
    print(f"{'':28s} {'seconds':>8s} {'x real time':>12s} {'/ openai':>9s}  segments")
    for (name, attempt), (elapsed, result) in results.items():
        same = [{k: s[k] for k in keys} for s in result["segments"]] == expected
        label = f"{name} ({attempt} run)"
        ratio = elapsed / reference[0]
        print(f"{label:28s} {elapsed:8.2f} {seconds / elapsed:12.1f} {ratio:9.2f}  "
              f"{len(result['segments'])}{'' if same else ' (DIFFERENT from openai-whisper)'}")  # fmt: skip


if __name__ == "__main__":
    main()
