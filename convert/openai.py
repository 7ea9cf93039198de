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


def load_openai(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """An OpenAI `.pt` file -> (config, torch_ref-named float32 arrays)."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint that can be loaded safely (weights_only=True): {err}"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ConversionError(f"{path}: not a PyTorch checkpoint: {err}") from err
    if not isinstance(payload, dict) or "dims" not in payload or "model_state_dict" not in payload:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ConversionError(
            f"{path}: not an OpenAI Whisper checkpoint: expected keys 'dims' and 'model_state_dict', found {found}"
        )
    try:
        config = ModelConfig.from_openai_dims(dict(payload["dims"]))
    except (ConfigError, TypeError, ValueError) as err:
        raise ConversionError(f"{path}: invalid 'dims': {err}") from err
    state = payload["model_state_dict"]
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path}: 'model_state_dict' entries are not tensors: {', '.join(bad)}")
    tensors = {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    return config, from_openai_names(tensors)


def save_openai(path: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Write an OpenAI `.pt` file that `whisper.load_model(path)` reads."""
    import torch

    if not config.is_openai_compatible():
        raise ConversionError(
            "only the plain `whisper` preset (mha attention, layernorm, OpenAI positions) can be "
            "written as an OpenAI checkpoint; this config differs from it"
        )
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_openai_names(tensors).items()}
    torch.save({"dims": config.openai_dims(), "model_state_dict": state}, path)
