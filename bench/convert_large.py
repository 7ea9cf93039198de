"""Conversion at large-v3 scale: time and peak memory of each `python -m convert` step.

    python bench/convert_large.py [--size large-v3] [--workdir DIR] [--skip-verify]

Writes an OpenAI-format checkpoint of the size's dimensions with random float16 weights (as
OpenAI ships them: 3.1 GB for large-v3's 1.55 B parameters), then runs, each in its own process
so its peak resident memory is its own: OpenAI -> flax, flax -> torch, torch -> hf, and
`convert verify` of the flax checkpoint. Prints seconds, peak RSS and peak RSS over the source
file's size. Needs about 4x the checkpoint's size in free disk space under --workdir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Measured on this project's 2-core, 24 GB machine before streaming conversion (the numbers).
BEFORE = {
    "openai -> flax": "99 s, 15.6 GB",
    "flax -> torch": "47 s, 12.2 GB",
    "verify (flax)": "killed at 24 GB",
}


def write_checkpoint(path: Path, size: str, seed: int = 0) -> None:
    """A random float16 OpenAI `.pt` of `size`'s dimensions, written in a child process."""
    code = f"""
import torch, whisper
from convert import build_plan
from convert.rules import OPENAI_NAMES
from whisper_config import ModelConfig
config = ModelConfig.from_preset("whisper", size={size!r})
torch.manual_seed({seed})
state = {{}}
for entry in build_plan(config):
    name, shape = OPENAI_NAMES.to_format(entry.torch_key), entry.torch_shape
    if name == "encoder.positional_embedding":
        state[name] = whisper.model.sinusoids(*shape).half()
    elif name.endswith("ln.weight") or name.endswith("ln_post.weight"):
        state[name] = torch.ones(shape, dtype=torch.float16)
    else:
        state[name] = (0.02 * torch.randn(shape)).half()
torch.save({{"dims": config.openai_dims(), "model_state_dict": state}}, {str(path)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def measured(argv: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in GB, exit status) of one command in its own process."""
    # The output goes to a file, not a pipe: nothing reads a pipe until wait4 returns, and a
    # child writing more than a pipe holds would wait for a reader forever.
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            print(log.read()[-3000:])
    return seconds, usage.ru_maxrss / 2**20, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large-v3")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--skip-verify", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="convert-large-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"{args.size}.pt"
    try:
        if not source.is_file():
            print(f"writing a random float16 {args.size} checkpoint to {source} ...", flush=True)
            write_checkpoint(source, args.size)
        gigabytes = source.stat().st_size / 2**30
        print(f"source: {source.name}, {gigabytes:.2f} GB on disk")
        convert = [sys.executable, "-m", "convert"]
        steps = [
            ("openai -> flax", [*convert, str(source), str(workdir / "flax"), "--overwrite"]),
            ("flax -> torch", [*convert, str(workdir / "flax"), str(workdir / "torch"), "--overwrite"]),
            ("torch -> hf", [*convert, str(workdir / "torch"), str(workdir / "hf"), "--to", "hf", "--overwrite"]),
        ]
        if not args.skip_verify:
            steps.append(("verify (flax)", [*convert, "verify", str(workdir / "flax"), "--batch", "1"]))
        print(f"{'step':<16} {'seconds':>8} {'peak RSS':>9} {'RSS/source':>10}  before streaming")
        for name, argv in steps:
            seconds, peak, status = measured(argv)
            flag = "" if status == 0 else f"  (exit {status})"
            print(
                f"{name:<16} {seconds:>8.1f} {peak:>7.2f}GB {peak / gigabytes:>9.2f}x  {BEFORE.get(name, '-')}{flag}",
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
