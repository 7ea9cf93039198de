"""The sharded training step compiled for a TPU slice, on a machine without one.

    python -m venv /tmp/tpu-env && . /tmp/tpu-env/bin/activate
    pip install "jax[tpu]==$JAX_VERSION" -e .        # JAX_VERSION: this project's jax
    python bench/tpu_program.py [--topology v5e:2x4] [--fsdp 8] [--tensor 1] [--size small]
        [--layers scan] [--checkpointing none] [--batch 32] [--dump FILE]

libtpu compiles for a described TPU topology without its chips (deviceless compilation), as
`python -m train` would on that slice: the state sharded by the project's logical-axis rules over
a (data, fsdp, tensor) mesh of the topology's chips, the batch split over data x fsdp, bfloat16,
AdamW, 30 s of audio and 448 label tokens a row. The model's code asks `jax.default_backend()`
which kernels to take; here it answers "tpu". Prints the compile time, what XLA's buffer
assignment gives each chip (its shard of the state and batch, temporaries, outputs), the FLOPs a
chip runs a step, and the collectives by kind (inside the layers' loop, counted once). No
timing: a program that compiles and fits is what this shows, not its speed. Set
`TPU_WORKER_HOSTNAMES=localhost` to quiet libtpu's search for the slice's hosts.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def collectives(text: str) -> dict[str, int]:
    """The collective operations of a compiled program's text, by kind (their asynchronous
    start/done pairs counted once)."""
    found = re.findall(rf" ({'|'.join(COLLECTIVES)})(?:-start)?\(", text)
    return dict(sorted(collections.Counter(found).items()))


def arguments() -> argparse.ArgumentParser:
    from whisper_config import SIZES
    from whisper_config.config import ATTENTION_KINDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--topology", default="v5e:2x4", help="a TPU topology name libtpu knows, e.g. v5e:2x4, v4:2x2x2"
    )
    parser.add_argument("--fsdp", type=int, default=8, help="the mesh's fsdp axis (data takes the chips left)")
    parser.add_argument("--tensor", type=int, default=1, help="the mesh's tensor axis")
    parser.add_argument("--size", default="small", choices=tuple(SIZES))
    parser.add_argument("--mechanism", default="mha", choices=ATTENTION_KINDS, help="attention, both sides")
    parser.add_argument("--layers", choices=("unrolled", "scan"), default="scan")
    parser.add_argument(
        "--checkpointing",
        choices=("none", "full", "save_matmuls"),
        default="none",
        help="gradient checkpointing of each block and its remat policy (default: none, as training's default)",
    )
    parser.add_argument("--batch", type=int, default=32, help="rows a step, over the whole slice")
    parser.add_argument("--dump", type=Path, help="write the compiled program's text here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)

    import jax
    import numpy as np
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    except Exception as error:  # no libtpu: say what to install
        raise SystemExit(f"deviceless TPU compilation needs libtpu (pip install 'jax[tpu]'): {error}") from error
    devices = topology.devices
    jax.default_backend = lambda: "tpu"  # what the model's code asks when it chooses kernels and layouts

    from flax import nnx

    from flax_whisper import Whisper
    from train.config import TrainConfig
    from train.loop import sharded_train_step
    from train.sharding import batch_sharding, make_mesh, state_shardings
    from train.step import Graphs, make_optimizer, new_state
    from whisper_config import ConfigError

    try:
        mesh = make_mesh(fsdp=args.fsdp, tensor=args.tensor, devices=devices)
    except ConfigError as error:
        raise SystemExit(f"{args.topology} ({len(devices)} chips): {error}") from error
    model = {
        "encoder_attention": args.mechanism,
        "decoder_attention": args.mechanism,
        "unroll_layers": args.layers == "unrolled",
    }
    if args.checkpointing != "none":
        model.update(gradient_checkpointing=True, remat_policy=args.checkpointing)
    config = TrainConfig(
        preset="whisper", size=args.size, precision="bfloat16", optimizer="adamw", batch_size=args.batch,
        time_masks=0, freq_masks=0, model=model, run_dir="unused",
    )  # fmt: skip
    model_config = config.model_config()
    tx = make_optimizer(config)

    def make():
        return Whisper(model_config, rngs=nnx.Rngs(0))

    shapes = jax.eval_shape(lambda: new_state(make(), tx))  # nothing is allocated
    shardings = state_shardings(shapes, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    rows = batch_sharding(mesh)
    batch = {
        "mel": jax.ShapeDtypeStruct(
            (args.batch, model_config.n_mels, 2 * model_config.n_audio_ctx), np.float32, sharding=rows
        ),
        "labels": jax.ShapeDtypeStruct((args.batch, 448), np.int32, sharding=rows),
    }
    step = sharded_train_step(config, Graphs.of(nnx.eval_shape(make)), tx, mesh, shardings)
    print(f"{args.topology}: {len(devices)} chips ({devices[0].device_kind}), mesh {dict(mesh.shape)}")
    print(
        f"whisper/{args.size} {args.mechanism}, layers {args.layers}, checkpointing {args.checkpointing}, "
        f"batch {args.batch} x 30 s, 448 tokens, bfloat16"
    )
    began = time.perf_counter()
    compiled = step.trace(state, batch).lower().compile()
    print(f"compiled in {time.perf_counter() - began:.1f} s")
    memory = compiled.memory_analysis()
    print(
        f"per chip: arguments {memory.argument_size_in_bytes / 1e9:.2f} GB (its shard of the state and batch), "
        f"temporaries {memory.temp_size_in_bytes / 1e9:.2f} GB, outputs {memory.output_size_in_bytes / 1e9:.2f} GB"
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and cost.get("flops"):
        print(f"FLOPs a chip a step: {cost['flops']:.3e} (XLA's cost analysis; a loop body counted once)")
    text = compiled.as_text()
    print(f"collectives: {collectives(text) or 'none'}")
    if args.dump:
        args.dump.parent.mkdir(parents=True, exist_ok=True)
        args.dump.write_text(text)


if __name__ == "__main__":
    main()
