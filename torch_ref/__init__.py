"""PyTorch reference of the Whisper-like encoder-decoder (mirrors `flax_whisper` module for module)."""

from torch_ref.decoding import beam_search_decode, greedy_decode
from torch_ref.model import AudioEncoder, TextDecoder, Whisper, cross_entropy, shift_right
from whisper_config import ModelConfig

__all__ = [
    "AudioEncoder",
    "ModelConfig",
    "TextDecoder",
    "Whisper",
    "beam_search_decode",
    "cross_entropy",
    "greedy_decode",
    "shift_right",
]
