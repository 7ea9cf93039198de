"""OpenAI Whisper `.pt` checkpoints: `{"dims": ModelDimensions fields, "model_state_dict": ...}`.

OpenAI's names differ from `torch_ref`'s only where OpenAI used an `nn.Sequential` (`mlp.0`,
`mlp.2`); the `OPENAI_NAMES` rows of `rules.py` map them both ways. Files are read with
`torch.load(weights_only=True)`: a pickle downloaded from the internet must not be able to run
code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert.pt_file import Refused, read_pt
from convert.rules import OPENAI_NAMES, ConversionError, rename
from convert.tensors import LazyTensors, Spec
from whisper_config import ConfigError, ModelConfig


def from_openai_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(tensors, OPENAI_NAMES.from_format, "OpenAI checkpoint")


def to_openai_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rename(tensors, OPENAI_NAMES.to_format, "tensors to save")


def _read_payload(path: str | os.PathLike):
    """The object an OpenAI file holds, tensors as lazy `Spec`s (zip files, read without torch) or
    arrays (the legacy non-zip format, through `torch.load(weights_only=True)`), with a one-line
    reason for every way it can fail."""
    import zipfile

    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: empty file, not a PyTorch checkpoint")
    if zipfile.is_zipfile(path):
        try:
            return read_pt(Path(path))
        except Refused as refused:
            raise ConversionError(
                f"{path}: refused: it holds a reference to {refused.name}, and loading that could run code; only "
                "tensors and plain containers are read"
            ) from None
    try:
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # random bytes make the unpickler raise almost anything
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)") from None
    return _legacy_tensors(payload)


def _legacy_tensors(node):
    """torch tensors in a legacy payload -> NumPy arrays in their own dtype (bfloat16 included)."""
    import torch

    if isinstance(node, dict):
        return {k: _legacy_tensors(v) for k, v in node.items()}
    if isinstance(node, torch.Tensor):
        tensor = node.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return node


def load_openai(path: str | os.PathLike) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    """An OpenAI `.pt` file -> (config, torch_ref-named tensors in the file's own dtype, read lazily)."""
    payload = _read_payload(path)
    if not isinstance(payload, dict) or "dims" not in payload or "model_state_dict" not in payload:
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ConversionError(
            f"{path}: not an OpenAI Whisper checkpoint: expected keys 'dims' and 'model_state_dict', found {found}"
        )
    if not isinstance(payload["dims"], dict):
        raise ConversionError(f"{path}: 'dims' is a {type(payload['dims']).__name__}, not a mapping of dimensions")
    try:
        config = ModelConfig.from_openai_dims(dict(payload["dims"]))
    except (ConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{path}: invalid 'dims': {err}") from err
    state = payload["model_state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(
            f"{path}: 'model_state_dict' is a {type(state).__name__}, not a mapping of names to tensors"
        )
    bad_keys = [repr(k) for k in state if not isinstance(k, str)]
    if bad_keys:
        raise ConversionError(f"{path}: 'model_state_dict' has keys that are not names: {', '.join(bad_keys[:5])}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, Spec | np.ndarray))
    if bad:
        raise ConversionError(f"{path}: 'model_state_dict' entries are not tensors: {', '.join(bad)}")
    specs = {k: v if isinstance(v, Spec) else _in_memory(v, str(path)) for k, v in state.items()}
    return config, LazyTensors(specs).renamed(OPENAI_NAMES.from_format, f"OpenAI checkpoint {path}")


def _in_memory(array: np.ndarray, source: str) -> Spec:
    return Spec(tuple(array.shape), array.dtype, lambda: array, source)


def check_openai_compatible(config: ModelConfig) -> None:
    """Raise unless `config` is exactly OpenAI Whisper's architecture, naming the fields that differ."""
    differ = config.openai_differences()
    if differ:
        raise ConversionError(
            "an OpenAI checkpoint holds only the plain `whisper` preset; this model differs in " + ", ".join(differ)
        )


def save_openai(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Write an OpenAI `.pt` file that `whisper.load_model(path)` reads."""
    import torch

    check_openai_compatible(config)
    if config.alignment_heads is not None:
        import sys

        sys.stderr.write(f"notice: {path}: an OpenAI .pt file has no place for alignment_heads; not written\n")
    state = {k: _to_torch(v) for k, v in to_openai_names(tensors).items()}
    torch.save({"dims": config.openai_dims(), "model_state_dict": state}, path)


def _to_torch(array: np.ndarray):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # NumPy's bfloat16 comes from ml_dtypes, which torch does not read
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
