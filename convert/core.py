"""Tensors between the two frameworks, through the plan of `rules.py`.

The interchange form is a flat dict of NumPy arrays under `torch_ref` names (what a
`model.safetensors` holds). Going to Flax needs no torch; building the torch model does.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.rules import CARRIED, LAYER_STACK, abstract_model, build_plan, check_inventory
from convert.tensors import LazyTensors, Spec, dtype_of, shapes_of
from flax_whisper import Whisper
from whisper_config import ModelConfig

Tensors = dict[str, np.ndarray]


def check_torch_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, what: str = "checkpoint") -> None:
    """Raise `ConversionError` unless `tensors` are exactly the torch state of `config`'s model."""
    expected = {e.torch_key: e.torch_shape for e in build_plan(config)}
    check_inventory(shapes_of(tensors), expected, what)


def _by_array(plan) -> dict[tuple, list]:
    """The plan's entries grouped by the Flax array they fill (stacked arrays: one per layer, in order)."""
    groups: dict[tuple, list] = {}
    for entry in plan:
        groups.setdefault(entry.flax_path, []).append(entry)
    return groups


def torch_to_flax_state(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> nnx.State:
    """torch-named arrays -> the Flax `nnx.State` of parameters and buffers (checked, float32)."""
    state = nnx.state(abstract_model(config), CARRIED)
    flat = dict(nnx.to_flat_state(state))
    for path, array in iter_flax_arrays(tensors, config, dtype=np.float32):
        flat[path].set_value(jnp.asarray(array))
    return state


def iter_flax_arrays(tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype=None, for_file: bool = False):
    """(Flax path, array) for every array of the model's carried state, one at a time: each
    torch tensor read, transposed and copied once (layer stacks filled in place), in the
    tensors' own dtype unless `dtype` is given. Only the array being built is held (a Flax
    source's stacks, `LazyTensors.stacks`, are taken whole). `for_file`:
    in a Flax checkpoint file's layout (the token table unpadded) instead of the model's."""
    check_torch_tensors(tensors, config)
    stacks = getattr(tensors, "stacks", None)
    for path, entries in _by_array(build_plan(config)).items():
        transform = entries[0].transform.on_file if for_file else entries[0].transform
        if stacks is not None and entries[0].layer is not None:
            # From a Flax state: each stack as it is, not stacked again from its layers.
            stack = np.asarray(stacks[entries[0].flax_key])
            yield path, stack if dtype is None else stack.astype(dtype, copy=False)
            continue
        if entries[0].layer is None:
            array = transform.to_flax(np.asarray(tensors[entries[0].torch_key]))
            yield path, array if dtype is None else array.astype(dtype, copy=False)
            continue
        # Layers in order (`_by_array`), read one by one as the stack is filled.
        layers = (transform.to_flax_view(np.asarray(tensors[e.torch_key])) for e in entries)
        yield path, LAYER_STACK.to_flax(layers, len(entries), dtype)


def _region(entries, tensors: Mapping, dtype):
    """index (a tuple of slices) -> that part of the Flax array `entries` fill, in `dtype`, read
    from `tensors` with little held besides it: a layer stack's region takes its layers one at a
    time and keeps only their slices (a Flax checkpoint's stack, `LazyTensors.stacks`, is read
    region by region from the chunks it is stored in, or whole once when it is one chunk); any
    other array is built once, kept while its regions are asked for, then dropped with this
    function."""
    first = entries[0]
    stacks = getattr(tensors, "stacks", None)
    stored = stacks.spec(first.flax_key) if isinstance(stacks, LazyTensors) and first.layer is not None else None
    if stored is not None and stored.read_region is not None and stored.shape == first.stacked_shape:
        return lambda index: np.asarray(stored.read_region(index), dtype)
    if first.layer is None or stacks is not None:
        whole: list = []

        def region(index):
            if not whole:
                if first.layer is None:
                    whole.append(first.transform.to_flax_view(np.asarray(tensors[first.torch_key])))
                else:
                    whole.append(np.asarray(stacks[first.flax_key]))
            return np.array(whole[0][index], dtype)

        return region

    def stack_region(index):
        rows = range(len(entries))[index[0]]
        parts = (first.transform.to_flax_view(np.asarray(tensors[entries[i].torch_key]))[index[1:]] for i in rows)
        return LAYER_STACK.to_flax(parts, len(rows), dtype)

    return stack_region


def place_flax_arrays(tensors: Mapping[str, np.ndarray], config: ModelConfig, shardings: Mapping, dtype=np.float32):
    """(Flax path, `jax.Array`) for every array of the model's carried state, each made straight
    in its sharding (`shardings`: Flax path -> `jax.sharding.Sharding`), one array and one device
    at a time, and on each process only the parts its own devices hold (`place_by_regions`): the
    host holds at most one source tensor (a torch tensor, or a Flax checkpoint's stored array)
    besides the region being placed."""
    check_torch_tensors(tensors, config)
    for path, entries in _by_array(build_plan(config)).items():
        region = _region(entries, tensors, dtype)
        placed = place_by_regions(entries[0].stacked_shape, shardings[path], region)
        del region
        _return_freed_memory()
        yield path, placed


def _return_freed_memory() -> None:
    """Hand the memory freed by the last array's reads back to the system (glibc keeps freed
    blocks of its per-thread arenas, which TensorStore's and XLA's threads each have, so the
    process would otherwise grow by a few arrays' worth while loading). A no-op elsewhere."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def place_by_regions(shape: tuple[int, ...], sharding, region) -> jax.Array:
    """The `jax.Array` of `shape` in `sharding` whose parts are `region(index)`, made one device
    at a time (each region on the host only until its device holds it), unlike
    `jax.make_array_from_callback`, which builds every local region before placing any."""
    shards, made = [], {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in made:  # a replicated part is built once per process
            made.clear()
            made[key] = region(index)
        shards.append(jax.device_put(made[key], device).block_until_ready())
    made.clear()
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def torch_to_flax_arrays(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict:
    """torch-named arrays -> the nested dict of Flax arrays a checkpoint stores (`nnx.to_pure_dict`
    layout, the token table's true rows), in the tensors' own dtype."""
    tree: dict = {}
    for path, array in iter_flax_arrays(tensors, config, for_file=True):
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = array
    return tree


def flax_arrays_lazily(arrays: Mapping[str, np.ndarray], config: ModelConfig) -> LazyTensors:
    """Flax arrays under dotted paths (`encoder.blocks.attn.query.kernel`, stacked over layers)
    -> torch-named tensors (checked), each sliced and transposed only when read: nothing is
    copied up front. `arrays` are a model's state or a checkpoint file's (whose token table has
    the true rows). Checkpoints of earlier versions, whose blocks were stored one per layer
    (`encoder.blocks.3.attn.query.kernel`), load too."""
    plan = build_plan(config)
    shapes = shapes_of(arrays)
    per_layer = any(e.layer is not None and e.flax_layer_key in arrays for e in plan)

    def expected(key: str, model_shape: tuple, file_shape: tuple) -> tuple:
        return model_shape if shapes.get(key) == model_shape else file_shape

    if per_layer:
        layout = {e.flax_layer_key: expected(e.flax_layer_key, e.flax_shape, e.transform.file_shape(e.flax_shape))
                  for e in plan}  # fmt: skip
        check_inventory(shapes, layout, "Flax state (per-layer layout)")
    else:
        layout = {e.flax_key: expected(e.flax_key, e.stacked_shape, e.file_shape) for e in plan}
        check_inventory(shapes, layout, "Flax state")

    def reader(entry):
        if per_layer:
            return lambda: entry.transform.to_torch(np.asarray(arrays[entry.flax_layer_key]))
        return lambda: entry.transform.to_torch(np.asarray(entry.slice_of(arrays[entry.flax_key])))

    return LazyTensors(
        {
            e.torch_key: Spec(e.torch_shape, dtype_of(arrays, e.flax_layer_key if per_layer else e.flax_key),
                              reader(e), e.flax_key)
            for e in plan
        },
        stacks=None if per_layer else arrays,
    )  # fmt: skip


def flax_arrays_to_torch(arrays: Mapping[str, np.ndarray], config: ModelConfig) -> Tensors:
    """`flax_arrays_lazily`, every tensor read now."""
    return dict(flax_arrays_lazily(arrays, config))


def flax_state_to_torch(state: nnx.State, config: ModelConfig) -> Tensors:
    """The Flax parameters and buffers of a model (an `nnx.State`) -> torch-named NumPy arrays."""
    arrays = {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(state)}
    return flax_arrays_to_torch(arrays, config)


def flax_to_torch(model: Whisper) -> Tensors:
    """A Flax `Whisper` -> torch-named NumPy arrays."""
    return flax_state_to_torch(nnx.state(model, CARRIED), model.config)


def flax_to_torch_lazily(model: Whisper) -> LazyTensors:
    """A Flax `Whisper` -> torch-named tensors, each copied out of the model only when read."""
    flat = nnx.to_flat_state(nnx.state(model, CARRIED))
    return flax_arrays_lazily({".".join(map(str, path)): v.get_value() for path, v in flat}, model.config)


def new_flax_model(config: ModelConfig, tensors: Mapping[str, np.ndarray], seed: int = 0) -> Whisper:
    """A Flax `Whisper` holding `tensors`, without first allocating a random initialisation.

    Parameters and buffers come from `tensors`; the remaining state (dropout RNG streams) is
    built under `jit`, which drops the unused parameter initialisers.
    """
    carried = torch_to_flax_state(tensors, config)
    graphdef, _ = nnx.split(abstract_model(config))

    @jax.jit
    def rest():
        return nnx.state(Whisper(config, rngs=nnx.Rngs(seed)), nnx.Not(CARRIED))

    return nnx.merge(graphdef, carried, rest())


def new_torch_model(config: ModelConfig, tensors: Mapping[str, np.ndarray]):
    """A `torch_ref.Whisper` holding `tensors` (checked by name and shape first), float32."""
    import torch

    from torch_ref import Whisper as TorchWhisper

    check_torch_tensors(tensors, config)
    with torch.device("meta"):
        model = TorchWhisper(config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def torch_to_numpy(model) -> Tensors:
    """A `torch_ref.Whisper` -> torch-named NumPy arrays (parameters and persistent buffers)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
