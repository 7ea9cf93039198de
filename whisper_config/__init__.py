"""The model contract shared by `torch_ref` and `flax_whisper` (docs/model.md, section 1).

Imports neither torch nor jax: a config can be read, validated and written on a machine that has
neither framework. Every checkpoint directory carries one as `config.json`.
"""

from whisper_config.checks import InputError, check_mel_shape, check_token_range, check_tokens_shape
from whisper_config.config import PRESETS, SIZES, ConfigError, ModelConfig

__all__ = [
    "PRESETS",
    "SIZES",
    "ConfigError",
    "InputError",
    "ModelConfig",
    "check_mel_shape",
    "check_token_range",
    "check_tokens_shape",
]
