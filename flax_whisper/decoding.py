"""Greedy decoding, sampling and beam search with the KV cache (mirrors `torch_ref/decoding.py`).

`greedy_decode` is one jit-compiled program per (batch, frames, prompt length, options): the
sampling loop is a `lax.while_loop` over single-token decoder steps on a fixed-size cache, which
exits once every row has produced end of text. It checks that every `check_every` steps (8 on a
GPU, 1 elsewhere: `whisper_io.decoding.CHECK_EVERY`), running the steps in between as a loop of
known length, which XLA's GPU runtime queues without waiting for the device. See
`whisper_io.decoding` for the algorithm.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_whisper.model import Whisper
from whisper_config import InputError, check_token_range
from whisper_io.decoding import BeamSearch, DecodingOptions, prompt_lengths, steps_per_check


def suppress(logits: jax.Array, ids: tuple[int, ...]) -> jax.Array:
    """logits (B, V) with the columns `ids` set to -inf: a select over a constant mask, which XLA
    fuses into the reduction that reads the logits next (a scatter is a kernel of its own)."""
    if not ids:
        return logits
    mask = np.zeros(logits.shape[-1], bool)
    mask[np.asarray(ids)] = True
    return jnp.where(mask, -jnp.inf, logits)


def timestamp_rules(logits: jax.Array, sampled: jax.Array, count, options: DecodingOptions) -> jax.Array:
    """OpenAI's timestamp rules (see `whisper_io.decoding`): logits (B, V) for the token after the
    first `count` of `sampled` (B, N) -> logits with the forbidden ids at -inf. `count` may be
    traced, one for every row or one per row (B,)."""
    if options.timestamp_begin is None:
        return logits
    begin, eot = options.timestamp_begin, options.eot
    ids = jnp.arange(logits.shape[-1])
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), sampled.shape[:1])  # (B,)

    top = sampled.shape[1] - 1  # a finished row's count may pass the end; its logits go unused

    def at(index):  # (B,) the sampled token at each row's index
        return jnp.take_along_axis(sampled, jnp.clip(index, 0, top)[:, None], axis=1)[:, 0]

    last, penultimate = at(count - 1), at(count - 2)
    last_stamp = (count >= 1) & (last >= begin)
    penultimate_stamp = (count < 2) | (penultimate >= begin)
    seen = jnp.arange(sampled.shape[1]) < count[:, None]
    latest = jnp.max(jnp.where(seen & (sampled >= begin), sampled, -1), axis=1)  # (B,) -1: none yet
    bound = jnp.where(last_stamp & ~penultimate_stamp, latest, latest + 1)
    forbidden = (
        (ids == options.no_timestamps)
        | ((last_stamp & penultimate_stamp)[:, None] & (ids >= begin))  # after a pair: text
        | ((last_stamp & ~penultimate_stamp)[:, None] & (ids < eot))  # after a lone one: its pair
        | ((latest >= 0)[:, None] & (ids >= begin) & (ids < bound[:, None]))  # never backwards
    )
    if options.max_initial_timestamp_index is not None:
        late = ids > begin + options.max_initial_timestamp_index
    else:
        late = jnp.zeros_like(ids, bool)
    forbidden |= (count == 0)[:, None] & ((ids < begin) | late)  # the first token: an early timestamp
    logits = jnp.where(forbidden, -jnp.inf, logits)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    stamps = jax.nn.logsumexp(logprobs[:, begin:], axis=-1)
    text = jnp.max(logprobs[:, :begin], axis=-1)
    return jnp.where((stamps > text)[:, None] & (ids < begin), -jnp.inf, logits)


def detect_language(model: Whisper, xa: jax.Array, start: jax.Array, language_tokens: tuple[int, ...]) -> jax.Array:
    """The most likely language token after the start token alone. xa (B, S, d), start (B, 1) -> (B,)"""
    logits, _ = model.decoder(start, xa)  # (B, 1, V)
    candidates = np.asarray(language_tokens)
    return jnp.asarray(candidates)[jnp.argmax(logits[:, 0, candidates], axis=-1)]


def greedy_decode(model: Whisper, mel, prompt, options: DecodingOptions, *, check_every: int | None = None):
    """mel (B, n_mels, frames), prompt (B, P) int -> tokens (B, P + max_new_tokens) int32 (a jax.Array).

    The prompt (with the detected language written in, when detecting) is followed by the
    sampled tokens; every position after a row's end of text holds end of text. Call
    `model.eval()` first: decoding in training mode would apply dropout.
    """
    if options.temperature > 0:
        raise InputError("greedy_decode takes the arg-max: sample with decode_with_scores and a key")
    return decode_with_scores(model, mel, prompt, options, check_every=check_every)[0]


def decode_with_scores(
    model: Whisper,
    mel,
    prompt,
    options: DecodingOptions,
    key: jax.Array | None = None,
    prompt_length: int | Sequence[int] | None = None,
    *,
    check_every: int | None = None,
):
    """`greedy_decode`, or sampling at `options.temperature` > 0 with the random `key`, also
    returning each row's sum of log-probabilities (B,) float32 and no-speech probability (B,)
    float32 (NaN without `options.no_speech`); see `whisper_io.decoding`.

    With `prompt_length`, only the first `prompt_length` columns of `prompt` are its tokens (the
    rest is padding, any ids) and `options.max_new_tokens` is a most, cut to the room the context
    leaves after them (OpenAI stops at `n_text_ctx + 1` tokens): prompts of different lengths
    padded to one width share one compiled program. The samples follow the real tokens; the
    result is (B, P + max_new_tokens) as without. `prompt_length` may also give each row's (B,):
    rows of different lengths decode together, each as it would alone. `check_every`: the steps
    between checks that every row has finished (None: by the device, see the module docstring);
    the result does not depend on it."""
    every = steps_per_check(jax.default_backend(), check_every)
    prompt = np.asarray(prompt, np.int32)
    real = prompt_lengths(model.config, prompt.shape, options.max_new_tokens, prompt_length)
    check_token_range(model.config, int(prompt.min()), int(prompt.max()))
    if (options.temperature > 0) != (key is not None):
        raise InputError("a random key is needed at a temperature above 0, and only there")
    key = jax.random.key(0) if key is None else key  # unused at temperature 0
    # The temperature is traced (every value above 0 shares a program); options say only whether to sample.
    temperature = jnp.float32(options.temperature)
    options = dataclasses.replace(options, temperature=float(options.temperature > 0))
    graphdef, state = nnx.split(model)
    return _greedy_decode_jit(
        graphdef, state, jnp.asarray(mel), prompt, options, key, jnp.asarray(real), temperature, every
    )


def select_rows(layers, rows: jax.Array):
    """The decoder's block caches (stacked, or a tuple of each layer's) with their self-attention
    caches' rows taken from `rows` (B,): beam search's reordering. Cross-attention is unchanged."""
    if isinstance(layers, tuple):
        return tuple({**layer, "attn": jax.tree.map(lambda x: x[rows], layer["attn"])} for layer in layers)
    return {**layers, "attn": jax.tree.map(lambda x: x[:, rows], layers["attn"])}


def checked_loop(unfinished, step, state, every: int):
    """`nnx.while_loop(unfinished, step, state)`, testing `unfinished` before every `every`
    steps only: `step` must leave the result unchanged once `unfinished` is false."""
    if every > 1:
        block = functools.partial(nnx.fori_loop, 0, every, lambda _, state: step(state))
        return nnx.while_loop(unfinished, block, state)
    return nnx.while_loop(unfinished, step, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "every"))
def _greedy_decode_jit(graphdef, state, mel, prompt, options: DecodingOptions, key, real, temperature, every):
    """A pure jit over the split model: it returns the tokens and scores only (an `nnx.jit` would
    also hand back the model's state, a copy of every weight per call)."""
    return _greedy_decode(nnx.merge(graphdef, state), mel, prompt, options, key, real, temperature, every)


def no_speech_probability(logits: jax.Array, prompt: jax.Array, options: DecodingOptions) -> jax.Array:
    """logits (B, P, V) of the prompt (B, P) -> the probability of <|nospeech|> after its start
    token (B,), in float32; NaN without `options.no_speech`."""
    if options.no_speech is None or options.sot is None:
        return jnp.full(prompt.shape[:1], jnp.nan, jnp.float32)
    at = jnp.argmax(prompt == options.sot, axis=1)  # (B,) the start token's position
    start = jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]  # (B, V)
    return jax.nn.softmax(start.astype(jnp.float32), axis=-1)[:, options.no_speech]


