"""The one registry of self-attention mechanisms (model contract section 4), same keys as `torch_ref/registry.py`.

Blocks ask this table for `config.encoder_attention` / `config.decoder_attention`; they never
branch on the name.
"""

from __future__ import annotations

from flax import nnx

from flax_whisper.attention import MultiHeadAttention
from flax_whisper.biased import BiasedAttention
from flax_whisper.dynamic_conv import DynamicConvAttention
from flax_whisper.hybrid import HybridAttention
from flax_whisper.integrated import IntegratedAttention
from flax_whisper.memory import AugmentedMemory
from whisper_config import ModelConfig

ATTENTION: dict[str, type[nnx.Module]] = {
    "mha": MultiHeadAttention,
    "biased": BiasedAttention,
    "memory": AugmentedMemory,
    "dynamic_conv": DynamicConvAttention,
    "hybrid": HybridAttention,
    "integrated": IntegratedAttention,
}


def build_attention(
    kind: str, n_state: int, n_head: int, config: ModelConfig, rotary: bool, *, rngs: nnx.Rngs
) -> nnx.Module:
    return ATTENTION[kind](n_state, n_head, config, rotary, rngs=rngs)
