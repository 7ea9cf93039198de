"""Compile time of the training step as the model gets deeper: the layer scan keeps it flat (the
default, unroll_layers="auto", unrolls stacks of up to 12 layers a side and scans deeper ones).

    python bench/compile_time.py [--depths 4,8,16,32] [--size tiny] [--preset whisper] [--frames 3000]
                                 [--layers auto|scan|unrolled]

For each depth N, an N + N layer model (the OpenAI size's widths) gets its jitted training step
(forward, backward, clipping, AdamW) traced and compiled from abstract shapes, nothing run; the
wall time of `lower` + `compile` is printed, with the ratio to the shallowest. XLA_FLAGS from the
environment apply (the test suite's fast-compile flags are not set here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
from steps import LAYOUTS, abstract_train_step, layout_name

from train.config import TrainConfig


def compile_seconds(config: TrainConfig, batch: int, frames: int, tokens: int) -> float:
    step, state, batch_shapes = abstract_train_step(config, batch, frames, tokens)
    started = time.perf_counter()
    step.lower(state, batch_shapes).compile()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,8,16,32", help="layers per side, comma-separated")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--preset", default="whisper")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--layers",
        default="auto",
        choices=tuple(LAYOUTS),
        help="unroll_layers: the default (auto: stacks of up to 12 layers unrolled, deeper ones scanned), "
        "every depth scanned, or every depth unrolled",
    )
    args = parser.parse_args()
    print(f"{args.preset}/{args.size} widths, batch {args.batch}, {args.frames} frames, {args.tokens} tokens, "
          f"{args.precision}, {jax.devices()[0].platform}, layers {args.layers}")  # fmt: skip
    first = None
    for depth in (int(d) for d in args.depths.split(",")):
        config = TrainConfig(
            preset=args.preset,
            size=args.size,
            model={"n_audio_layer": depth, "n_text_layer": depth, "unroll_layers": LAYOUTS[args.layers]},
            precision=args.precision,
        )
        seconds = compile_seconds(config, args.batch, args.frames, args.tokens)
        first = first or seconds
        how = layout_name(config.model_config())
        print(f"{depth:3d} + {depth:<3d} layers ({how}): compile {seconds:6.1f} s   {seconds / first:4.2f}x the first")


if __name__ == "__main__":
    main()
