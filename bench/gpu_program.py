"""What XLA's programs for an NVIDIA GPU launch, read on a machine without one.

    python -m venv /tmp/gpu-env && . /tmp/gpu-env/bin/activate
    pip install "jax[cuda12]==$JAX_VERSION" -e .        # JAX_VERSION: this project's jax
    python bench/gpu_program.py [--programs train,decode1,decode32] [--size small] [--dump DIR]

jax's CUDA plugin compiles for a described GPU without one (deviceless compilation; `--target`,
default `bench/h200.txtpb`, compute capability 9.0). The model's code asks `jax.default_backend()`
which layouts and kernels to use; here it answers "gpu", so the programs are the ones a GPU run
traces. XLA does not autotune without the device: products take its default tilings (split-K
choices may differ on the device); fusion, layouts, copies and the decoding loop's body are the
device's.

For each program (`train`: the bfloat16 training step at batch 32, 448 tokens, `--mechanism` (default
`mha`) on both sides, layers unrolled or, with `--layers scan`, under the layer scan (each loop
body counted as many times as it runs);
`decodeN`: greedy decoding at batch N, 128 new tokens, bfloat16), prints the kernels launched
(the step's, its update's branch included; for decoding, the body of the loop run once per token)
and the bytes they write (an in-place update: the slice it writes), by kind, the largest first:
copies, transposes and format conversions show up here before any profile. `--dump DIR` writes
each compiled program's text, which `--read DIR` reports again without compiling.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

TARGET = Path(__file__).resolve().parent / "h200.txtpb"
# Top-level instructions that launch nothing.
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "opt-barrier", "after-all", "partition-id"}
CONTROL = {"while", "conditional", "call"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}


def computations(text: str) -> dict[str, list[str]]:
    """Compiled HLO text -> each computation's instruction lines."""
    found, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if head:
            current = found.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return found


def written(shape: str) -> int:
    """Bytes of an HLO result type such as `(f32[2,3]{1,0}, bf16[4]{0})`."""
    return sum(
        int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * BYTES.get(dtype, 4)
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape)
    )


def update_size(body: list[str]) -> int | None:
    """Bytes a fusion ending in a dynamic-update-slice writes (the update, in place), or None."""
    root = next((line for line in body if line.startswith("ROOT ")), "")
    operands = re.search(r" dynamic-update-slice\(%[\w.\-]+, %([\w.\-]+)", root)
    if not operands:
        return None
    update = next(line for line in body if line.startswith(f"%{operands.group(1)} = "))
    return written(update.split(" = ", 1)[1].split(" ")[0])


def kernels(comps: dict[str, list[str]], name: str, loops: bool = True) -> list[tuple[str, int]]:
    """(kind, bytes written) of each launch among a computation's top-level instructions, those
    of each conditional's true branch (the training step's update) and, with `loops`, as many
    times as it runs, each loop's body with a known trip count (the layer scan's)."""
    found = []
    for line in comps[name]:
        match = re.match(r"(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\(", line)
        if not match or match.group(3) in FREE:
            continue
        instruction, shape, op = match.groups()
        if op in CONTROL:
            branch = re.search(r"true_computation=%([\w.\-]+)", line)
            found += kernels(comps, branch.group(1), loops) if op == "conditional" and branch else []
            body, trips = re.search(r"body=%([\w.\-]+)", line), re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            found += kernels(comps, body.group(1)) * int(trips.group(1)) if loops and op == "while" and trips else []
            continue
        if op == "custom-call":
            kind = "custom-call " + re.search(r'custom_call_target="([^"]*)"', line).group(1)
        else:
            kind = re.sub(r"[._]\d+$", "", instruction)  # XLA names a fusion after what it does
        fused = re.search(r"calls=%([\w.\-]+)", line)
        in_place = update_size(comps[fused.group(1)]) if fused else None
        found.append((kind, written(shape) if in_place is None else in_place))
    return found


def report(name: str, text: str, loop: bool) -> None:
    comps = computations(text)
    entry = re.search(r"^ENTRY %([\w.\-]+)", text, re.M).group(1)
    where = entry
    if loop:  # the body of the loop run once per token: the while body launching the most itself
        bodies = {m for lines in comps.values() for line in lines for m in re.findall(r"body=%([\w.\-]+)", line)}
        where = max(bodies, key=lambda body: len(kernels(comps, body, loops=False)))
    launched = kernels(comps, where)
    by_kind, count = collections.Counter(), collections.Counter()
    for kind, size in launched:
        by_kind[kind] += size
        count[kind] += 1
    total = sum(size for _, size in launched)
    print(f"{name}: {len(launched)} kernels {'per token' if loop else 'a step'}, writing {total / 1e9:.2f} GB")
    for kind, size in by_kind.most_common(12):
        print(f"  {size / 1e9:8.3f} GB  {count[kind]:5d}  {kind}")
    moved = {kind: count[kind] for kind in count if kind in ("copy", "wrapped_convert") or "transpose" in kind}
    print(f"  copies, transposes and lone conversions: {sum(moved.values())} {dict(sorted(moved.items())) or ''}")


