"""Does the data pipeline keep up with the training step? Examples per second of each, one run.

    python bench/data.py [--train-data data/demo/train.jsonl] [--size demo] [--batch 32] [--batches 40]

Times the grain pipeline of `python -m train` (read, resample, tokenise, pad to buckets, in
threads with prefetch) delivering `--batches` batches on the host, and the jitted training step
(log-mel on the device, forward, backward, AdamW) consuming batches of the same size, and prints
both rates and their ratio. A ratio above 1 means the step never waits for data.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from train.config import TrainConfig
from train.data import DataStats, Featurizer, read_records, train_batches
from train.step import Graphs, make_optimizer, new_state, train_step
from whisper_io import tokenizer_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-data", default="data/demo/train.jsonl")
    parser.add_argument("--size", default="demo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config = TrainConfig(size=args.size, batch_size=args.batch, train_data=args.train_data, time_masks=0, freq_masks=0)
    model_config = config.model_config()
    tokenizer = tokenizer_for(model_config)
    featurizer = Featurizer.create(
        model_config, tokenizer, config.language, config.task, config.audio_buckets, config.text_buckets
    )
    records = read_records(config.train_data, config.train_split)
    batches = train_batches(records, featurizer, args.batch, 0, DataStats())
    first = next(batches)  # threads started, first reads done
    started = time.perf_counter()
    for _ in range(args.batches):
        last = next(batches)
    loader = args.batches * args.batch / (time.perf_counter() - started)

    from flax import nnx

    from flax_whisper import Whisper

    model = Whisper(model_config, rngs=nnx.Rngs(0))
    tx = make_optimizer(config)
    step = jax.jit(functools.partial(train_step, graphs=Graphs.of(model), tx=tx, config=config), donate_argnums=0)
    state = new_state(model, tx)
    # The longest buckets seen, so the step is timed on what the loader gives at its largest.
    batch = {k: jax.device_put(v) for k, v in max(first, last, key=lambda b: b["audio"].size).items()}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    started = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    consumer = args.steps * args.batch / (time.perf_counter() - started)
    shape = tuple(batch["audio"].shape)
    print(f"{config.train_data}: {len(records)} rows; batch {args.batch}, audio {shape}, {jax.devices()[0].platform}")
    print(f"pipeline delivers {loader:8.1f} examples/s")
    print(f"step consumes     {consumer:8.1f} examples/s   (pipeline / step = {loader / consumer:.2f}x)")
    assert np.isfinite(float(metrics["loss"]))


if __name__ == "__main__":
    main()
