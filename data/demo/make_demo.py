"""Regenerate the demo speech dataset (`python data/demo/make_demo.py`; needs Debian's espeak-ng).

Spoken digit strings ("4 0 7 2") and short commands ("turn on the blue lamp"), each said by one
of several espeak-ng voices at one of several speeds, resampled to 16 kHz mono and stored as
16-bit FLAC in `audio/`, with JSONL manifests `train.jsonl` and `eval.jsonl` (`{"audio": path
relative to the manifest, "text": transcript}`). The evaluation texts never occur in training.
Everything is seeded, so the same espeak-ng version gives the same files.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from whisper_io.audio_files import load_audio  # noqa: E402  (resamples to 16 kHz)

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-us+m5", "en-gb+f4"]
SPEEDS = [140, 160, 180, 200]
DIGITS = "0123456789"
ACTIONS = ["turn on", "turn off", "open", "close", "find", "show me"]
COLOURS = ["the red", "the green", "the blue", "the white", "the black", "the yellow"]
THINGS = ["lamp", "door", "window", "box", "car", "light"]
N_TRAIN, N_EVAL = 300, 40


def texts(rng: random.Random, count: int, seen: set[str]) -> list[str]:
    """`count` distinct transcripts not in `seen`: two thirds digit strings, one third commands."""
    out: list[str] = []
    while len(out) < count:
        if rng.random() < 2 / 3:
            text = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))
        else:
            text = f"{rng.choice(ACTIONS)} {rng.choice(COLOURS)} {rng.choice(THINGS)}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's speech of `text` at 16 kHz, silence trimmed to 50 ms at each end."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav.name, text], check=True)
        audio = load_audio(wav.name)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    start, stop = max(0, loud[0] - 800), min(len(audio), loud[-1] + 800)
    return audio[start:stop]


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    splits = {"train": texts(rng, N_TRAIN, seen), "eval": texts(rng, N_EVAL, seen)}
    (HERE / "audio").mkdir(exist_ok=True)
    index = 0
    for split, transcripts in splits.items():
        rows = []
        for text in transcripts:
            voice, speed = rng.choice(VOICES), rng.choice(SPEEDS)
            name = f"audio/{split}_{index:04d}.flac"
            soundfile.write(HERE / name, speak(text, voice, speed), 16000, subtype="PCM_16")
            rows.append({"audio": name, "text": text, "voice": voice, "speed": speed})
            index += 1
        with open(HERE / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{split}: {len(rows)} utterances")


if __name__ == "__main__":
    main()
