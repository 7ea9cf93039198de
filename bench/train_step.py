"""Time one training step: flax_whisper (jit) vs torch_ref (eager, and torch.compile).

    python bench/train_step.py [--size demo|tiny|base|...] [--preset NAME] [--batch 32] [--frames N]
        [--tokens N] [--steps 10] [--precision float32|bfloat16] [--no-compile]

Same model config, batch and AdamW settings in both frameworks; prints the median step time of
each and their ratios, all measured in this run. Timings depend on the machine: compare ratios
from one run, never numbers across machines.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Both frameworks share one accelerator: JAX must not preallocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np
from flax import nnx

from convert.core import flax_to_torch
from flax_whisper import Whisper
from train.config import TrainConfig
from train.step import Graphs, make_optimizer, new_state, train_step


def median_seconds(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_flax(args, config: TrainConfig, model: Whisper, mel: np.ndarray, labels: np.ndarray) -> float:
    tx = make_optimizer(config)
    step_fn = jax.jit(functools.partial(train_step, graphs=Graphs.of(model), tx=tx, config=config), donate_argnums=0)
    batch = {"mel": jax.device_put(mel), "labels": jax.device_put(labels)}
    holder = {"state": new_state(model, tx)}

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return median_seconds(step, args.steps)


def time_torch(args, config: TrainConfig, model_config, initial, mel: np.ndarray, labels: np.ndarray) -> dict:
    try:
        import torch
    except ImportError:
        print("torch is not installed: timing flax_whisper only")
        return {}
    from convert.core import new_torch_model
    from train.torch_train import torch_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    print(f"torch device: {device}")
    mel_t, labels_t = torch.from_numpy(mel).to(device), torch.from_numpy(labels).long().to(device)

    def timed(module, warmup: int = 2) -> float:
        optimizer, scheduler = torch_optimizer(module, config)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = module.loss(mel_t, labels_t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.clip_norm)
            optimizer.step()
            scheduler.step()
            if device == "cuda":
                torch.cuda.synchronize()

        return median_seconds(step, args.steps, warmup)

    results = {"torch_ref (eager)": timed(new_torch_model(model_config, initial).to(device).train())}
    if not args.no_compile:
        try:
            compiled = new_torch_model(model_config, initial).to(device).train()
            compiled.loss = torch.compile(compiled.loss)
            results["torch_ref (torch.compile)"] = timed(compiled, warmup=3)
        except Exception as e:  # torch.compile needs a working C++ toolchain; report, do not fail
            print(f"torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo")
    parser.add_argument("--preset", default="whisper")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, help="mel frames (default: the model's 2 * n_audio_ctx)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()

    config = TrainConfig(
        preset=args.preset, size=args.size, precision=args.precision, time_masks=0, freq_masks=0, warmup_steps=0
    )
    model_config = config.model_config()
    frames = args.frames or 2 * model_config.n_audio_ctx
    tokens = min(args.tokens, model_config.n_text_ctx)
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((args.batch, model_config.n_mels, frames)).astype(np.float32)
    labels = rng.integers(0, model_config.n_vocab, (args.batch, tokens)).astype(np.int32)
    print(f"{args.preset}/{args.size}: batch {args.batch}, {frames} frames, {tokens} tokens, {args.precision}")
    print(f"devices: {jax.devices()}")

    model = Whisper(model_config, rngs=nnx.Rngs(0))
    initial = flax_to_torch(model)  # the same weights for torch
    results = {}
    # torch first, then its cached memory is released: both share one accelerator.
    results.update(time_torch(args, config, model_config, initial, mel, labels))
    results["flax_whisper (jit)"] = time_flax(args, config, model, mel, labels)
    base = results["flax_whisper (jit)"]
    for name, seconds in results.items():
        print(f"{name:28s} median {seconds * 1e3:9.1f} ms/step   {seconds / base:5.2f}x flax")


if __name__ == "__main__":
    main()
