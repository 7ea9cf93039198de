"""Framework-free inference and data pieces: tokenizers, audio files and decoding options.

Shared by `flax_whisper`, `torch_ref` and `train`; imports neither torch nor jax.
"""

from whisper_io.audio_files import AudioFileError, load_audio
from whisper_io.decoding import BeamSearch, DecodingOptions, decoding_options, text_tokens
from whisper_io.tokenizers import ByteTokenizer, Tokenizer, TokenizerError, WhisperTokenizer, tokenizer_for

__all__ = [
    "AudioFileError",
    "BeamSearch",
    "ByteTokenizer",
    "DecodingOptions",
    "Tokenizer",
    "TokenizerError",
    "WhisperTokenizer",
    "decoding_options",
    "load_audio",
    "text_tokens",
    "tokenizer_for",
]
