"""The one registry of self-attention mechanisms (model contract section 4).

Blocks ask this table for `config.encoder_attention` / `config.decoder_attention`; they never
branch on the name. `flax_whisper/registry.py` has the same keys.
"""

from __future__ import annotations

from torch import nn

from torch_ref.attention import MultiHeadAttention
from torch_ref.biased import BiasedAttention
from torch_ref.dynamic_conv import DynamicConvAttention
from torch_ref.hybrid import HybridAttention
from torch_ref.integrated import IntegratedAttention
from torch_ref.memory import AugmentedMemory
from whisper_config import ModelConfig

ATTENTION: dict[str, type[nn.Module]] = {
    "mha": MultiHeadAttention,
    "biased": BiasedAttention,
    "memory": AugmentedMemory,
    "dynamic_conv": DynamicConvAttention,
    "hybrid": HybridAttention,
    "integrated": IntegratedAttention,
}


def build_attention(kind: str, n_state: int, n_head: int, config: ModelConfig, rotary: bool) -> nn.Module:
    return ATTENTION[kind](n_state, n_head, config, rotary)
