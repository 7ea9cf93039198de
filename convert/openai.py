"""OpenAI Whisper `.pt` checkpoints: `{"dims": ModelDimensions fields, "model_state_dict": ...}`.

OpenAI's names differ from `torch_ref`'s only where OpenAI used an `nn.Sequential` (`mlp.0`,
`mlp.2`); `RENAMES` maps them both ways. Files are read with `torch.load(weights_only=True)`: a
pickle downloaded from the internet must not be able to run code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from convert.rules import ConversionError
from whisper_config import ConfigError, ModelConfig
from whisper_io.messages import first_line

# (OpenAI name part, torch_ref name part), applied to whole dotted segments.
RENAMES = ((".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = re.sub(re.escape(old), new, key)
    return key


def from_openai_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {_rename(k, RENAMES): v for k, v in tensors.items()}


def to_openai_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {_rename(k, [(new, old) for old, new in RENAMES]): v for k, v in tensors.items()}


def _read_pickle(path: str | os.PathLike):
    """`torch.load(weights_only=True)` with a one-line reason for every way it can fail."""
    import pickle
    import zipfile

    import torch

    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file makes the unpickler raise almost anything
        if not zipfile.is_zipfile(path):
            raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)") from None
        if isinstance(err, pickle.UnpicklingError):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
            raise ConversionError(
                f"{path}: refused: it holds {what}, and loading that could run code; only tensors and plain "
                "containers are read"
            ) from None
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({first_line(err)})") from None


def load_openai(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """An OpenAI `.pt` file -> (config, torch_ref-named float32 arrays)."""
    import torch

    payload = _read_pickle(path)
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
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path}: 'model_state_dict' entries are not tensors: {', '.join(bad)}")
    tensors = {k: _to_numpy(v) for k, v in state.items()}
    return config, from_openai_names(tensors)


def _to_numpy(tensor) -> np.ndarray:
    """A tensor as NumPy: floating point widened to float32, anything else kept as it is (and
    then refused by the loader, naming the tensor)."""
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).numpy()


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
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_openai_names(tensors).items()}
    torch.save({"dims": config.openai_dims(), "model_state_dict": state}, path)
