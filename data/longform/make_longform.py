"""Make a long-form speech dataset with timestamps (`python data/longform/make_longform.py`;
needs Debian's espeak-ng; about a minute).

The demo's utterances (spoken digit strings and short commands, several espeak-ng voices and
speeds; `data/demo/make_demo.py`) are laid end to end with pauses into streams, and 5 s windows
are cut from them, each taught with Whisper's timestamps (`"segments"` in the manifests; see
`train/data.py`): every utterance wholly inside a window is a segment `<|start|> text <|end|>`;
one that starts inside and runs past the end is its start alone (the long-form loop then seeks
there); one cut at the window's start is not taught. Windows start where the sequential loop's
windows start (at an utterance, as it seeks to the last timestamp, or at the start of a
recording) or anywhere (as the chunked mode's overlapping windows do); some hold the end of a
recording, silence after it (as the last windows of a file do, padded with zeros).

Writes, under `data/longform/` (not in git): `audio/`, `train.jsonl` and `eval.jsonl` (windows),
and `long.jsonl` (recordings of about a minute from the evaluation utterances, whose texts never
occur in training, with their transcripts). Train a model on it with
`python -m train --config data/longform/train.toml`; everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo"))
from make_demo import SPEEDS, VOICES, speak, texts  # noqa: E402

RATE = 16000
WINDOW = 5.0  # seconds: the model's window (n_audio_ctx 250)
PAUSE = (0.15, 0.8)  # seconds between utterances


def synthesize(rng: random.Random, transcripts: list[str]) -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz audio) of each transcript in a random voice and speed."""
    return [(text, speak(text, rng.choice(VOICES), rng.choice(SPEEDS))) for text in transcripts]


def stream(rng: random.Random, pool, seconds: float) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Utterances of `pool` drawn at random, laid end to end with pauses, until `seconds` are
    filled -> (audio, [(start, end, text)] in seconds)."""
    pieces, spans, at = [], [], 0
    while at < seconds * RATE:
        pause = np.zeros(int(rng.uniform(*PAUSE) * RATE), np.float32)
        text, audio = rng.choice(pool)
        pieces += [pause, audio]
        at += len(pause)
        spans.append((at / RATE, (at + len(audio)) / RATE, text))
        at += len(audio)
    return np.concatenate(pieces), spans


def window_segments(spans, start: float) -> list[dict]:
    """The segments a window from `start` is taught with (see the module's docstring)."""
    segments = []
    for begin, end, text in spans:
        begin, end = begin - start, end - start
        if begin < 0 or begin >= WINDOW - 0.05:
            continue  # cut at the start, or barely begun at the end
        if end <= WINDOW:
            segments.append({"start": round(begin, 2), "end": round(end, 2), "text": " " + text})
        else:
            segments.append({"start": round(begin, 2), "end": None, "text": ""})
            break
    return segments


def windows(rng: random.Random, pool, count: int, folder: Path, prefix: str) -> list[dict]:
    """`count` windows with speech, cut from fresh streams of `pool`, written to `folder`."""
    rows = []
    while len(rows) < count:
        audio, spans = stream(rng, pool, 3 * WINDOW)
        where = rng.random()
        if where < 0.15:
            start = 0.0  # a recording's first window
        elif where < 0.3:  # a recording's last: it ends in a pause, silence (zeros) after
            last = rng.randrange(2, len(spans) - 1)
            end = spans[last][1] + rng.uniform(0.05, 0.5)
            audio, spans = audio[: int(end * RATE)], spans[: last + 1]
            start = max(0.0, rng.choice([s for s in spans if s[0] > end - WINDOW])[0] - rng.uniform(0.0, 0.06))
        elif where < 0.8:  # at an utterance, as the sequential loop seeks
            start = max(0.0, rng.choice(spans[:-2])[0] - rng.uniform(0.0, 0.06))
        else:  # anywhere, as a chunked window
            start = rng.uniform(0.0, spans[-1][0] - WINDOW)
        segments = window_segments(spans, start)
        if not any(s["end"] is not None for s in segments):
            continue  # every window teaches at least one whole utterance
        first = int(start * RATE)
        clip = np.zeros(int(WINDOW * RATE), np.float32)
        piece = audio[first : first + len(clip)]
        clip[: len(piece)] = piece
        name = f"audio/{prefix}_{len(rows):05d}.flac"
        soundfile.write(folder / name, clip, RATE, subtype="PCM_16")
        text = " ".join(s["text"].strip() for s in segments if s["end"] is not None)
        rows.append({"audio": name, "text": text, "segments": segments})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-windows", type=int, default=4000)
    parser.add_argument("--eval-windows", type=int, default=200)
    parser.add_argument("--recordings", type=int, default=4, help="long recordings from the evaluation utterances")
    parser.add_argument("--minutes", type=float, default=1.0, help="length of each long recording")
    args = parser.parse_args()
    rng = random.Random(0)
    seen: set[str] = set()
    train_pool = synthesize(rng, texts(rng, 600, seen))
    eval_pool = synthesize(rng, texts(rng, 120, seen))  # texts never in training
    (HERE / "audio").mkdir(exist_ok=True)
    write(HERE / "train.jsonl", windows(rng, train_pool, args.train_windows, HERE, "train"))
    write(HERE / "eval.jsonl", windows(rng, eval_pool, args.eval_windows, HERE, "eval"))
    long = []
    for i in range(args.recordings):
        audio, spans = stream(rng, eval_pool, args.minutes * 60)
        name = f"audio/long_{i}.flac"
        soundfile.write(HERE / name, audio, RATE, subtype="PCM_16")
        long.append({"audio": name, "text": " ".join(text for _, _, text in spans), "seconds": len(audio) / RATE})
    write(HERE / "long.jsonl", long)
    print(f"{args.train_windows} training and {args.eval_windows} evaluation windows of {WINDOW} s, ", end="")
    print(f"{args.recordings} recordings of {sum(r['seconds'] for r in long) / len(long):.0f} s")


if __name__ == "__main__":
    main()
