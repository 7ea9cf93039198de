"""Peak memory of transcribing one long recording: it must not grow with the recording's length.

    python bench/transcribe_memory.py [--hours 3] [--rate 44100] [--batch-size 16] [--keep DIR]

Writes a FLAC file of `--hours` of speech and silence (the test suite's espeak-ng recording,
repeated, at `--rate` in stereo, so reading also resamples and mixes down), a small random model
(the demo size: 2.56 s windows, so a 3-hour file is 4,219 windows), then runs
`python -m transcribe` on it in a fresh process and prints that process's peak
resident memory and wall time, next to the size the file's samples would have in memory. The
README states what one run gave.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPEECH = REPO / "tests" / "data" / "speech_16k.wav"

# Runs the CLI and reports the process's own peak RSS: the high-water mark of its own memory
# (VmHWM, in KiB) where Linux gives it. `ru_maxrss` is kept across fork and exec, so it would count
# the parent's peak too (a test process that had loaded models reported its own 2.4 GB).
CHILD = """
import json, resource, sys
from transcribe.__main__ import main

def peak_mb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS

status = main(sys.argv[1:])
print(json.dumps({"status": status, "peak_rss_mb": peak_mb()}))
"""


def write_long_recording(path: Path, hours: float, rate: int) -> int:
    """Speech then as long again of silence, repeated for `hours`, stereo at `rate`; returns the frames."""
    import soundfile
    from scipy.signal import resample_poly

    speech = soundfile.read(SPEECH, dtype="float32")[0]
    if rate != 16000:
        speech = resample_poly(speech, rate, 16000).astype(np.float32)
    unit = np.concatenate([speech, np.zeros_like(speech)])
    unit = np.stack([unit, 0.5 * unit], axis=1)  # (N, 2)
    total = int(hours * 3600 * rate)
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=2, format="FLAC", subtype="PCM_16") as f:
        written = 0
        while written < total:
            block = unit[: total - written]
            f.write(block)
            written += len(block)
    return total


def write_model(path: Path) -> None:
    from flax import nnx

    from convert import save_checkpoint
    from convert.core import flax_to_torch
    from flax_whisper import Whisper
    from train.config import TrainConfig

    config = TrainConfig().model_config()
    save_checkpoint(path, "flax", config, flax_to_torch(Whisper(config, rngs=nnx.Rngs(0))))


def measure(hours: float = 3.0, rate: int = 44100, batch_size: int = 16, keep: str | None = None) -> dict:
    """Transcribe a generated recording of `hours` in a fresh process; its peak RSS and wall time."""
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="transcribe-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    audio, model = folder / f"long-{hours:g}h.flac", folder / "model"
    if not audio.exists():
        write_long_recording(audio, hours, rate)
    if not model.exists():
        write_model(model)
    args = [str(audio), "--checkpoint", str(model), "--batch-size", str(batch_size), "--max-new-tokens", "4"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"transcribe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    transcript = done.stdout.strip().splitlines()[0]
    return {
        "hours": hours,
        "rate": rate,
        "file_mb": audio.stat().st_size / 2**20,
        "samples_in_memory_mb": hours * 3600 * 16000 * 4 / 2**20,  # what a whole-file read would hold
        "peak_rss_mb": report["peak_rss_mb"],
        "status": report["status"],
        "seconds": seconds,
        "transcript_chars": len(transcript),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=44100, help="sample rate of the generated file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", help="folder for the generated file and model (default: a temporary one)")
    args = parser.parse_args()
    result = measure(args.hours, args.rate, args.batch_size, args.keep)
    print(
        f"{result['hours']:g} h at {result['rate']} Hz stereo ({result['file_mb']:.0f} MB of FLAC; its 16 kHz samples "
        f"alone would be {result['samples_in_memory_mb']:.0f} MB): peak RSS {result['peak_rss_mb']:.0f} MB, "
        f"{result['seconds']:.0f} s, exit status {result['status']}"
    )


if __name__ == "__main__":
    main()