def choose(allowed: jax.Array, options: DecodingOptions, key: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """Masked logits (B, V) -> (the next token (B,) int32, its log-probability (B,) float32): the
    arg-max at temperature 0, else a draw from softmax(allowed / temperature) by the Gumbel-max
    trick (the arg-max after adding standard Gumbel noise drawn with `key`). `temperature` may be
    traced; `options.temperature` > 0 says whether to sample."""
    if options.temperature > 0:
        noise = jax.random.gumbel(key, allowed.shape, jnp.float32)
        chosen = jnp.argmax(allowed.astype(jnp.float32) / temperature + noise, axis=-1)
    else:
        chosen = jnp.argmax(allowed, axis=-1)
    logprobs = jax.nn.log_softmax(allowed.astype(jnp.float32), axis=-1)
    return chosen.astype(jnp.int32), jnp.take_along_axis(logprobs, chosen[:, None], axis=1)[:, 0]


def _greedy_decode(model: Whisper, mel, prompt, options: DecodingOptions, key, real, temperature, every: int):
    """`real` (B,) (traced): row r's prompt is its first `real[r]` columns; its samples start
    there. `temperature` (traced) divides the logits when `options.temperature` says to sample.

    Every row's first sample comes from the prompt's one pass. The loop then feeds one column `c`
    of every row per step, from the shortest prompt's end: a row whose prompt reaches past `c`
    feeds its prompt token again (its output unused), the others their last sample, so each row's
    tokens keep the positions they have decoded alone. Rows of one length take the same steps as
    a single prompt would. Steps after every row has finished (`every` > 1) write each row's
    column back as it is."""
    eot, max_new = options.eot, options.max_new_tokens
    batch, width = prompt.shape
    n_ctx = model.config.n_text_ctx
    limit = jnp.minimum(max_new, n_ctx - real + 1)  # (B,) samples at most (== max_new unpadded)
    low = jnp.min(real)
    xa = model.encoder(mel)  # (B, S, d)
    if options.language_tokens:
        prompt = prompt.at[:, 1].set(detect_language(model, xa, prompt[:, :1], options.language_tokens))
    columns = jnp.arange(width)
    prompt = jnp.where(columns < real[:, None], prompt, eot)  # padding: end of text (never attended)

    # Every prompt token and every sampled token but the last is fed once; padding after a
    # prompt is overwritten before any query reaches it (causal attention).
    decoder, layers = model.decoder.for_decoding(xa.dtype)  # weights cast (and layers copied out) once
    cache = decoder.init_cache(xa, min(width + max_new - 1, n_ctx), layers)
    logits, cache = decoder(prompt, xa, cache, valid=columns < real[:, None], layers=layers)
    cache = {**cache, "offset": low}
    no_speech = no_speech_probability(logits, prompt, options)
    last = jnp.take_along_axis(logits, (real - 1)[:, None, None], axis=1)[:, 0]  # (B, V): each last real token
    tokens = jnp.full((batch, width + max_new), eot, jnp.int32).at[:, :width].set(prompt)
    rows = jnp.arange(batch)
    samples = real[:, None] + jnp.arange(max_new)  # (B, max_new): each row's sample columns

    def sampled(tokens):
        return jnp.take_along_axis(tokens, samples, axis=1)  # (B, max_new)

    first = suppress(suppress(last, options.suppress_tokens), options.blank_tokens)
    first, scores = choose(timestamp_rules(first, sampled(tokens), 0, options), options, key, temperature)
    tokens = tokens.at[rows, real].set(first)

    def unfinished(state):
        _, c, _, _, done, _ = state
        return jnp.any(~done & (c + 1 - real < limit))

    def step(state):
        # The decoder travels in the loop state: NNX transforms inside it (the layer scan) cannot
        # reach a module captured from an outer trace.
        (decoder, layers), c, tokens, cache, done, scores = state
        i = c + 1 - real  # (B,) the sample each row's logits give (< 1: still in its prompt)
        logits, cache = decoder(jax.lax.dynamic_slice_in_dim(tokens, c, 1, axis=1), xa, cache, layers=layers)
        allowed = timestamp_rules(suppress(logits[:, -1], options.suppress_tokens), sampled(tokens), i, options)
        chosen, logprob = choose(allowed, options, jax.random.fold_in(key, c + 1 - low), temperature)
        active = (i >= 1) & (i < limit) & ~done
        scores = scores + jnp.where(active, logprob, 0.0)  # up to and including each row's end of text
        column = jax.lax.dynamic_slice_in_dim(tokens, c + 1, 1, axis=1)[:, 0]
        # Inactive rows keep their column: a prompt token, or the end of text a row holds after
        # its last sample (or, past the buffer's end, where the index is clamped, that sample).
        chosen = jnp.where(active, chosen, column)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], c + 1, axis=1)
        return (decoder, layers), c + 1, tokens, cache, done | (active & (chosen == eot)), scores

    state = ((decoder, layers), low, tokens, cache, first == eot, scores)
    _, _, tokens, _, _, scores = checked_loop(unfinished, step, state, every)
    return tokens, scores, no_speech