def program_names(text: str) -> list[str]:
    """An argparse `type`: "train,decode1,decode32" -> the names, each `train` or `decode` and a
    batch size, else argparse's usage error (before anything is compiled)."""
    names = text.split(",")
    unknown = [name for name in names if name != "train" and not re.fullmatch(r"decode[1-9][0-9]*", name)]
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise argparse.ArgumentTypeError(f"unknown program {listed}: train or decodeN (N a batch size)")
    return names


def arguments() -> argparse.ArgumentParser:
    """The command line, checked as it is read: a misspelt program, size or mechanism stops the run
    before the first (minutes-long) compilation rather than after it."""
    from whisper_config import SIZES
    from whisper_config.config import ATTENTION_KINDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", default="train,decode1,decode32", type=program_names)
    parser.add_argument("--size", default="small", choices=tuple(SIZES))
    parser.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled", help="the training step's layers")
    parser.add_argument(
        "--mechanism", default="mha", choices=ATTENTION_KINDS, help="the training step's attention, both sides"
    )
    parser.add_argument("--target", type=Path, default=TARGET, help="the GPU described (an XLA GpuTargetConfig)")
    parser.add_argument("--dump", type=Path, help="write each compiled program's text here")
    parser.add_argument("--read", type=Path, help="report the programs a --dump wrote there, compiling nothing")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.read:
        for name in args.programs:
            path = args.read / f"{name}.hlo"
            if not path.is_file():
                raise SystemExit(f"no {path}: write it first with --programs {name} --dump {args.read}")
            report(name, path.read_text(), loop=name != "train")
        return

    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # read when the CUDA plugin starts

    jax.config.update("jax_platforms", "cpu")  # traced on the CPU, compiled for the topology's GPU
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=args.target.read_text(), topology="1x1x1"
        )
    except Exception as error:  # no CUDA plugin: say what to install
        needs = "deviceless GPU compilation needs jax's CUDA plugin (pip install 'jax[cuda12]')"
        raise SystemExit(f"{needs}: {error}") from error
    placed = NamedSharding(topologies.make_mesh(topology, (1,), ("devices",)), PartitionSpec())
    jax.default_backend = lambda: "gpu"  # what the model's code asks when it chooses layouts and kernels

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), tree)

    for name in args.programs:
        if name == "train":
            compiled = train_program(args.size, abstract, args.layers == "unrolled", args.mechanism)
        else:
            compiled = decode_program(args.size, int(name[len("decode") :]), abstract)
        text = compiled.as_text()
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.hlo").write_text(text)
        report(name, text, loop=name != "train")
        memory = compiled.memory_analysis()
        if memory is not None:  # XLA's buffer assignment for the device: what the program holds beyond its inputs
            temporaries, outputs = memory.temp_size_in_bytes / 1e9, memory.output_size_in_bytes / 1e9
            print(f"  temporaries {temporaries:.2f} GB, outputs {outputs:.2f} GB")


def train_program(size: str, abstract, unrolled: bool = True, mechanism: str = "mha"):
    from steps import abstract_train_step

    from train.config import TrainConfig

    model = {"encoder_attention": mechanism, "decoder_attention": mechanism, "unroll_layers": unrolled}
    config = TrainConfig(preset="whisper", size=size, precision="bfloat16", time_masks=0, freq_masks=0, model=model)
    step, state, shapes = abstract_train_step(config, 32, 3000, 448)
    return step.trace(abstract(state), abstract(shapes)).lower().compile()


def decode_program(size: str, batch: int, abstract):
    from flax import nnx

    from flax_whisper import Whisper
    from flax_whisper.decoding import _greedy_decode_jit
    from whisper_config import ModelConfig
    from whisper_io.decoding import DecodingOptions, steps_per_check

    config = ModelConfig.from_preset("whisper", size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Whisper(config, rngs=nnx.Rngs(0))))
    eot = config.n_vocab - 1  # any id: the program does not depend on which
    options = DecodingOptions(eot=eot, max_new_tokens=128, suppress_tokens=(eot - 1,), blank_tokens=(eot - 2,))
    prompt = np.tile(np.asarray([config.start_token_id, 1, 2, 3], np.int32), (batch, 1))
    mel = abstract(jax.ShapeDtypeStruct((batch, config.n_mels, 2 * config.n_audio_ctx), jnp.bfloat16))
    real = abstract(jax.ShapeDtypeStruct((batch,), jnp.int32))
    traced = _greedy_decode_jit.trace(
        graphdef,
        abstract(state),
        mel,
        abstract(jnp.asarray(prompt)),
        options,
        abstract(jax.random.key(0)),
        real,
        abstract(jnp.float32(0)),
        steps_per_check("gpu"),
    )
    return traced.lower().compile()


if __name__ == "__main__":
    main()
