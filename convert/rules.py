"""The declarative conversion table between `torch_ref` state dicts and `flax_whisper` state.

Both packages mirror each other's module names, so a parameter's path is the same on both sides
except for its leaf name and layout, which depend only on the layer class that owns it. `LAYERS`
says, for each mirrored layer class, how each Flax leaf is named in torch and which named,
invertible transform maps the layout. A variable owned directly by a model module (a position
table, say) keeps its name and layout.

Flax keeps each side's blocks as one stacked module (`flax_whisper/blocks.py`): a variable under
`encoder.blocks` or `decoder.blocks` has a leading layer axis, and torch holds its slices as
`blocks.0.*`, `blocks.1.*`, ... The named, invertible `LAYER_STACK` transform slices and stacks
them; an entry names one torch tensor and the layer it fills.

`build_plan(config)` walks the abstract Flax model (`nnx.eval_shape`, nothing allocated) and
returns one `Entry` per torch tensor; `check_inventory` compares a set of tensors against it and
reports every missing, unexpected and mis-shaped key by name in one error.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np
from flax import nnx

from flax_whisper import Whisper
from flax_whisper.layers import Buffer
from whisper_config import ModelConfig

# What the converter carries: trainable parameters and persistent buffers (not RNG stream state).
CARRIED = nnx.Any(nnx.Param, Buffer)


class ConversionError(ValueError):
    """Tensors do not match the model they are converted for; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named axis permutation taking the torch layout to the Flax one; its inverse goes back."""

    name: str
    to_flax_axes: tuple[int, ...] | None  # None: same layout

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        return array if self.to_flax_axes is None else np.ascontiguousarray(array.transpose(self.to_flax_axes))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.to_flax_axes is None:
            return array
        return np.ascontiguousarray(array.transpose(np.argsort(self.to_flax_axes)))

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.to_flax_axes is None:
            return tuple(flax_shape)
        inverse = np.argsort(self.to_flax_axes)
        return tuple(flax_shape[i] for i in inverse)


IDENTITY = Transform("identity", None)
LINEAR = Transform("linear_transpose", (1, 0))  # torch (out, in) <-> flax (in, out)
CONV1D = Transform("conv_permute", (2, 1, 0))  # torch (out, in, k) <-> flax (k, in, out)

# layer class (same name in torch_ref and flax_whisper) -> flax leaf -> (torch leaf, transform)
LAYERS: dict[str, dict[str, tuple[str, Transform]]] = {
    "Linear": {"kernel": ("weight", LINEAR), "bias": ("bias", IDENTITY)},
    "Conv1d": {"kernel": ("weight", CONV1D), "bias": ("bias", IDENTITY)},
    "LayerNorm": {"scale": ("weight", IDENTITY), "bias": ("bias", IDENTITY)},
    "RMSNorm": {"scale": ("weight", IDENTITY)},
    "GroupRMSNorm": {"scale": ("weight", IDENTITY), "bias": ("bias", IDENTITY)},
    "Embedding": {"embedding": ("weight", IDENTITY)},
}


STACKED = ("blocks",)  # module attributes (under encoder/decoder) whose variables carry a layer axis


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """The named transform between one stacked Flax array `(L, ...)` and L per-layer torch tensors."""

    name: str = "layer_stack"

    def to_flax(self, layers: list[np.ndarray]) -> np.ndarray:
        return np.stack(layers)

    def to_torch(self, stacked: np.ndarray) -> list[np.ndarray]:
        return [layer.copy() for layer in stacked]  # (np.ascontiguousarray would make 0-d arrays 1-d)


LAYER_STACK = LayerStack()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: its key, the Flax path it lives at (and, for stacked blocks, the layer
    it fills), the layout transform between them and both shapes (per layer)."""

    torch_key: str
    flax_path: tuple[str | int, ...]
    layer: int | None  # None: not stacked
    transform: Transform
    flax_shape: tuple[int, ...]  # of one layer
    torch_shape: tuple[int, ...]
    trainable: bool
    layers: int = 1  # the stack's depth, for stacked entries

    @property
    def flax_key(self) -> str:
        """The Flax array's dotted path (shared by every layer of a stacked array)."""
        return ".".join(str(p) for p in self.flax_path)

    @property
    def flax_layer_key(self) -> str:
        """The per-layer path of the earlier unstacked layout (`encoder.blocks.3.attn.query.kernel`)."""
        if self.layer is None:
            return self.flax_key
        side, attribute, *rest = map(str, self.flax_path)
        return ".".join([side, attribute, str(self.layer), *rest])

    def slice_of(self, array: np.ndarray) -> np.ndarray:
        """This entry's part of the Flax array at `flax_path` (its layer of a stacked array)."""
        return array if self.layer is None else array[self.layer]

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        return self.flax_shape if self.layer is None else (self.layers, *self.flax_shape)


