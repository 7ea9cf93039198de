"""AudioEncoder, TextDecoder and Whisper (model contract section 5), with the teacher-forcing loss.

The `whisper` preset is exactly OpenAI Whisper: an OpenAI checkpoint, renamed by `convert`,
loads into `Whisper` and gives OpenAI's logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref.blocks import ResidualAttentionBlock
from torch_ref.layers import Conv1d, Embedding, gelu, make_norm
from torch_ref.positions import lookup_positions, register_position_table
from whisper_config import ModelConfig, check_mel_shape, check_token_range, check_tokens_shape
from whisper_config.checks import check_cache_offset, check_dtype, check_same_batch

IGNORE_INDEX = -100
DecoderCache = dict[str, Any]


class AudioEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.n_audio_state
        self.conv1 = Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        register_position_table(self, config.encoder_positions, config.n_audio_ctx, d)
        self.normalize_positions = config.normalize_positions and config.encoder_positions == "learned_sinusoidal"
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(
                d, config.n_audio_head, config.encoder_attention, config, rotary=config.encoder_rotary
            )
            for _ in range(config.n_audio_layer)
        )
        self.ln_post = make_norm(config, d)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, frames) log-mel -> (B, T, d) with T = ceil(frames / 2) <= n_audio_ctx."""
        n_ctx = check_mel_shape(self.config, mel.shape)
        check_dtype("mel", mel.dtype, mel.dtype.is_floating_point, "floating point (log-mel features)")
        x = gelu(self.conv1(mel))  # (B, d, frames)
        x = gelu(self.conv2(x))  # (B, d, T)
        x = x.permute(0, 2, 1)  # (B, T, d)
        if self.positional_embedding is not None:
            x = x + lookup_positions(self.positional_embedding, 0, n_ctx, "audio", self.normalize_positions).to(x.dtype)
        x = self.dropout(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.n_text_state
        self.token_embedding = Embedding(config.n_vocab, d)
        register_position_table(self, config.decoder_positions, config.n_text_ctx, d)
        self.normalize_positions = config.normalize_positions and config.decoder_positions == "learned_sinusoidal"
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(
                d,
                config.n_text_head,
                config.decoder_attention,
                config,
                cross_attention=True,
                rotary=config.decoder_rotary,
            )
            for _ in range(config.n_text_layer)
        )
        self.ln = make_norm(config, d)

    def forward(
        self, tokens: Tensor, xa: Tensor, cache: DecoderCache | None = None, valid: Tensor | None = None
    ) -> tuple[Tensor, DecoderCache | None]:
        """tokens (B, T) int, xa (B, S, d) encoder output -> logits (B, T, n_vocab) float32, cache.

        With a cache (from `init_cache`), `tokens` follow the `cache["offset"]` tokens already
        decoded, and the returned cache holds them too. `valid` (B, T) marks the real positions
        (the loss passes the ones whose label is not ignored): padding writes no memory state.
        """
        offset = 0 if cache is None else cache["offset"]
        length = check_tokens_shape(self.config, tokens.shape, offset)
        check_dtype("tokens", tokens.dtype, is_integer(tokens), "integer token ids")
        check_same_batch("tokens", tokens.shape[0], "the encoder output", xa.shape[0])
        capacity = None if cache is None else self.blocks[0].attn.cache_capacity(cache["layers"][0]["attn"])
        if capacity is not None:
            check_cache_offset(self.config, offset, length, capacity)
        x = self.embed(tokens, offset, length, xa.dtype)
        layer_caches = [None] * len(self.blocks) if cache is None else cache["layers"]
        new_caches = []
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x, layer_cache = block(x, xa, causal=True, cache=layer_cache, offset=offset, valid=valid)
            new_caches.append(layer_cache)
        logits = self.unembed(x)
        if cache is not None:
            cache = {"offset": offset + length, "layers": new_caches}
        return logits, cache

    def nll(self, tokens: Tensor, xa: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: tokens (B, T), xa (B, S, d), labels (B, T) (-100 ignored) -> each
        label's negative log-likelihood (B, T) float32, 0 where ignored; the positions of ignored
        labels write no memory state (flax's keeps no logits for its backward pass)."""
        logits, _ = self(tokens, xa, valid=labels != IGNORE_INDEX)
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")

    def embed(self, tokens: Tensor, offset: int, length: int, dtype: torch.dtype) -> Tensor:
        """tokens (B, T) after `offset` earlier ones -> the first block's input (B, T, d)."""
        x = self.token_embedding(tokens)  # (B, T, d)
        if self.positional_embedding is not None:
            x = x + lookup_positions(self.positional_embedding, offset, length, "tokens", self.normalize_positions)
        return self.dropout(x.to(dtype))

    def unembed(self, x: Tensor) -> Tensor:
        """The last block's output (B, T, d) -> float32 logits (B, T, n_vocab)."""
        # Tied output in float32 (contract 5): upcast before the matmul, whatever the precision.
        return self.ln(x).float() @ self.token_embedding.weight.float().T

    def cross_attention_scores(self, tokens: Tensor, xa: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, T), xa (B, S, d) -> logits (B, T, n_vocab) and every layer's cross-attention
        scores before the softmax (L, B, H, T, S) float32: what word alignment reads."""
        x = self.embed(tokens, 0, check_tokens_shape(self.config, tokens.shape, 0), xa.dtype)
        layer_scores = []
        for block in self.blocks:
            x, _, cross_scores = block._forward(x, xa, causal=True, keep_scores=True)
            layer_scores.append(cross_scores)
        return self.unembed(x), torch.stack(layer_scores)

    def init_cache(self, xa: Tensor, max_length: int | None = None) -> DecoderCache:
        """An empty cache for decoding up to `max_length` (default n_text_ctx) tokens after `xa`.

        Cross-attention keys and values of `xa (B, S, d)` are projected here, once per utterance.
        """
        length = self.config.n_text_ctx if max_length is None else max_length
        layers = [
            {
                "attn": block.attn.init_cache(xa.shape[0], length, xa.dtype, xa.device),
                "cross_attn": block.cross_attn.init_cross_cache(xa),
            }
            for block in self.blocks
        ]
        return {"offset": 0, "layers": layers}


class Whisper(nn.Module):
    """The encoder-decoder. `forward(mel, tokens)` gives the decoder's logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = TextDecoder(config)

    def embed_audio(self, mel: Tensor) -> Tensor:
        return self.encoder(mel)

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """mel (B, n_mels, frames), tokens (B, T) -> logits (B, T, n_vocab) float32"""
        check_ids(self.config, tokens)
        return self.logits(mel, tokens)

    def logits(self, mel: Tensor, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """`forward` without the host-side check of the token values."""
        logits, _ = self.decoder(tokens, self.encoder(mel), valid=valid)
        return logits

    def loss(self, mel: Tensor, labels: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Teacher-forcing cross-entropy; labels (B, T) with -100 ignored.

        The decoder reads `tokens` when given, else the labels shifted right behind
        `config.start_token_id`.
        """
        check_dtype("labels", labels.dtype, is_integer(labels), "integer token ids")
        check_ids(self.config, labels, ignored=IGNORE_INDEX)
        if tokens is None:
            tokens = shift_right(labels, self.config.start_token_id)
        else:
            check_ids(self.config, tokens)
        nll = self.decoder.nll(tokens, self.encoder(mel), labels)  # (B, T)
        return nll.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def check_ids(config: ModelConfig, ids: Tensor, ignored: int | None = None) -> None:
    """Token ids (or labels, `ignored` aside) must lie in [0, n_vocab). A host-side check of the
    values, made once per call of the model's entry points (never per decoder step, which would
    sync the device every token); skipped while torch.compile traces, as a jitted flax step skips it."""
    if torch.compiler.is_compiling():
        return
    kept = ids if ignored is None else ids[ids != ignored]
    if kept.numel():
        check_token_range(config, int(kept.min()), int(kept.max()))


def is_integer(tensor: Tensor) -> bool:
    """An integer dtype (bool is not one: True is no token id)."""
    dtype = tensor.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def shift_right(labels: Tensor, start_token_id: int) -> Tensor:
    """labels (B, T) -> decoder inputs (B, T): `[start, labels[:-1]]`, ignored labels read as start.

    An ignored (-100) label only feeds positions after it; with padding at the end those are
    ignored too, so the id read there does not matter as long as it is a valid token.
    """
    tokens = torch.cat([torch.full_like(labels[:, :1], start_token_id), labels[:, :-1]], dim=1)
    return tokens.masked_fill(tokens == IGNORE_INDEX, start_token_id)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean float32 cross-entropy over labels != -100 (0 when all are). logits (B, T, V), labels (B, T) -> ()"""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
