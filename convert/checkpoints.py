"""Checkpoint formats, detection, loading and saving.

- torch: a directory with `config.json` and `model.safetensors` (torch_ref names).
- flax: a directory with `config.json` and an orbax checkpoint of the Flax parameters in `state/`.
- openai: an OpenAI Whisper `.pt` file (see `openai.py`).
- hf: a Hugging Face `transformers` Whisper directory (see `hf.py`).

Every loader returns a `Checkpoint`: the config plus torch_ref-named tensors, checked against
the config by name and shape; safetensors files are read lazily, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from convert.core import check_torch_tensors, flax_arrays_lazily, torch_to_flax_arrays
from convert.hf import HF_ENTRIES, check_hf_compatible, is_hf_directory, is_shard_name, load_hf, save_hf
from convert.rules import STACKED, ConversionError, drop_removed
from convert.tensors import LazyTensors, Spec, dtype_of, safetensors_tensors, write_safetensors
from whisper_config import ConfigError, ModelConfig
from whisper_io.messages import first_line, some
from whisper_io.outputs import atomic_output, check_destination

CONFIG_FILE = "config.json"
TORCH_WEIGHTS = "model.safetensors"
FLAX_STATE = "state"
FORMATS = ("torch", "flax", "openai", "hf")
# Everything a checkpoint directory of ours holds: a folder with anything else is not replaced.
CHECKPOINT_ENTRIES = frozenset({CONFIG_FILE, TORCH_WEIGHTS, FLAX_STATE, *HF_ENTRIES})
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


class NonFiniteError(ConversionError):
    """Weights hold NaN or infinity; the message names the tensors."""


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    format: str
    path: str


def detect_format(path: str | os.PathLike) -> str:
    """'torch', 'flax' or 'openai', or a `ConversionError` saying what the path is not."""
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p}: no such file or directory")
    if p.is_dir():
        if is_hf_directory(p):
            return "hf"
        if (p / TORCH_WEIGHTS).is_file():
            return "torch"
        if (p / FLAX_STATE).is_dir():
            return "flax"
        raise ConversionError(
            f"{p}: not a checkpoint directory: expected {CONFIG_FILE} with {TORCH_WEIGHTS} (torch), "
            f"a {FLAX_STATE}/ folder (flax), or a Hugging Face config.json with model_type (hf)"
        )
    if zipfile.is_zipfile(p) or p.suffix in (".pt", ".pth"):
        return "openai"
    raise ConversionError(
        f"{p}: not a checkpoint: expected an OpenAI Whisper .pt file or a torch/flax/hf checkpoint directory"
    )


def _read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory}: missing {CONFIG_FILE}")
    try:
        return ModelConfig.load(path).portable()  # how it runs is the reader's choice
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def check_tensor_values(tensors: Mapping[str, np.ndarray], what: str, allow_nonfinite: bool = False) -> None:
    """Refuse tensors that are not floating point, and (unless allowed) ones holding NaN or inf."""
    dtypes = {k: np.dtype(dtype_of(tensors, k)).name for k in tensors}
    not_float = sorted(f"{k} ({dtype})" for k, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if not_float:
        raise ConversionError(f"{what}: tensors that are not floating point: {some(not_float)}")
    if allow_nonfinite:
        return
    bad = []
    for key, value in tensors.items():  # one tensor in memory at a time
        count = int(value.size - np.count_nonzero(np.isfinite(value)))
        if count:
            bad.append(f"{key} ({count:,} of {value.size:,} values)")
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} tensor(s) hold NaN or infinity: {some(sorted(bad))}")


def load_checkpoint(path: str | os.PathLike, allow_nonfinite: bool = False) -> Checkpoint:
    """Read a checkpoint of any supported format. Tensors must be floating point and, unless
    `allow_nonfinite`, finite (`NonFiniteError` names the ones that are not)."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "openai":
        from convert.openai import load_openai

        config, tensors = load_openai(p)
    elif fmt == "hf":
        config, tensors = load_hf(p)
    elif fmt == "torch":
        config = _read_config(p)
        tensors = safetensors_tensors([p / TORCH_WEIGHTS])
    else:
        config = _read_config(p)
        tensors = _read_flax_state(p / FLAX_STATE, config)
    tensors = drop_removed(tensors, f"checkpoint {p}")
    check_torch_tensors(tensors, config, f"checkpoint {p}")
    check_tensor_values(tensors, f"checkpoint {p}", allow_nonfinite)
    return Checkpoint(config, tensors, fmt, str(p))