def abstract_model(config: ModelConfig) -> Whisper:
    """The Flax model with shapes only (no memory allocated)."""
    return nnx.eval_shape(lambda: Whisper(config, rngs=nnx.Rngs(0)))


def _is_stacked(path: tuple) -> bool:
    return len(path) > 1 and path[0] in ("encoder", "decoder") and path[1] in STACKED


@functools.lru_cache(maxsize=16)
def build_plan(config: ModelConfig) -> tuple[Entry, ...]:
    """Every tensor of the model `config` describes, in both namings, in a stable order."""
    model = abstract_model(config)
    owners = {path: type(module).__name__ for path, module in nnx.iter_modules(model)}
    entries = []
    for path, variable in nnx.to_flat_state(nnx.state(model, CARRIED)):
        *owner, leaf = path
        rules = LAYERS.get(owners[tuple(owner)], {})
        if owners[tuple(owner)] in LAYERS and leaf not in rules:
            raise AssertionError(f"conversion table has no rule for {'.'.join(map(str, path))}")
        torch_leaf, transform = rules.get(leaf, (leaf, IDENTITY))
        shape = tuple(variable.get_value().shape)
        trainable = isinstance(variable, nnx.Param)
        if not _is_stacked(tuple(path)):
            torch_key = ".".join([*map(str, owner), torch_leaf])
            entries.append(
                Entry(torch_key, tuple(path), None, transform, shape, transform.torch_shape(shape), trainable)
            )
            continue
        layers, shape = shape[0], shape[1:]
        side, attribute, *inner = map(str, owner)
        for layer in range(layers):
            torch_key = ".".join([side, attribute, str(layer), *inner, torch_leaf])
            entries.append(
                Entry(torch_key, tuple(path), layer, transform, shape, transform.torch_shape(shape), trainable, layers)
            )
    return tuple(entries)


# Layers the model contract dropped. Revision 2 removed augmented memory's `memory_update`
# linear: behind the write-back's stop-gradient it never received a gradient.
REMOVED = ("memory_update",)


def drop_removed(arrays: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """`arrays` without the tensors of removed layers, saying on stderr what was dropped."""
    import sys

    dropped = sorted(k for k in arrays if any(f".{name}." in k for name in REMOVED))
    if dropped:
        sys.stderr.write(
            f"notice: {what}: dropped {len(dropped)} tensor(s) of layers the model contract removed "
            f"(revision 2: augmented memory writes its output back directly): {', '.join(dropped[:4])}"
            f"{' ...' if len(dropped) > 4 else ''}\n"
        )
    return {k: v for k, v in arrays.items() if k not in dropped}


def check_inventory(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one `ConversionError` naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(
        f"{key}: expected {tuple(expected[key])}, got {tuple(shapes[key])}"
        for key in set(shapes) & set(expected)
        if tuple(shapes[key]) != tuple(expected[key])
    )
    if missing or unexpected or misshaped:
        lines = [f"{what} does not match the model configuration:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {key}" for key in keys)
        raise ConversionError("\n".join(lines))
