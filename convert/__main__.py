"""Command line: `python -m convert SRC DST` and `python -m convert verify`. See `--help`."""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from convert.checkpoints import FORMATS, NonFiniteError, check_output, load_checkpoint, save_checkpoint
from convert.rules import ConversionError
from convert.tensors import cast, dtype_of, ml_dtypes_name, shapes_of
from whisper_config import PRESETS, SIZES, ConfigError, InputError, ModelConfig
from whisper_io.outputs import OutputError

DEFAULT_TARGET = {"torch": "flax", "openai": "flax", "hf": "flax", "flax": "torch"}
DTYPES = ("float32", "bfloat16", "float16")

CONVERT_HELP = """\
Convert a checkpoint between frameworks. The source format is detected:
  torch   a directory with config.json + model.safetensors (torch_ref)
  flax    a directory with config.json + state/ (orbax, flax_whisper)
  openai  an OpenAI Whisper .pt file (read with torch.load(weights_only=True))
  hf      a Hugging Face transformers Whisper directory (config.json with
          model_type "whisper", model.safetensors or shards with an index)
By default torch, OpenAI and hf checkpoints become flax, and flax becomes torch.
Weights keep the source's precision (float16 stays float16) unless --dtype says.
DST is written next to itself and renamed into place when complete. An existing
DST is replaced only with --overwrite and only when it is a checkpoint; the
source, a folder holding it and the current directory are never written.
With --preset NAME, SRC warm-starts a model of another preset (a whisper
checkpoint into all_rotary, say): matching tensors are copied, the rest is
initialised fresh, and both are listed by name.
Run `python -m convert verify --help` for the parity checker."""


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="source checkpoint (directory or .pt file)")
    parser.add_argument("dst", help="destination (a directory, or a .pt file for --to openai)")
    parser.add_argument("--dtype", choices=DTYPES, help="precision of the written weights (default: the source's)")
    parser.add_argument("--to", choices=FORMATS, help="target format (default: the other framework)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DST if it is an existing checkpoint (never anything else)"
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert weights that hold NaN or infinity (refused by default, naming the tensors)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="warm start: write a model of this preset, copying every tensor of SRC whose name, shape "
        "and role match and initialising the rest (reported by name)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh tensors with --preset (default 0)")
    args = parser.parse_args(argv)
    check_output(args.dst, args.overwrite, sources=[args.src])  # before the (slow) read: fail fast
    try:
        ckpt = load_checkpoint(args.src, allow_nonfinite=args.allow_nonfinite)
    except NonFiniteError as err:
        raise NonFiniteError(f"{err}; pass --allow-nonfinite to convert it anyway") from None
    target = args.to or DEFAULT_TARGET[ckpt.format]
    config, tensors = ckpt.config, ckpt.tensors
    if args.dtype:
        tensors = cast(tensors, ml_dtypes_name(args.dtype))
    if args.preset:
        from convert.warm_start import warm_start

        started = warm_start(ckpt, ckpt.config.with_preset(args.preset), seed=args.seed)
        print(f"warm start of preset {args.preset!r} from {args.src}:\n{started.report()}")
        config, tensors = started.config, started.tensors
    save_checkpoint(
        args.dst,
        target,
        config,
        tensors,
        overwrite=args.overwrite,
        sources=[args.src],
        allow_nonfinite=args.allow_nonfinite,
        values_checked=not (args.dtype or args.preset),  # load_checkpoint checked them; a cast may overflow
    )
    n_weights = sum(math.prod(shape) for shape in shapes_of(tensors).values())
    dtypes = "/".join(sorted({np.dtype(dtype_of(tensors, k)).name for k in tensors}))
    print(
        f"{args.src} ({ckpt.format}) -> {args.dst} ({target}): {len(tensors)} tensors, {n_weights:,} weights, {dtypes}"
    )
    return 0


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert verify",
        description=(
            "Load one set of weights into torch_ref and flax_whisper, run both on the same random "
            "log-mel and tokens, print the max abs/rel differences of the encoder output, logits "
            "and loss, and exit 1 if any exceeds atol + rtol * max|torch|. Without CKPT, checks "
            "a freshly initialised model of --preset or --config."
        ),
    )
    parser.add_argument("ckpt", nargs="?", help="checkpoint of any format (omit to verify a fresh model)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="fresh model of this preset")
    source.add_argument("--config", metavar="FILE", help="fresh model from a config.json")
    parser.add_argument("--size", choices=list(SIZES), help="OpenAI size for --preset (default: tiny)")
    parser.add_argument("--batch", type=positive_int, default=2, help="batch size (default 2)")
    parser.add_argument("--frames", type=positive_int, help="mel frames (default 2 * n_audio_ctx)")
    parser.add_argument("--tokens", type=positive_int, help="decoder tokens (default min(32, n_text_ctx))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh weights and the input")
    parser.add_argument("--atol", type=tolerance, default=1e-4, help="absolute tolerance (default 1e-4)")
    parser.add_argument("--rtol", type=tolerance, default=1e-5, help="tolerance relative to max|torch| (default 1e-5)")
    args = parser.parse_args(argv)
    if (args.ckpt is None) == (args.preset is None and args.config is None):
        parser.error("give either a checkpoint or one of --preset / --config")
    if args.size and not args.preset:
        parser.error("--size goes with --preset")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: verify runs torch_ref and needs torch: pip install '.[torch]'", file=sys.stderr)
        return 2

    from convert.verify import verify

    if args.ckpt:
        try:
            ckpt = load_checkpoint(args.ckpt)
        except NonFiniteError as err:
            raise NonFiniteError(f"{err}: parity cannot be checked on non-finite weights") from None
        config, tensors = ckpt.config, ckpt.tensors
        print(f"checkpoint {args.ckpt} ({ckpt.format})")
    else:
        from flax import nnx

        from convert.core import flax_to_torch
        from flax_whisper import Whisper

        if args.preset:
            config = ModelConfig.from_preset(args.preset, size=args.size)
            print(f"fresh flax_whisper model, preset {args.preset!r}, size {args.size or 'tiny'}, seed {args.seed}")
        else:
            config = ModelConfig.load(args.config)
            print(f"fresh flax_whisper model from {args.config}, seed {args.seed}")
        tensors = flax_to_torch(Whisper(config, rngs=nnx.Rngs(args.seed)))
    started = time.perf_counter()

    def progress(step: str) -> None:  # on stderr: stdout holds the report alone
        print(f"[{time.perf_counter() - started:7.1f} s] {step}", file=sys.stderr, flush=True)

    results = verify(
        config,
        tensors,
        batch=args.batch,
        frames=args.frames,
        n_tokens=args.tokens,
        seed=args.seed,
        atol=args.atol,
        rtol=args.rtol,
        progress=progress,
    )
    failed = [r.name for r in results if not r.ok]
    print("parity FAILED: " + ", ".join(failed) if failed else "parity ok")
    return 1 if failed else 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def tolerance(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its messages
tolerance.__name__ = "tolerance"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return verify_main(argv[1:])
        return convert_main(argv)
    except (ConversionError, ConfigError, InputError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
