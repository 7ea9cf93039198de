"""Checkpoint formats, detection, loading and saving.

- torch: a directory with `config.json` and `model.safetensors` (torch_ref names).
- flax: a directory with `config.json` and an orbax checkpoint of the Flax parameters in `state/`.
- openai: an OpenAI Whisper `.pt` file (see `openai.py`).

Every loader returns a `Checkpoint`: the config plus torch_ref-named NumPy arrays, checked
against the config by name and shape.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from convert.core import check_torch_tensors, flax_arrays_to_torch, torch_to_flax_state
from convert.rules import ConversionError
from whisper_config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
TORCH_WEIGHTS = "model.safetensors"
FLAX_STATE = "state"
FORMATS = ("torch", "flax", "openai")


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
        if (p / TORCH_WEIGHTS).is_file():
            return "torch"
        if (p / FLAX_STATE).is_dir():
            return "flax"
        raise ConversionError(
            f"{p}: not a checkpoint directory: expected {CONFIG_FILE} with {TORCH_WEIGHTS} (torch) "
            f"or a {FLAX_STATE}/ folder (flax)"
        )
    if zipfile.is_zipfile(p) or p.suffix in (".pt", ".pth"):
        return "openai"
    raise ConversionError(
        f"{p}: not a checkpoint: expected an OpenAI Whisper .pt file or a torch/flax checkpoint directory"
    )


def _read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory}: missing {CONFIG_FILE}")
    try:
        return ModelConfig.load(path)
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from err


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint of any supported format."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "openai":
        from convert.openai import load_openai

        config, tensors = load_openai(p)
    elif fmt == "torch":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        config = _read_config(p)
        try:
            tensors = load_file(p / TORCH_WEIGHTS)
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{p / TORCH_WEIGHTS}: not a safetensors file: {err}") from err
    else:
        config = _read_config(p)
        tensors = _read_flax_state(p / FLAX_STATE, config)
    check_torch_tensors(tensors, config, f"checkpoint {p}")
    return Checkpoint(config, tensors, fmt, str(p))


def _read_flax_state(path: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(path.absolute())
    except Exception as err:  # orbax raises many types for unreadable directories
        raise ConversionError(f"{path}: not a readable orbax checkpoint: {err}") from err
    arrays: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                arrays[f"{prefix}{key}"] = np.asarray(value)

    walk(restored, "")
    return flax_arrays_to_torch(arrays, config)


def _prepare(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise ConversionError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_torch_checkpoint(path: str | os.PathLike, config: ModelConfig, tensors, overwrite: bool = False) -> None:
    from safetensors.numpy import save_file

    p = Path(path)
    check_torch_tensors(tensors, config, "tensors to save")
    _prepare(p, overwrite)
    p.mkdir(parents=True)
    config.save(p / CONFIG_FILE)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, p / TORCH_WEIGHTS, metadata={"format": "pt"})


def save_flax_checkpoint(path: str | os.PathLike, config: ModelConfig, tensors, overwrite: bool = False) -> None:
    import orbax.checkpoint as ocp
    from flax import nnx

    p = Path(path)
    state = torch_to_flax_state(tensors, config)
    _prepare(p, overwrite)
    p.mkdir(parents=True)
    config.save(p / CONFIG_FILE)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((p / FLAX_STATE).absolute(), nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()


def save_checkpoint(path, fmt: str, config: ModelConfig, tensors, overwrite: bool = False) -> None:
    """Write `tensors` (torch_ref names) as a checkpoint of format `fmt`."""
    if fmt == "torch":
        save_torch_checkpoint(path, config, tensors, overwrite)
    elif fmt == "flax":
        save_flax_checkpoint(path, config, tensors, overwrite)
    elif fmt == "openai":
        from convert.openai import save_openai

        _prepare(Path(path), overwrite)
        save_openai(path, config, tensors)
    else:
        raise ConversionError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


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
