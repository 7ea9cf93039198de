"""Sharding: a ("data", "fsdp") device mesh, parameters and optimizer state sharded over "fsdp",
batches split over both axes.

One rule covers every array of the training state, parameters and optimizer moments alike:
shard the largest dimension that the "fsdp" axis divides, replicate what is small or does not
divide. The same code runs on 1 CPU (a 1 x 1 mesh), several devices, GPUs and TPU pods; on
several hosts, call `jax.distributed.initialize()` first and every process runs the same program.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from whisper_config import ConfigError

MIN_SHARDED_SIZE = 2**12  # arrays smaller than this are replicated: splitting them costs more than it saves


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); `data=-1` takes what `fsdp` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ConfigError(f"mesh_fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ConfigError(f"a {data} x {fsdp} (data x fsdp) mesh needs {data * fsdp} devices, found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Shard the largest dimension divisible by `fsdp` over "fsdp"; replicate small arrays."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    return PartitionSpec(*([None] * axis), "fsdp")


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for every leaf of a (shape-only) training state."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first (example) dimension over every device."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def check_batch(batch_size: int, accumulation_steps: int, mesh: Mesh) -> None:
    per_step = batch_size // accumulation_steps
    if per_step % mesh.size:
        raise ConfigError(
            f"a micro-batch of {per_step} examples (batch_size {batch_size} / accumulation_steps "
            f"{accumulation_steps}) does not split over {mesh.size} devices"
        )


def place_weights(params, rest, shardings, tensors, config):
    """`params` and `rest` (the model's `nnx.State`s: shapes only, or arrays) with their carried
    variables -- parameters and buffers -- set from a checkpoint's torch-named `tensors`, each
    array placed straight into its sharding (`shardings`: a `TrainState` of them): the host
    builds one array at a time (float32) and every process materialises only the shards its
    own devices hold. Nothing else of the model is ever on one host."""
    from flax import nnx

    from convert.core import iter_flax_arrays

    variables, targets = {}, {}
    for state, part in ((params, "params"), (rest, "rest")):
        variables.update(nnx.to_flat_state(state))
        targets.update(nnx.to_flat_state(getattr(shardings, part)))
    for path, host in iter_flax_arrays(tensors, config, dtype=np.float32):
        sharding = targets[path].get_value()
        placed = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
        variables[path].set_value(placed)
        del host, placed
    return params, rest
