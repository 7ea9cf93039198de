"""Starting a run from a large checkpoint on an 8-device FSDP mesh: the host's peak memory.

    python bench/load_sharded.py CHECKPOINT [--optimizer adafactor] [--devices 8]

Runs in a child process with `--devices` CPU devices (XLA_FLAGS), builds the `Trainer` of a run
with `init_from=CHECKPOINT` and `mesh_fsdp=--devices`, and reports its peak RSS next to the
training state's size, and the most the host held while placing the weights beyond the device
buffers made so far. CPU devices live in host memory, so the state itself counts in the RSS:
what loading adds beyond it is the host's working memory, which should be about one source
tensor, never the model. A CHECKPOINT of large-v3 size comes from
`python bench/convert_large.py --workdir DIR` (DIR/flax).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, tempfile
import os, threading, time
import jax, numpy as np
import train.loop
from train.config import TrainConfig
from train.loop import Trainer

# While the weights are placed: the host's resident memory sampled every 2 ms, less what it
# held when placing began and less the device buffers made since (CPU devices live in host
# memory; each buffer counted once, however many arrays share it).
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def on_devices():
    buffers = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    return sum(buffers.values())
working = [0]
def place_weights(*args, _place=train.loop.place_weights):
    start, stop = rss() - on_devices(), threading.Event()
    def sample():
        while not stop.is_set():
            before = on_devices()  # buffers freed between the two readings make it an overestimate
            working[0] = max(working[0], rss() - start - before)
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return _place(*args)
    finally:
        stop.set()
        sampler.join()
train.loop.place_weights = place_weights

checkpoint, optimizer, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = TrainConfig(init_from=checkpoint, optimizer=optimizer, mesh_fsdp=devices, batch_size=devices,
                     eval_batch_size=devices, run_dir=tempfile.mkdtemp() + "/run", progress=False)
trainer = Trainer(config)
jax.block_until_ready(trainer.state)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
leaves = jax.tree.leaves(trainer.state)
state_bytes = sum(x.nbytes for x in leaves)
per_device = max(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                 for d in jax.local_devices())
params = jax.tree.leaves(trainer.state.params)
largest = max(x.nbytes for x in params)
print(json.dumps({"peak": peak * 1024, "baseline": baseline * 1024, "state": state_bytes,
                  "per_device": per_device, "largest": largest, "devices": len(jax.devices()),
                  "working": working[0]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, args.checkpoint, args.optimizer, str(args.devices)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    r = json.loads(done.stdout.strip().splitlines()[-1])
    gb = 2**30
    beyond = r["peak"] - r["state"] - r["baseline"]
    print(f"checkpoint {args.checkpoint}, {args.optimizer}, {r['devices']} CPU devices (FSDP)")
    print(f"training state      {r['state'] / gb:6.2f} GB ({r['per_device'] / gb:.2f} GB on the fullest device)")
    print(f"peak RSS            {r['peak'] / gb:6.2f} GB (process baseline before loading {r['baseline'] / gb:.2f} GB)")
    print(f"beyond the state    {beyond / gb:6.2f} GB; the largest parameter array is {r['largest'] / gb:.2f} GB")
    print(f"placing the weights {r['working'] / gb:6.2f} GB at most beyond the shards placed so far (every 2 ms)")


if __name__ == "__main__":
    main()
