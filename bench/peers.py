"""Shared by the benchmarks: the Hugging Face peer of a flax_whisper model."""

from __future__ import annotations

from whisper_config import ModelConfig


def hf_config(config: ModelConfig, **extra):
    """A `transformers.WhisperConfig` with `config`'s dimensions, SDPA attention, no dropout."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=config.n_vocab,
        num_mel_bins=config.n_mels,
        d_model=config.n_audio_state,
        encoder_layers=config.n_audio_layer,
        decoder_layers=config.n_text_layer,
        encoder_attention_heads=config.n_audio_head,
        decoder_attention_heads=config.n_text_head,
        encoder_ffn_dim=4 * config.n_audio_state,
        decoder_ffn_dim=4 * config.n_text_state,
        max_source_positions=config.n_audio_ctx,
        max_target_positions=config.n_text_ctx,
        attn_implementation="sdpa",
        **extra,
    )