def _read_flax_state(path: Path, config: ModelConfig) -> Mapping[str, np.ndarray]:
    """The orbax checkpoint at `path` as torch-named tensors, read lazily: shapes and dtypes come
    from its metadata, and each array is read alone when a tensor of it is read, by TensorStore
    straight from its Zarr array (orbax's partial restore, the fallback, reads the whole tree's
    metadata for every array: whisper-small saved layer by layer, 479 arrays, took 84 s instead of
    10). The last array read is kept, so the layers of a stack, read in order, cost one read;
    nothing else of the model is held."""
    import orbax.checkpoint as ocp

    try:
        tree = ocp.StandardCheckpointer().metadata(path.absolute()).item_metadata.tree
    except Exception as err:  # orbax raises many types for unreadable directories
        raise ConversionError(f"{path}: not a readable orbax checkpoint: {first_line(err)}") from None
    last: dict[tuple, np.ndarray] = {}
    regions = _region_reader(path)

    def read(keys: tuple[str, ...]) -> np.ndarray:
        if regions is not None:
            with contextlib.suppress(ConversionError):  # one TensorStore did not open: orbax says why
                return regions(".".join(keys), ())
        return _orbax_restore(path, keys)

    def restore(keys: tuple[str, ...]) -> np.ndarray:
        if keys not in last:
            last.clear()  # before reading the next array, not after: one array at a time
            last[keys] = read(keys)
        return last[keys]

    specs: dict[str, Spec] = {}

    def walk(node, keys: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*keys, key))
            else:
                name = ".".join((*keys, key))
                read = functools.partial(restore, (*keys, key))
                chunked = regions is not None and _chunked(value)
                region = functools.partial(regions, name) if chunked else None
                specs[name] = Spec(tuple(value.shape), np.dtype(value.dtype), read, str(path), region)

    walk(tree, ())
    return flax_arrays_lazily(drop_removed(LazyTensors(specs), f"checkpoint {path.parent}"), config)


def _orbax_restore(path: Path, keys: tuple[str, ...]) -> np.ndarray:
    """The array at `keys` of the orbax checkpoint at `path`, alone (orbax's partial restore)."""
    import orbax.checkpoint as ocp

    item: dict = {}
    node = item
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                path.absolute(), args=ocp.args.PyTreeRestore(item=item, restore_args=item, partial_restore=True)
            )
    except Exception as err:  # orbax raises many types for unreadable arrays
        raise ConversionError(f"{path}: cannot read {'.'.join(keys)}: {first_line(err)}") from None
    for key in keys:
        restored = restored[key]
    return np.asarray(restored)


def _chunked(metadata) -> bool:
    """Whether orbax stored the array in chunks smaller than itself (then a region is cheap to
    read; a single compressed chunk has to be decoded whole for any part of it)."""
    storage = getattr(metadata, "storage", None)
    chunks = getattr(storage, "chunk_shape", None)
    return chunks is not None and tuple(chunks) != tuple(metadata.shape)


