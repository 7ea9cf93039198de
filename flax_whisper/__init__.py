"""Flax NNX implementation of the Whisper-like encoder-decoder (mirrors `torch_ref` module for module)."""

from flax_whisper.decoding import beam_search_decode, greedy_decode
from flax_whisper.model import AudioEncoder, TextDecoder, Whisper, cross_entropy, pure_jit, shift_right
from whisper_config import ModelConfig

__all__ = [
    "AudioEncoder",
    "ModelConfig",
    "TextDecoder",
    "Whisper",
    "beam_search_decode",
    "cross_entropy",
    "greedy_decode",
    "pure_jit",
    "shift_right",
]
