"""Weights between `torch_ref` and `flax_whisper` (and OpenAI Whisper `.pt` files), with a parity checker.

from convert import load_checkpoint, load_flax_model, load_torch_model, save_checkpoint
"""

from convert.checkpoints import (
    Checkpoint,
    detect_format,
    load_checkpoint,
    load_flax_model,
    load_torch_model,
    save_checkpoint,
)
from convert.core import flax_to_torch, new_flax_model, new_torch_model, torch_to_flax_state
from convert.rules import ConversionError, build_plan

__all__ = [
    "Checkpoint",
    "ConversionError",
    "build_plan",
    "detect_format",
    "flax_to_torch",
    "load_checkpoint",
    "load_flax_model",
    "load_torch_model",
    "new_flax_model",
    "new_torch_model",
    "save_checkpoint",
    "torch_to_flax_state",
]