def beam_search_decode(
    model: Whisper,
    mel,
    prompt,
    options: DecodingOptions,
    beam: BeamSearch,
    prompt_length: int | Sequence[int] | None = None,
    *,
    check_every: int | None = None,
):
    """mel (B, n_mels, frames), prompt (B, P) -> (tokens (B, P + max_new_tokens) int32, the
    chosen candidate of each utterance padded with end of text, its sum of log-probabilities (B,)
    float32, and the no-speech probability (B,) float32): OpenAI's beam search (see
    `whisper_io.decoding.BeamSearch`), one jitted program per (shapes, options, beam);
    `prompt_length` as for `decode_with_scores`, one per row too: utterances of different prompt
    lengths are searched together, each as it would be alone; `check_every` as for
    `decode_with_scores`. Call `model.eval()` first."""
    every = steps_per_check(jax.default_backend(), check_every)
    prompt = np.asarray(prompt, np.int32)
    real = prompt_lengths(model.config, prompt.shape, options.max_new_tokens, prompt_length)
    check_token_range(model.config, int(prompt.min()), int(prompt.max()))
    graphdef, state = nnx.split(model)
    return _beam_search_jit(graphdef, state, jnp.asarray(mel), prompt, options, beam, jnp.asarray(real), every)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "beam", "every"))