def _region_reader(path: Path):
    """(array name, index) -> that region of the array in the orbax checkpoint at `path`, read
    by TensorStore from the chunks it covers only; None when the checkpoint's layout is unknown."""
    import json

    import orbax.checkpoint as ocp
    import tensorstore

    try:
        layout = json.loads((path / "_METADATA").read_text(encoding="utf-8"))
        ocdbt, zarr3 = bool(layout["use_ocdbt"]), bool(layout["use_zarr3"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    opened: dict[str, object] = {}
    context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)  # one for every array: one B-tree cache

    def read(name: str, index: tuple) -> np.ndarray:
        try:
            if name not in opened:
                opened.clear()  # one array open at a time
                info = ocp.type_handlers.ParamInfo(
                    name=name, parent_dir=path.absolute(), use_zarr3=zarr3, ts_context=context
                )
                spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
                opened[name] = tensorstore.open(spec, open=True, read=True, context=context).result()
            return np.asarray(opened[name][index].read().result())
        except Exception as err:  # TensorStore raises its own types for unreadable data
            raise ConversionError(f"{path}: cannot read {name}: {first_line(err)}") from None

    return read


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint this package writes, and nothing else: a torch, flax or hf directory
    holding only checkpoint files (and weight shards), or a PyTorch zip file."""
    p = Path(path)
    try:
        fmt = detect_format(p)
    except ConversionError:
        return False
    if p.is_dir():
        return all(entry.name in CHECKPOINT_ENTRIES or is_shard_name(entry.name) for entry in p.iterdir())
    return fmt == "openai" and _is_torch_zip(p)


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def check_output(path, overwrite: bool = False, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Check a checkpoint destination before anything is written (see `whisper_io.outputs`)."""
    return check_destination(path, overwrite=overwrite, replaceable=is_checkpoint, kind="checkpoint", sources=sources)


def _write_torch(path: Path, config: ModelConfig, tensors) -> None:
    path.mkdir()
    config.portable().save(path / CONFIG_FILE)
    write_safetensors(path / TORCH_WEIGHTS, tensors)


def _write_flax(path: Path, config: ModelConfig, tensors) -> None:
    import jax
    import orbax.checkpoint as ocp

    # The tensors' own precision, as CPU jax arrays (zero-copy from NumPy): orbax copies jax arrays
    # once to write them (NumPy arrays twice). A synchronous save with little in flight at a
    # time keeps a conversion's peak memory near twice the model.
    cpu = jax.devices("cpu")[0]
    arrays = jax.tree.map(lambda a: jax.device_put(a, cpu), torch_to_flax_arrays(tensors, config))
    path.mkdir()
    config.portable().save(path / CONFIG_FILE)
    # Layer stacks in Zarr3 chunks of at most CHUNK_BYTES: a reader placing a stack region by
    # region (`convert.core.place_flax_arrays`) decodes only the chunks it covers. The other
    # arrays are read whole and stay one chunk each.
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, use_zarr3=True))

    def save_args(keys, _) -> ocp.SaveArgs:
        stacked = any(getattr(k, "key", None) in STACKED for k in keys)
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES if stacked else None)

    chunks = jax.tree_util.tree_map_with_path(save_args, arrays)
    try:
        checkpointer.save((path / FLAX_STATE).absolute(), args=ocp.args.PyTreeSave(arrays, save_args=chunks))
    except OSError:
        raise
    except Exception as err:  # orbax wraps I/O failures in its own types
        raise OSError(first_line(err)) from None
    finally:
        checkpointer.close()


def _write_openai(path: Path, config: ModelConfig, tensors) -> None:
    from convert.openai import save_openai

    save_openai(path, config, tensors)


def _write_hf(path: Path, config: ModelConfig, tensors) -> None:
    save_hf(path, config, tensors)


CHUNK_BYTES = 16 * 2**20  # the largest stored chunk of a Flax checkpoint's layer stack


WRITERS = {"torch": _write_torch, "flax": _write_flax, "openai": _write_openai, "hf": _write_hf}


def save_checkpoint(
    path,
    fmt: str,
    config: ModelConfig,
    tensors,
    overwrite: bool = False,
    *,
    sources: Sequence[str | os.PathLike] = (),
    allow_nonfinite: bool = False,
    values_checked: bool = False,
) -> None:
    """Write `tensors` (torch_ref names) as a checkpoint of format `fmt`, or change nothing.

    Everything is checked before a byte is written: the format, the tensors against `config`
    (names, shapes, floating point, finite unless `allow_nonfinite` -- or `values_checked`, for
    tensors just read by `load_checkpoint`, which checks them), that the format can hold
    the model, and the destination (`check_output`: an existing checkpoint is replaced only with
    `overwrite`; anything else, `sources` and the current directory never). The checkpoint is
    written next to `path` and renamed into place when complete.
    """
    if fmt not in WRITERS:
        raise ConversionError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    check_torch_tensors(tensors, config, "tensors to save")
    if not values_checked:  # (`load_checkpoint` has checked what it returns)
        check_tensor_values(tensors, "tensors to save", allow_nonfinite)
    if fmt == "openai":
        from convert.openai import check_openai_compatible

        check_openai_compatible(config)
    if fmt == "hf":
        check_hf_compatible(config)
    destination = check_output(path, overwrite, sources)
    with atomic_output(destination) as partial:
        WRITERS[fmt](partial, config, tensors)


def load_flax_model(path: str | os.PathLike, seed: int = 0):
    """A `flax_whisper.Whisper` from any checkpoint format."""
    from convert.core import new_flax_model

    ckpt = load_checkpoint(path)
    return new_flax_model(ckpt.config, ckpt.tensors, seed)


def load_torch_model(path: str | os.PathLike):
    """A `torch_ref.Whisper` from any checkpoint format."""
    from convert.core import new_torch_model

    ckpt = load_checkpoint(path)
    return new_torch_model(ckpt.config, ckpt.tensors)
