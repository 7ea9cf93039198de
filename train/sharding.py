"""Sharding by rules: a ("data", "fsdp", "tensor") device mesh, and a table that says which mesh
axes split each logical axis the model names.

The model annotates, it does not decide (`flax_whisper/layers.py`): every weight carries the
logical names of its axes ("vocab", "embed", "heads", "mlp", "layers"), and activations are
pinned at block boundaries by theirs ("batch", "length", "embed_act", "vocab_act"). `RULES`
maps each name to mesh axes, as MaxText does: by default parameters and optimizer state are
sharded over "fsdp" (the token table on its vocabulary, padded to a multiple of 128 for that),
batches over "data" and "fsdp", and the MLP's hidden axis, the attention heads and the logits'
vocabulary over an optional "tensor" axis (tensor parallelism, Megatron-style). A dimension
the mesh axes do not divide stays whole; an array larger than `MIN_SHARDED_SIZE` that its names
leave unsplit over "fsdp" (Adafactor's factored moments, a model too narrow for the mesh) is
split on its largest dimension that divides, so FSDP reaches every large array. The same code
runs on 1 CPU (a 1 x 1 x 1 mesh), several devices, GPUs and TPU pods; on several hosts every
process runs the same program after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from whisper_config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
MIN_SHARDED_SIZE = 2**12  # arrays smaller than this are replicated: splitting them costs more than it saves

# logical axis -> the mesh axes that split it, outermost first. A mesh axis serves one dimension
# of an array: the first (leftmost) dimension that asks for it gets it.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),  # examples: data parallel over both axes
    ("vocab", ("tensor", "fsdp")),  # the token table's rows
    ("embed", ("fsdp",)),  # the model width of a weight: FSDP
    ("heads", ("tensor",)),  # attention projections' heads x head width
    ("mlp", ("tensor",)),  # the MLP's hidden width
    ("vocab_act", ("tensor",)),  # the logits' vocabulary
    ("layers", ()),  # the stacked layer axis: each scan step needs its whole layer
    ("length", ()),
    ("embed_act", ()),  # the residual stream's width
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); `data=-1` takes what the others leave.

    "tensor" is innermost, so a tensor-parallel group is `tensor` neighbouring devices, which must
    belong to one process: `tensor` divides each process's device count and the devices are listed
    process by process, as `jax.devices()` and a TPU topology list them (a batch row is read by
    the process whose devices hold it)."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ConfigError(f"mesh_fsdp={fsdp} x mesh_tensor={tensor} does not divide the {len(devices)} devices")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ConfigError(
            f"a {data} x {fsdp} x {tensor} (data x fsdp x tensor) mesh needs {data * fsdp * tensor} devices, "
            f"found {len(devices)}"
        )
    if tensor > 1:
        # each run of `tensor` neighbours in `devices` is one tensor group: it must sit on one process
        owners = np.asarray([device.process_index for device in devices]).reshape(-1, tensor)
        if (owners != owners[:, :1]).any():
            counts = dict(zip(*np.unique(owners, return_counts=True), strict=True))
            per_process = ", ".join(f"{int(n)} on process {int(p)}" for p, n in counts.items())
            raise ConfigError(
                f"mesh_tensor={tensor} must divide the devices of each process, listed process by process "
                f"(found {per_process})"
            )
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """The PartitionSpec the `rules` give an array of `shape` whose dimensions are named `axes`:
    each dimension takes its rule's mesh axes that are larger than 1, not yet used by an earlier
    dimension, and (dropping the innermost first) divide it."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ConfigError(f"no sharding rule for the logical axis {name!r}")
        chosen = [axis for axis in table[name] if axis not in used and mesh.shape[axis] > 1]
        while chosen and size % math.prod(mesh.shape[axis] for axis in chosen):
            chosen.pop()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _with_fsdp(spec: PartitionSpec, shape: tuple[int, ...], axes: tuple, fsdp: int) -> PartitionSpec:
    """`spec`, its largest unsplit dimension that `fsdp` divides given to "fsdp" if no dimension
    has it (never the layer axis, which each scan step reads one slice of)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))}
    if fsdp == 1 or "fsdp" in used:
        return spec
    free = [
        (size, axis)
        for axis, (size, name) in enumerate(zip(shape, axes, strict=True))
        if entries[axis] is None and name != "layers" and size % fsdp == 0
    ]
    if free:
        entries[max(free)[1]] = "fsdp"
    return PartitionSpec(*entries)


def weight_spec(shape: tuple[int, ...], axes: tuple | None, mesh: Mesh) -> PartitionSpec:
    """A parameter's or optimizer moment's PartitionSpec: by its logical `axes` (when they name
    every dimension), FSDP on the largest dimension otherwise; small arrays replicated."""
    if int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return PartitionSpec()
    if axes is None or len(axes) != len(shape):
        return _with_fsdp(PartitionSpec(), shape, (None,) * len(shape), mesh.shape["fsdp"])
    return _with_fsdp(logical_spec(axes, shape, mesh), shape, axes, mesh.shape["fsdp"])


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for every leaf of a (shape-only) training state: parameters and the optimizer
    moments shaped like them by the parameters' logical axes (optax keeps each `nnx.Variable`'s
    metadata), everything else by shape."""
    from flax import nnx

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            spec = weight_spec(tuple(leaf.get_value().shape), leaf.get_metadata().get("axes"), mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, weight_spec(tuple(leaf.shape), None, mesh))

    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch's examples are split (the "tensor" axis holds each one whole)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first (example) dimension over "data" and "fsdp"."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def check_batch(batch_size: int, accumulation_steps: int, mesh: Mesh) -> None:
    per_step = batch_size // accumulation_steps
    if per_step % batch_shards(mesh):
        raise ConfigError(
            f"a micro-batch of {per_step} examples (batch_size {batch_size} / accumulation_steps "
            f"{accumulation_steps}) does not split over {batch_shards(mesh)} devices (data x fsdp)"
        )


def activation_placement(mesh: Mesh) -> Callable | None:
    """What `flax_whisper.layers.sharding_rules` needs: logical axes and a shape -> the activation's
    NamedSharding on `mesh` (None on one device, where there is nothing to place)."""
    if mesh.size == 1:
        return None
    return lambda axes, shape: NamedSharding(mesh, logical_spec(axes, shape, mesh))


def with_activation_sharding(fn: Callable, mesh: Mesh) -> Callable:
    """`fn`, whose model activations are laid out by `RULES` on `mesh` when it is traced."""
    from flax_whisper.layers import sharding_rules

    placement = activation_placement(mesh)
    if placement is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with sharding_rules(placement):
            return fn(*args, **kwargs)

    return traced


def place_weights(params, rest, shardings, tensors, config):
    """`params` and `rest` (the model's `nnx.State`s: shapes only, or arrays) with their carried
    variables -- parameters and buffers -- set from a checkpoint's torch-named `tensors`, each
    array made straight in its sharding (`shardings`: a `TrainState` of them) by
    `convert.core.place_flax_arrays`: one array at a time, and every process reads and builds
    only the parts its own devices hold. Nothing else of the model is ever on one host."""
    from flax import nnx

    from convert.core import place_flax_arrays

    variables, targets = {}, {}
    for state, part in ((params, "params"), (rest, "rest")):
        variables.update(nnx.to_flat_state(state))
        targets.update((path, v.get_value()) for path, v in nnx.to_flat_state(getattr(shardings, part)))
    for path, placed in place_flax_arrays(tensors, config, targets, dtype=np.float32):
        variables[path].set_value(placed)
        del placed
    return params, rest
