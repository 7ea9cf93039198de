"""AudioEncoder, TextDecoder and Whisper (model contract section 5), mirroring `torch_ref/model.py`.

The public input layout is torch's: log-mel `(B, n_mels, frames)`; the encoder transposes it to
NWC for its convolutions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_whisper.blocks import ACTIVATION, ResidualAttentionBlock, run_stack, run_stack_with_cross_scores, stack
from flax_whisper.blocks import layers as stacked_layers
from flax_whisper.layers import (
    LOGITS,
    Conv1d,
    Embedding,
    add_positions,
    constrain,
    cpu_fusion_fence,
    gelu,
    host_offset,
    is_traced,
    make_norm,
    prepare_products,
)
from flax_whisper.positions import lookup_positions, position_table
from whisper_config import ModelConfig, check_mel_shape, check_token_range, check_tokens_shape
from whisper_config.checks import check_cache_offset, check_dtype, check_same_batch

IGNORE_INDEX = -100
DecoderCache = dict[str, Any]


def check_ids(config: ModelConfig, ids: jax.Array, ignored: int | None = None) -> None:
    """Token ids (or labels, `ignored` aside) must lie in [0, n_vocab). A host-side check of the
    values, made once per eager call of the model's entry points; under `jit` values are unknown,
    and the callers check on the host before (the training loop at the batch boundary, greedy
    decoding on its prompt)."""
    if is_traced(ids):
        return
    ids = np.asarray(ids)  # on the host: under an outer `jit`, array ops on a constant are traced
    kept = ids if ignored is None else ids[ids != ignored]
    if kept.size:
        check_token_range(config, int(kept.min()), int(kept.max()))


class AudioEncoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.n_audio_state
        self.conv1 = Conv1d(config.n_mels, d, kernel_size=3, padding=1, rngs=rngs)
        self.conv2 = Conv1d(d, d, kernel_size=3, stride=2, padding=1, rngs=rngs)
        self.positional_embedding = position_table(config.encoder_positions, config.n_audio_ctx, d, rngs)
        self.normalize_positions = config.normalize_positions and config.encoder_positions == "learned_sinusoidal"
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.blocks = stack(
            config.n_audio_layer,
            lambda rngs: ResidualAttentionBlock(
                d, config.n_audio_head, config.encoder_attention, config, rotary=config.encoder_rotary, rngs=rngs
            ),
            rngs,
        )
        self.ln_post = make_norm(config, d)

    def __call__(self, mel: jax.Array) -> jax.Array:
        """mel (B, n_mels, frames) log-mel -> (B, T, d) with T = ceil(frames / 2) <= n_audio_ctx."""
        n_ctx = check_mel_shape(self.config, mel.shape)
        check_dtype("mel", mel.dtype, jnp.issubdtype(mel.dtype, jnp.floating), "floating point (log-mel features)")
        x = jnp.swapaxes(mel, 1, 2)  # (B, frames, n_mels)
        x = gelu(self.conv1(x))  # (B, frames, d)
        x = gelu(self.conv2(x))  # (B, T, d)
        if self.positional_embedding is not None:
            table = self.positional_embedding[...]
            x = add_positions(x, lookup_positions(table, 0, n_ctx, "audio", self.normalize_positions))
        unroll = self.config.unrolls(self.config.n_audio_layer)
        x, _ = run_stack(self.blocks, constrain(self.dropout(x), ACTIVATION), unroll=unroll)
        return self.ln_post(cpu_fusion_fence(x))


class TextDecoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.n_text_state
        self.token_embedding = Embedding(config.n_vocab, d, rows=config.padded_vocab, rngs=rngs)
        self.positional_embedding = position_table(config.decoder_positions, config.n_text_ctx, d, rngs)
        self.normalize_positions = config.normalize_positions and config.decoder_positions == "learned_sinusoidal"
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.blocks = stack(
            config.n_text_layer,
            lambda rngs: ResidualAttentionBlock(
                d,
                config.n_text_head,
                config.decoder_attention,
                config,
                cross_attention=True,
                rotary=config.decoder_rotary,
                rngs=rngs,
            ),
            rngs,
        )
        self.ln = make_norm(config, d)

    def __call__(
        self,
        tokens: jax.Array,
        xa: jax.Array,
        cache: DecoderCache | None = None,
        valid: jax.Array | None = None,
        padded_vocab: bool = False,
        layers: Sequence[ResidualAttentionBlock] | None = None,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """tokens (B, T) int, xa (B, S, d) encoder output -> logits (B, T, n_vocab) float32, cache.

        With a cache (from `init_cache`), `tokens` follow the `cache["offset"]` tokens already
        decoded, and the returned cache holds them too. `valid` (B, T) marks the real positions
        (the loss passes the ones whose label is not ignored): padding writes no memory state.
        With `padded_vocab`, the logits cover the table's `config.padded_vocab` rows, the padding
        ids' at -inf: what evaluation reads, so a vocabulary-sharded layout is never sliced.
        With `layers` (from `self.layers()`), they run instead of the stacked blocks, on a cache
        of their own (`init_cache(xa, length, layers)`).
        """
        x, caches, capacity = self.hidden(tokens, xa, cache, valid, layers)
        offset, length = (0 if cache is None else cache["offset"]), tokens.shape[1]
        logits = self.unembed(x, padded_vocab)
        if is_traced(offset):
            # A jitted loop cannot raise: a step past the cache's capacity (or the context) would
            # clamp its writes onto the last slot, so its logits are NaN instead of quietly wrong.
            limit = self.config.n_text_ctx if capacity is None else min(capacity, self.config.n_text_ctx)
            logits = jnp.where(offset + length > limit, jnp.nan, logits)
        if cache is not None:
            cache = {"offset": offset + length, "layers": caches}
        return logits, cache

    def hidden(
        self,
        tokens: jax.Array,
        xa: jax.Array,
        cache: DecoderCache | None = None,
        valid: jax.Array | None = None,
        layers: Sequence[ResidualAttentionBlock] | None = None,
    ) -> tuple[jax.Array, Any, int | None]:
        """`__call__` up to the last block: (its output (B, T, d), the blocks' updated cache or
        None, the cache's capacity or None)."""
        offset = 0 if cache is None else cache["offset"]
        start = host_offset(offset)
        length = check_tokens_shape(self.config, tokens.shape, start)
        check_dtype("tokens", tokens.dtype, jnp.issubdtype(tokens.dtype, jnp.integer), "integer token ids")
        check_same_batch("tokens", tokens.shape[0], "the encoder output", xa.shape[0])
        blocks = self.blocks if layers is None else layers
        capacity = None
        if cache is not None:
            first, first_cache = (self.blocks, cache["layers"]) if layers is None else (layers[0], cache["layers"][0])
            capacity = first.attn.cache_capacity(first_cache["attn"])
        if capacity is not None:
            check_cache_offset(self.config, start, length, capacity)
        x = self.embed(tokens, offset, length, xa.dtype)
        caches = None if cache is None else cache["layers"]
        unroll = self.config.unrolls(self.config.n_text_layer) if cache is None else self.config.decode_unroll
        x, caches = run_stack(blocks, x, xa, causal=True, cache=caches, offset=offset, valid=valid, unroll=unroll)
        return x, caches, capacity

    def nll(self, tokens: jax.Array, xa: jax.Array, labels: jax.Array) -> jax.Array:
        """Teacher forcing: tokens (B, T), xa (B, S, d), labels (B, T) (-100 ignored) -> each
        label's negative log-likelihood (B, T) float32, 0 where ignored; the positions of ignored
        labels write no memory state. The log-softmax of `__call__`'s logits, without their
        (B, T, vocabulary) array kept for the backward pass (`Embedding.nll`)."""
        x, _, _ = self.hidden(tokens, xa, valid=labels != IGNORE_INDEX)
        return self.token_embedding.nll(self.ln(x), labels)

    def embed(self, tokens: jax.Array, offset, length: int, dtype) -> jax.Array:
        """tokens (B, T) after `offset` earlier ones -> the first block's input (B, T, d)."""
        x = self.token_embedding(tokens)  # (B, T, d)
        if self.positional_embedding is not None:
            table = self.positional_embedding[...]
            x = add_positions(x, lookup_positions(table, offset, length, "tokens", self.normalize_positions))
        return constrain(self.dropout(x.astype(dtype)), ACTIVATION)

    def unembed(self, x: jax.Array, padded_vocab: bool = False) -> jax.Array:
        """The last block's output (B, T, d) -> float32 logits (B, T, n_vocab or padded_vocab)."""
        logits = constrain(self.token_embedding.attend(self.ln(x)), LOGITS)  # (B, T, padded_vocab) float32
        return logits if padded_vocab else logits[..., : self.config.n_vocab]

    def cross_attention_scores(self, tokens: jax.Array, xa: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens (B, T), xa (B, S, d) -> logits (B, T, n_vocab) and every layer's cross-attention
        scores before the softmax (L, B, H, T, S) float32: what word alignment reads."""
        length = check_tokens_shape(self.config, tokens.shape, 0)
        x, cross_scores = run_stack_with_cross_scores(self.blocks, self.embed(tokens, 0, length, xa.dtype), xa)
        return self.unembed(x), cross_scores

    def layers(self) -> list[ResidualAttentionBlock]:
        """Each block as a module of its own, its variables copied out of the stack: what
        decoding with `decode_unroll` runs (made once, before its loop; see `run_stack`)."""
        return stacked_layers(self.blocks)

    def for_decoding(self, dtype: jnp.dtype) -> tuple[TextDecoder, list[ResidualAttentionBlock] | None]:
        """(a copy of this decoder, its `layers()` with `decode_unroll`, else None), made once
        before a decoding loop: its products' weights cast to the compute `dtype` (the encoder
        output's) and laid out for one-token steps (`prepare_products`). The same logits as this
        decoder's, without casting every weight again at every step. With `decode_unroll`, only the
        layers' copies are prepared: the copy's stack, which their steps do not read, keeps this
        decoder's arrays (no second copy of every weight in the loop)."""
        graph, state = nnx.split(self)
        decoder = nnx.merge(graph, state)
        if not self.config.decode_unroll:
            prepare_products(decoder, dtype)
            return decoder, None
        layers = decoder.layers()
        for part in (decoder.token_embedding, *layers):
            prepare_products(part, dtype)
        return decoder, layers

    def init_cache(
        self, xa: jax.Array, max_length: int | None = None, layers: Sequence[ResidualAttentionBlock] | None = None
    ) -> DecoderCache:
        """An empty cache for decoding up to `max_length` (default n_text_ctx) tokens after `xa`:
        every layer's stacked on a leading axis, or with `layers` a tuple of theirs.

        Cross-attention keys and values of `xa (B, S, d)` are projected here, once per utterance.
        """
        length = self.config.n_text_ctx if max_length is None else max_length
        if layers is not None:
            return {"offset": jnp.zeros((), jnp.int32), "layers": tuple(block_cache(b, xa, length) for b in layers)}

        @nnx.vmap(in_axes=(0,), out_axes=0)
        def layer_cache(block: ResidualAttentionBlock) -> dict:
            return block_cache(block, xa, length)

        return {"offset": jnp.zeros((), jnp.int32), "layers": layer_cache(self.blocks)}


def block_cache(block: ResidualAttentionBlock, xa: jax.Array, length: int) -> dict:
    """A decoder block's empty cache: its self-attention's for `length` tokens, and the keys and
    values of `xa (B, S, d)` for its cross-attention."""
    return {
        "attn": block.attn.init_cache(xa.shape[0], length, xa.dtype),
        "cross_attn": block.cross_attn.init_cross_cache(xa),
    }


class Whisper(nnx.Module):
    """The encoder-decoder. `model(mel, tokens)` gives the decoder's logits."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = AudioEncoder(config, rngs=rngs)
        self.decoder = TextDecoder(config, rngs=rngs)

    def embed_audio(self, mel: jax.Array) -> jax.Array:
        return self.encoder(mel)

    def __call__(self, mel: jax.Array, tokens: jax.Array) -> jax.Array:
        """mel (B, n_mels, frames), tokens (B, T) -> logits (B, T, n_vocab) float32"""
        check_ids(self.config, tokens)
        return self.logits(mel, tokens)

    def logits(
        self, mel: jax.Array, tokens: jax.Array, valid: jax.Array | None = None, padded_vocab: bool = False
    ) -> jax.Array:
        """`__call__` without the host-side check of the token values (`TextDecoder` for `valid`
        and `padded_vocab`)."""
        logits, _ = self.decoder(tokens, self.encoder(mel), valid=valid, padded_vocab=padded_vocab)
        return logits

    def loss(self, mel: jax.Array, labels: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
        """Teacher-forcing cross-entropy; labels (B, T) with -100 ignored.

        The decoder reads `tokens` when given, else the labels shifted right behind
        `config.start_token_id`.
        """
        check_dtype("labels", labels.dtype, jnp.issubdtype(labels.dtype, jnp.integer), "integer token ids")
        check_ids(self.config, labels, ignored=IGNORE_INDEX)
        if tokens is None:
            tokens = shift_right(labels, self.config.start_token_id)
        else:
            check_ids(self.config, tokens)
        nll = self.decoder.nll(tokens, self.encoder(mel), labels)  # (B, T)
        return jnp.sum(nll) / jnp.maximum(jnp.sum(labels != IGNORE_INDEX), 1)


def shift_right(labels: jax.Array, start_token_id: int) -> jax.Array:
    """labels (B, T) -> decoder inputs (B, T): `[start, labels[:-1]]`, ignored labels read as start.

    An ignored (-100) label only feeds positions after it; with padding at the end those are
    ignored too, so the id read there does not matter as long as it is a valid token.
    """
    start = jnp.full_like(labels[:, :1], start_token_id)
    tokens = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(tokens == IGNORE_INDEX, start_token_id, tokens)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean float32 cross-entropy over labels != -100 (0 when all are). logits (B, T, V), labels (B, T) -> ()"""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    keep = labels != IGNORE_INDEX
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]  # (B, T)
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(keep.sum(), 1)


def pure_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(model, *args)` jitted over the model's split state: the call returns what `fn` returns
    and nothing else.

    `nnx.jit` also hands the module's state back, so that whatever `fn` changed reaches it: a copy
    of every weight on every call (the `tiny` encoder at batch 1 takes about 10% longer so on a
    CPU) and, for a large model, the weights held twice meanwhile. This is for calls that change
    nothing in the model (`model.eval()` forwards): a change made inside is dropped, as under any
    `jax.jit`. The model is split at each call, so the call always sees its current weights.
    """

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    @functools.wraps(fn)
    def call(model: nnx.Module, *args):
        return run(*nnx.split(model), *args)

    return call