def _beam_search_jit(graphdef, state, mel, prompt, options: DecodingOptions, beam: BeamSearch, real, every):
    return _beam_search(nnx.merge(graphdef, state), mel, prompt, options, beam, real, every)


def _beam_search(model: Whisper, mel, prompt, options: DecodingOptions, beam: BeamSearch, real, every: int):
    """`real` (B,) (traced): utterance u's prompt is its first `real[u]` columns.

    The loop writes one column `c` of every utterance per step, from the shortest prompt's end;
    utterance u is at its step `i = c - real[u]`. One still inside its prompt (i < 0), out of
    room, or holding its candidates searches nothing: its beams, sums and candidates stay as they
    are (its rows feed their column again), so each utterance is searched as it would be alone.
    Every utterance's first logits come from the prompts' one pass."""
    eot, max_new, k, most = options.eot, options.max_new_tokens, beam.beam_size, beam.max_candidates
    batch, width = prompt.shape
    length = width + max_new
    limit = jnp.minimum(max_new, model.config.n_text_ctx - real + 1)  # (B,) steps at most
    low = jnp.min(real)
    xa = model.encoder(mel)  # (B, S, d)
    if options.language_tokens:
        prompt = prompt.at[:, 1].set(detect_language(model, xa, prompt[:, :1], options.language_tokens))
    columns = jnp.arange(width)
    prompt = jnp.where(columns < real[:, None], prompt, eot)  # padding (see `_greedy_decode`)
    xa = jnp.repeat(xa, k, axis=0)  # (B k, S, d): the beams of an utterance are neighbouring rows
    beam_real = jnp.repeat(real, k)  # (B k,)
    tokens = jnp.full((batch * k, length), eot, jnp.int32).at[:, :width].set(jnp.repeat(prompt, k, axis=0))
    decoder, layers = model.decoder.for_decoding(xa.dtype)  # weights cast (and layers copied out) once
    cache = decoder.init_cache(xa, length, layers)
    logits, cache = decoder(tokens[:, :width], xa, cache, valid=columns < beam_real[:, None], layers=layers)
    cache = {**cache, "offset": low}
    no_speech = no_speech_probability(logits[::k], prompt, options)

    def sampled(tokens, starts):  # tokens (..., L), starts (...) -> each row's samples (..., max_new)
        return jnp.take_along_axis(tokens, starts[..., None] + jnp.arange(max_new), axis=-1)

    rows = (jnp.arange(batch) * k)[:, None]  # (B, 1): each utterance's first row
    utterance = jnp.arange(batch)[:, None]
    size = max(most, k)  # the candidates an utterance ends with: `most` finished, or k when too few

    def unfinished(state):
        _, c, _, _, _, _, _, _, count = state
        return jnp.any((c - real < limit) & (count < most))

    def step(state):
        (decoder, layers), c, tokens, cache, logits, scores, done, done_scores, count = state
        i = c - real  # (B,) each utterance's step
        live = (i >= 0) & (i < limit) & (count < most)  # (B,) the utterances searching now
        at = jnp.repeat(i, k)[:, None]  # (B k, 1)
        logits = suppress(logits, options.suppress_tokens)
        logits = jnp.where(at == 0, suppress(logits, options.blank_tokens), logits)
        logprobs = jax.nn.log_softmax(timestamp_rules(logits, sampled(tokens, beam_real), at[:, 0], options), axis=-1)
        top, ids = jax.lax.top_k(logprobs, k + 1)  # (B k, k + 1)
        sums = (scores[:, None] + top).reshape(batch, k * (k + 1))  # beam-major, then rank
        sums = jnp.where((i == 0)[:, None] & (jnp.arange(k * (k + 1)) >= k + 1), -jnp.inf, sums)  # one prompt, one beam
        order = jnp.argsort(-sums, axis=1, stable=True)
        sums = jnp.take_along_axis(sums, order, axis=1)  # (B, C) best first
        proposed = jnp.take_along_axis(ids.reshape(batch, -1), order, axis=1)
        source = rows + order // (k + 1)  # (B, C) the proposing row
        ends = proposed == eot
        others = jnp.cumsum(~ends, axis=1)  # proposals not ending so far, inclusive
        # Finished: ends ranked before the k-th kept proposal; kept: the first k others.
        considered = (others - ~ends) < k
        finished = ends & considered & live[:, None]
        kept = jnp.argsort(~(~ends & (others <= k)), axis=1, stable=True)[:, :k]  # (B, k) positions
        # Candidates finished now go to each utterance's list, best first, while it has room.
        slot = count[:, None] + jnp.cumsum(finished, axis=1) - 1
        slot = jnp.where(finished & (slot < most), slot, size)  # `size`: dropped
        ended = tokens[source]  # (B, C, L): a finished candidate is its row, end of text after
        done = done.at[utterance, slot].set(ended, mode="drop")
        done_scores = done_scores.at[utterance, slot].set(sums, mode="drop")
        count = jnp.minimum(count + finished.sum(axis=1), most)
        # The kept proposals become the beams: rows gathered (tokens and self-attention caches);
        # a waiting utterance keeps its rows.
        chosen = jnp.where(live[:, None], jnp.take_along_axis(source, kept, axis=1), rows + jnp.arange(k))
        chosen = chosen.reshape(-1)  # (B k,)
        tokens = tokens[chosen]
        column = jax.lax.dynamic_slice_in_dim(tokens, c, 1, axis=1)  # (B k, 1)
        written = jnp.take_along_axis(proposed, kept, axis=1).reshape(-1, 1)
        column = jnp.where(jnp.repeat(live, k)[:, None], written, column)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, column, c, axis=1)
        scores = jnp.where(live[:, None], jnp.take_along_axis(sums, kept, axis=1), scores.reshape(batch, k))
        cache = {**cache, "layers": select_rows(cache["layers"], chosen)}
        fed, cache = decoder(column, xa, cache, layers=layers)
        logits = jnp.where(at >= 0, fed[:, -1], logits)  # still before its last prompt token: the first logits
        return (decoder, layers), c + 1, tokens, cache, logits, scores.reshape(-1), done, done_scores, count

    done = jnp.full((batch, size, length), eot, jnp.int32)
    done_scores = jnp.full((batch, size), -jnp.inf, jnp.float32)
    # (B k, V): the logits after each row's last real token
    first = jnp.take_along_axis(logits, (beam_real - 1)[:, None, None], axis=1)[:, 0]
    state = ((decoder, layers), low, tokens, cache, first, jnp.zeros(batch * k),
             done, done_scores, jnp.zeros(batch, jnp.int32))  # fmt: skip
    _, _, tokens, _, _, scores, done, done_scores, count = checked_loop(unfinished, step, state, every)

    # Too few finished: the remaining beams, best first, until an utterance has k candidates.
    best = jnp.argsort(-scores.reshape(batch, k), axis=1, stable=True)  # (B, k)
    fill = jnp.arange(k)[None, :] + count[:, None]  # the slot each beam would take
    fill = jnp.where(fill < k, fill, size)  # `size`: dropped
    beams = jnp.take_along_axis(tokens.reshape(batch, k, length), best[..., None], axis=1)
    pool = done.at[utterance, fill].set(beams, mode="drop")
    beam_scores = jnp.take_along_axis(scores.reshape(batch, k), best, axis=1)
    pool_scores = done_scores.at[utterance, fill].set(beam_scores, mode="drop")
    # Rank by the sum over the length penalty; the first best wins.
    ends = sampled(pool, real[:, None]) == eot  # (B, size, max_new)
    lengths = jnp.where(ends.any(axis=-1), jnp.argmax(ends, axis=-1), limit[:, None]).astype(jnp.float32)
    penalty = lengths if beam.length_penalty is None else ((5 + lengths) / 6) ** beam.length_penalty
    pick = jnp.argmax(jnp.where(jnp.isfinite(pool_scores), pool_scores / penalty, -jnp.inf), axis=1)
    chosen = jnp.take_along_axis(pool, pick[:, None, None], axis=1)[:, 0]
    return chosen, jnp.take_along_axis(pool_scores, pick[:, None], axis=1)[:, 0], no_speech
