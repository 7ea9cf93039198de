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
from collections.abc import Callable, Mapping

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

    def to_flax_view(self, array: np.ndarray) -> np.ndarray:
        """`to_flax` without the copy: a transposed view."""
        return array if self.to_flax_axes is None else array.transpose(self.to_flax_axes)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self.to_flax_axes is None:
            return array
        return np.ascontiguousarray(array.transpose(np.argsort(self.to_flax_axes)))

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.to_flax_axes is None:
            return tuple(flax_shape)
        inverse = np.argsort(self.to_flax_axes)
        return tuple(flax_shape[i] for i in inverse)

    def bind(self, config: ModelConfig) -> Transform:
        """This transform for one model (a permutation needs nothing of it)."""
        return self

    @property
    def on_file(self) -> Transform:
        """The transform a Flax checkpoint file's layout takes (the model's own)."""
        return self

    def file_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a Flax checkpoint file holds for a model array of `flax_shape`."""
        return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class PadRows:
    """The named transform between a torch table of `rows` rows and the Flax one padded with
    zero rows to `padded` (`ModelConfig.padded_vocab`); back, the padding is dropped. Flax
    checkpoint files keep the true rows (`on_file`), as every other format does."""

    name: str
    rows: int = 0
    padded: int = 0

    def bind(self, config: ModelConfig) -> PadRows:
        return dataclasses.replace(self, rows=config.n_vocab, padded=config.padded_vocab)

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if len(array) == self.padded:
            return array
        table = np.zeros((self.padded, *array.shape[1:]), array.dtype)
        table[: self.rows] = array
        return table

    to_flax_view = to_flax

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return array[: self.rows]

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.rows, *flax_shape[1:])

    file_shape = torch_shape

    @property
    def on_file(self) -> Transform:
        return IDENTITY


IDENTITY = Transform("identity", None)
LINEAR = Transform("linear_transpose", (1, 0))  # torch (out, in) <-> flax (in, out)
CONV1D = Transform("conv_permute", (2, 1, 0))  # torch (out, in, k) <-> flax (k, in, out)
VOCAB_PADDING = PadRows("vocab_padding")  # torch (n_vocab, d) <-> flax (padded_vocab, d)

# layer class (same name in torch_ref and flax_whisper) -> flax leaf -> (torch leaf, transform)
LAYERS: dict[str, dict[str, tuple[str, Transform]]] = {
    "Linear": {"kernel": ("weight", LINEAR), "bias": ("bias", IDENTITY)},
    "Conv1d": {"kernel": ("weight", CONV1D), "bias": ("bias", IDENTITY)},
    "LayerNorm": {"scale": ("weight", IDENTITY), "bias": ("bias", IDENTITY)},
    "RMSNorm": {"scale": ("weight", IDENTITY)},
    "GroupRMSNorm": {"scale": ("weight", IDENTITY), "bias": ("bias", IDENTITY)},
    "Embedding": {"embedding": ("weight", VOCAB_PADDING)},
}


STACKED = ("blocks",)  # module attributes (under encoder/decoder) whose variables carry a layer axis


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """The named transform between one stacked Flax array `(L, ...)` and L per-layer torch tensors."""

    name: str = "layer_stack"

    def to_flax(self, layers, count: int | None = None, dtype=None) -> np.ndarray:
        """Per-layer arrays -> one `(L, ...)` array (in `dtype`, default the first layer's). `layers`
        may be any iterable of `count` arrays: each is copied in as it comes, so a generator that
        reads them one by one never holds more than one besides the result."""
        count = len(layers) if count is None else count
        layers = iter(layers)
        first = np.asarray(next(layers))
        stacked = np.empty((count, *first.shape), first.dtype if dtype is None else dtype)
        stacked[0] = first
        del first
        for index in range(1, count):
            stacked[index] = next(layers)
        return stacked

    def layer(self, stacked, index: int):
        """Layer `index` of a stacked array (a view)."""
        return stacked[index]

    def to_torch(self, stacked: np.ndarray) -> list[np.ndarray]:
        # (a copy per layer; np.ascontiguousarray would make 0-d arrays 1-d)
        return [self.layer(stacked, index).copy() for index in range(len(stacked))]


LAYER_STACK = LayerStack()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor: its key, the Flax path it lives at (and, for stacked blocks, the layer
    it fills), the layout transform between them and both shapes (per layer)."""

    torch_key: str
    flax_path: tuple[str | int, ...]
    layer: int | None  # None: not stacked
    transform: Transform | PadRows
    flax_shape: tuple[int, ...]  # of one layer, in the model
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
        return array if self.layer is None else LAYER_STACK.layer(array, self.layer)

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        return self.flax_shape if self.layer is None else (self.layers, *self.flax_shape)

    @property
    def file_shape(self) -> tuple[int, ...]:
        """`stacked_shape` as a Flax checkpoint file holds it (the true vocabulary's rows)."""
        shape = self.transform.file_shape(self.flax_shape)
        return shape if self.layer is None else (self.layers, *shape)


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
        transform = transform.bind(config)
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


# ----------------------------------------------------------------------------- file formats' names
#
# A format that is not torch_ref's own names its tensors differently. Each is a table of rows
# (torch_ref module path, the format's module path), `*` standing for a layer number; a tensor's
# leaf (`weight`, `bias`) follows its module unchanged, and a row naming a whole tensor maps just
# that tensor. Names no row matches keep their name (`identity_rest`) or are an error.


@dataclasses.dataclass(frozen=True)
class Names:
    """A named, invertible renaming of tensors between torch_ref and a file format."""

    name: str
    rows: tuple[tuple[str, str], ...]
    identity_rest: bool = False  # names no row matches are the same in both

    def _apply(self, key: str, rows) -> str | None:
        parts = key.split(".")
        for source, target in rows:
            pattern = source.split(".")
            if len(parts) < len(pattern):
                continue
            layers = []
            for part, want in zip(parts, pattern, strict=False):
                if want == "*" and part.isdigit():
                    layers.append(part)
                elif part != want:
                    break
            else:
                out = [layers.pop(0) if t == "*" else t for t in target.split(".")]
                return ".".join([*out, *parts[len(pattern) :]])
        return key if self.identity_rest else None

    def to_format(self, key: str) -> str | None:
        """The format's name of torch_ref tensor `key` (None: the format has no such tensor)."""
        return self._apply(key, self.rows)

    def from_format(self, key: str) -> str | None:
        """The torch_ref name of the format's tensor `key` (None: not a tensor of this model)."""
        return self._apply(key, [(target, source) for source, target in self.rows])


# OpenAI Whisper `.pt` files: torch_ref's names, but for the MLP OpenAI built as nn.Sequential.
OPENAI_NAMES = Names(
    "openai_names",
    (
        ("encoder.blocks.*.mlp.fc1", "encoder.blocks.*.mlp.0"),
        ("encoder.blocks.*.mlp.fc2", "encoder.blocks.*.mlp.2"),
        ("decoder.blocks.*.mlp.fc1", "decoder.blocks.*.mlp.0"),
        ("decoder.blocks.*.mlp.fc2", "decoder.blocks.*.mlp.2"),
    ),
    identity_rest=True,
)

# Hugging Face `transformers` (`WhisperForConditionalGeneration`). Its `proj_out` is tied to the
# token table: written nowhere, and when a file has it, it must equal `embed_tokens`.
_HF_BLOCK = (
    ("attn.query", "self_attn.q_proj"),
    ("attn.key", "self_attn.k_proj"),
    ("attn.value", "self_attn.v_proj"),
    ("attn.out", "self_attn.out_proj"),
    ("attn_ln", "self_attn_layer_norm"),
    ("cross_attn.query", "encoder_attn.q_proj"),
    ("cross_attn.key", "encoder_attn.k_proj"),
    ("cross_attn.value", "encoder_attn.v_proj"),
    ("cross_attn.out", "encoder_attn.out_proj"),
    ("cross_attn_ln", "encoder_attn_layer_norm"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("mlp_ln", "final_layer_norm"),
)
HF_NAMES = Names(
    "hf_names",
    (
        ("encoder.conv1", "model.encoder.conv1"),
        ("encoder.conv2", "model.encoder.conv2"),
        ("encoder.positional_embedding", "model.encoder.embed_positions.weight"),
        ("encoder.ln_post", "model.encoder.layer_norm"),
        ("decoder.token_embedding", "model.decoder.embed_tokens"),
        ("decoder.positional_embedding", "model.decoder.embed_positions.weight"),
        ("decoder.ln", "model.decoder.layer_norm"),
        *(
            (f"{side}.blocks.*.{ours}", f"model.{side}.layers.*.{theirs}")
            for side in ("encoder", "decoder")
            for ours, theirs in _HF_BLOCK
        ),
    ),
)
HF_TIED_OUTPUT = "proj_out.weight"  # the output projection HF ties to model.decoder.embed_tokens.weight


def rename(tensors: Mapping, to: Callable[[str], str | None], what: str) -> dict:
    """`tensors` under the names `to` gives; names it does not know are one error listing them."""
    renamed, unknown = {}, []
    for key, value in tensors.items():
        new = to(key)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    if unknown:
        raise ConversionError(f"{what}: tensors this model does not have: {', '.join(sorted(unknown)[:8])}")
    return renamed


# Layers the model contract dropped. Revision 2 removed augmented memory's `memory_update`
# linear: behind the write-back's stop-gradient it never received a gradient.
REMOVED = ("memory_update",)


def drop_removed(arrays: Mapping[str, np.ndarray], what: str) -> Mapping[str, np.ndarray]:
    """`arrays` without the tensors of removed layers, saying on stderr what was dropped."""
    import sys

    dropped = sorted(k for k in arrays if any(f".{name}." in k for name in REMOVED))
    if dropped:
        sys.stderr.write(
            f"notice: {what}: dropped {len(dropped)} tensor(s) of layers the model contract removed "
            f"(revision 2: augmented memory writes its output back directly): {', '.join(dropped[:4])}"
            f"{' ...' if len(dropped) > 4 else ''}\n"
        )
    if hasattr(arrays, "without"):  # lazily read tensors stay lazy
        return arrays.without(*dropped)
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
