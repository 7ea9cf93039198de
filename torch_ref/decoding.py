"""Greedy decoding, sampling and beam search with the KV cache (mirrors `flax_whisper/decoding.py`).

An eager loop over single-token decoder steps that stops once every row has produced end of
text, checked every `check_every` steps (8 on a CUDA device, 1 elsewhere:
`whisper_io.decoding.CHECK_EVERY`; reading the flag waits for the device). See
`whisper_io.decoding` for the algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from torch_ref.model import Whisper
from whisper_config import InputError, check_token_range
from whisper_io.decoding import BeamSearch, DecodingOptions, prompt_lengths, steps_per_check


def suppress(logits: Tensor, ids: tuple[int, ...]) -> Tensor:
    """logits (B, V) with the columns `ids` set to -inf."""
    if ids:
        logits = logits.clone()
        logits[:, list(ids)] = -torch.inf
    return logits


def timestamp_rules(logits: Tensor, sampled: Tensor, count: int | Tensor, options: DecodingOptions) -> Tensor:
    """OpenAI's timestamp rules (see `whisper_io.decoding`): logits (B, V) for the token after the
    first `count` of `sampled` (B, N) -> logits with the forbidden ids at -inf. `count` is one for
    every row or one per row (B,)."""
    if options.timestamp_begin is None:
        return logits
    begin, eot = options.timestamp_begin, options.eot
    ids = torch.arange(logits.shape[-1], device=logits.device)
    count = torch.as_tensor(count, device=sampled.device).expand(sampled.shape[0])  # (B,)
    top = sampled.shape[1] - 1  # a finished row's count may pass the end; its logits go unused

    def at(index: Tensor) -> Tensor:  # (B,) the sampled token at each row's index
        return sampled.gather(1, index.clamp(0, top)[:, None])[:, 0]

    last, penultimate = at(count - 1), at(count - 2)
    last_stamp = (last >= begin) & (count >= 1)
    penultimate_stamp = (penultimate >= begin) | (count < 2)
    seen = torch.arange(sampled.shape[1], device=sampled.device) < count[:, None]
    latest = torch.where(seen & (sampled >= begin), sampled, -1).amax(dim=1)  # (B,) -1: none yet
    bound = torch.where(last_stamp & ~penultimate_stamp, latest, latest + 1)
    forbidden = (
        (ids == options.no_timestamps)
        | ((last_stamp & penultimate_stamp)[:, None] & (ids >= begin))  # after a pair: text
        | ((last_stamp & ~penultimate_stamp)[:, None] & (ids < eot))  # after a lone one: its pair
        | ((latest >= 0)[:, None] & (ids >= begin) & (ids < bound[:, None]))  # never backwards
    )
    if options.max_initial_timestamp_index is not None:
        late = ids > begin + options.max_initial_timestamp_index
    else:
        late = torch.zeros_like(ids, dtype=torch.bool)
    forbidden |= (count == 0)[:, None] & ((ids < begin) | late)  # the first token: an early timestamp
    logits = logits.masked_fill(forbidden, -torch.inf)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    stamps = torch.logsumexp(logprobs[:, begin:], dim=-1)
    text = logprobs[:, :begin].amax(dim=-1)
    return logits.masked_fill((stamps > text)[:, None] & (ids < begin), -torch.inf)


def detect_language(model: Whisper, xa: Tensor, start: Tensor, language_tokens: tuple[int, ...]) -> Tensor:
    """The most likely language token after the start token alone. xa (B, S, d), start (B, 1) -> (B,)"""
    logits, _ = model.decoder(start, xa)  # (B, 1, V)
    candidates = torch.tensor(language_tokens, device=xa.device)
    return candidates[logits[:, 0, candidates].argmax(dim=-1)]


def greedy_decode(model: Whisper, mel, prompt, options: DecodingOptions, *, check_every: int | None = None) -> Tensor:
    """mel (B, n_mels, frames), prompt (B, P) int -> tokens (B, P + max_new_tokens) int64.

    The prompt (with the detected language written in, when detecting) is followed by the
    sampled tokens; every position after a row's end of text holds end of text. Call
    `model.eval()` first: decoding in training mode would apply dropout.
    """
    if options.temperature > 0:
        raise InputError("greedy_decode takes the arg-max: sample with decode_with_scores and a generator")
    return decode_with_scores(model, mel, prompt, options, check_every=check_every)[0]


def no_speech_probability(logits: Tensor, prompt: Tensor, options: DecodingOptions) -> Tensor:
    """logits (B, P, V) of the prompt (B, P) -> the probability of <|nospeech|> after its start
    token (B,), in float32; NaN without `options.no_speech`."""
    if options.no_speech is None or options.sot is None:
        return torch.full(prompt.shape[:1], torch.nan, dtype=torch.float32, device=prompt.device)
    at = (prompt == options.sot).int().argmax(dim=1)  # (B,) the start token's position
    start = logits[torch.arange(len(prompt), device=prompt.device), at]  # (B, V)
    return start.float().softmax(dim=-1)[:, options.no_speech]


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise of `shape`, float32: -log(-log(u)) for u uniform in (0, 1)."""
    tiny = torch.finfo(torch.float32).tiny
    uniform = torch.rand(shape, generator=generator, dtype=torch.float32).clamp_(min=tiny, max=1.0 - 2**-24)
    return -torch.log(-torch.log(uniform))


def choose(
    allowed: Tensor, options: DecodingOptions, generator: torch.Generator | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """Masked logits (B, V) -> (the next token (B,), its log-probability (B,) float32): the
    arg-max at temperature 0, else a draw from softmax(allowed / temperature) by the Gumbel-max
    trick (the arg-max after adding standard Gumbel noise drawn from `generator`)."""
    if options.temperature > 0:
        noise = gumbel(tuple(allowed.shape), generator).to(allowed.device)
        chosen = (allowed.float() / temperature + noise).argmax(dim=-1)
    else:
        chosen = allowed.argmax(dim=-1)
    logprobs = torch.log_softmax(allowed.float(), dim=-1)
    return chosen, logprobs.gather(1, chosen[:, None])[:, 0]


@torch.no_grad()
def decode_with_scores(
    model: Whisper,
    mel,
    prompt,
    options: DecodingOptions,
    generator: torch.Generator | None = None,
    prompt_length: int | Sequence[int] | None = None,
    *,
    check_every: int | None = None,
):
    """`greedy_decode`, or sampling at `options.temperature` > 0 from `generator`, also returning
    each row's sum of log-probabilities (B,) float32 and no-speech probability (B,) float32 (NaN
    without `options.no_speech`); see `whisper_io.decoding`. With `prompt_length`, only the first
    `prompt_length` columns of `prompt` are its tokens and `options.max_new_tokens` is a most, cut
    to the room the context leaves; one length per row (B,) decodes rows of different lengths
    together, each as it would alone (as in `flax_whisper.decoding.decode_with_scores`).

    The prompts go through in one pass (up to the longest), which gives every row its first
    sample; the loop then feeds one column `c` of every row per step from the shortest prompt's
    end: a row whose prompt reaches past `c` feeds its prompt token again, the others their last
    sample. `check_every`: the steps between checks that every row has finished (None: by the
    device); the result does not depend on it. Sampling checks at every step, so that the
    generator is drawn from exactly as often as the tokens need."""
    eot, max_new = options.eot, options.max_new_tokens
    if (options.temperature > 0) != (generator is not None):
        raise InputError("a random generator is needed at a temperature above 0, and only there")
    device = next(model.parameters()).device
    every = steps_per_check(device.type, check_every)
    every = every if generator is None else 1  # each step draws: check each one
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=device).clone()
    batch, width = prompt.shape
    lengths = prompt_lengths(model.config, (batch, width), max_new, prompt_length)
    real = torch.as_tensor(lengths, dtype=torch.long, device=device)  # (B,)
    check_token_range(model.config, int(prompt.min()), int(prompt.max()))
    limit = (model.config.n_text_ctx - real + 1).clamp(max=max_new)  # (B,)
    low, high, end = int(real.min()), int(real.max()), int((real + limit).max())
    xa = model.encoder(torch.tensor(np.asarray(mel), device=device))  # (B, S, d)
    if options.language_tokens:
        prompt[:, 1] = detect_language(model, xa, prompt[:, :1], options.language_tokens)
    columns = torch.arange(width, device=device)
    prompt = torch.where(columns < real[:, None], prompt, eot)  # padding: end of text

    # Every prompt token and every sampled token but the last is fed once; padding after a
    # prompt is overwritten before any query reaches it (causal attention).
    cache = model.decoder.init_cache(xa, end - 1)
    logits, cache = model.decoder(prompt[:, :high], xa, cache)
    cache = {**cache, "offset": low}
    no_speech = no_speech_probability(logits, prompt[:, :high], options)
    rows = torch.arange(batch, device=device)
    tokens = torch.full((batch, width + max_new), eot, dtype=torch.long, device=device)
    tokens[:, :width] = prompt
    samples = real[:, None] + torch.arange(max_new, device=device)  # (B, max_new): each row's sample columns
    first = suppress(suppress(logits[rows, real - 1], options.suppress_tokens), options.blank_tokens)
    chosen, scores = choose(
        timestamp_rules(first, tokens.gather(1, samples), 0, options), options, generator, options.temperature
    )
    tokens[rows, real] = chosen
    done = chosen == eot
    for c in range(low, end - 1):
        i = c + 1 - real  # (B,) the sample each row's logits give (< 1: still in its prompt)
        if (c - low) % every == 0 and bool((done | (i >= limit)).all()):
            break
        logits, cache = model.decoder(tokens[:, c : c + 1], xa, cache)
        allowed = timestamp_rules(
            suppress(logits[:, -1], options.suppress_tokens), tokens.gather(1, samples), i, options
        )
        chosen, logprob = choose(allowed, options, generator, options.temperature)
        active = (i >= 1) & (i < limit) & ~done
        scores = scores + torch.where(active, logprob, 0.0)  # up to and including each row's end of text
        chosen = torch.where(active, chosen, tokens[:, c + 1])  # inactive rows keep their column
        tokens[:, c + 1] = chosen
        done |= active & (chosen == eot)
    return tokens, scores, no_speech


def _rows(cache, rows: Tensor):
    """A (nested) cache dict with the batch rows `rows` of every tensor."""
    if isinstance(cache, dict):
        return {name: _rows(value, rows) for name, value in cache.items()}
    return cache[rows] if isinstance(cache, Tensor) else cache


@torch.no_grad()
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
    """mel (B, n_mels, frames), prompt (B, P) -> (tokens (B, P + max_new_tokens) int64, the
    chosen candidate of each utterance padded with end of text, its sum of log-probabilities (B,)
    float32, and the no-speech probability (B,) float32): OpenAI's beam search (see
    `whisper_io.decoding.BeamSearch`); `prompt_length` as for `decode_with_scores`, one per row
    too, each utterance searched as it would be alone (the loop over columns is the one
    `flax_whisper.decoding._beam_search` describes); `check_every` as for `decode_with_scores`.
    Call `model.eval()` first."""
    eot, max_new, k, most = options.eot, options.max_new_tokens, beam.beam_size, beam.max_candidates
    device = next(model.parameters()).device
    every = steps_per_check(device.type, check_every)
    prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=device).clone()
    batch, width = prompt.shape
    lengths = prompt_lengths(model.config, (batch, width), max_new, prompt_length)
    real = torch.as_tensor(lengths, dtype=torch.long, device=device)  # (B,) the real prompt tokens
    check_token_range(model.config, int(prompt.min()), int(prompt.max()))
    limit = (model.config.n_text_ctx - real + 1).clamp(max=max_new)  # (B,) steps at most
    low, high, end = int(real.min()), int(real.max()), int((real + limit).max())
    length = width + max_new
    xa = model.encoder(torch.tensor(np.asarray(mel), device=device))  # (B, S, d)
    if options.language_tokens:
        prompt[:, 1] = detect_language(model, xa, prompt[:, :1], options.language_tokens)
    prompt = torch.where(torch.arange(width, device=device) < real[:, None], prompt, eot)  # padding: end of text
    xa = xa.repeat_interleave(k, dim=0)  # (B k, S, d): the beams of an utterance are neighbouring rows
    beam_real = real.repeat_interleave(k)  # (B k,)
    tokens = torch.full((batch * k, length), eot, dtype=torch.long, device=device)
    tokens[:, :width] = prompt.repeat_interleave(k, dim=0)
    cache = model.decoder.init_cache(xa, length)
    logits, cache = model.decoder(tokens[:, :high], xa, cache)
    cache = {**cache, "offset": low}
    no_speech = no_speech_probability(logits[::k], prompt[:, :high], options)
    logits = logits[torch.arange(batch * k, device=device), beam_real - 1]  # (B k, V): after each last real token

    def sampled(tokens: Tensor, starts: Tensor) -> Tensor:  # (..., L), (...) -> each row's samples (..., max_new)
        index = starts[..., None] + torch.arange(max_new, device=device)
        return tokens.gather(-1, index.expand(*tokens.shape[:-1], max_new))

    rows = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1): each utterance's first row
    scores = torch.zeros(batch * k, device=device)
    size = max(most, k)  # the candidates an utterance ends with: `most` finished, or k when too few
    done = torch.full((batch, size + 1, length), eot, dtype=torch.long, device=device)  # (slot `size`: dropped)
    done_scores = torch.full((batch, size + 1), -torch.inf, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)
    utterance = torch.arange(batch, device=device)[:, None]
    for c in range(low, end):
        i = c - real  # (B,) each utterance's step
        live = (i >= 0) & (i < limit) & (count < most)  # (B,) the utterances searching now
        at = i.repeat_interleave(k)[:, None]  # (B k, 1)
        logits = suppress(logits, options.suppress_tokens)
        logits = torch.where(at == 0, suppress(logits, options.blank_tokens), logits)
        allowed = timestamp_rules(logits, sampled(tokens, beam_real), at[:, 0], options)
        top, ids = torch.log_softmax(allowed.float(), dim=-1).topk(k + 1, dim=-1)  # (B k, k + 1)
        sums = (scores[:, None] + top).reshape(batch, k * (k + 1))  # beam-major, then rank
        first = (i == 0)[:, None] & (torch.arange(k * (k + 1), device=device) >= k + 1)
        sums = sums.masked_fill(first, -torch.inf)  # one prompt, one beam
        sums, order = torch.sort(sums, dim=1, descending=True, stable=True)
        proposed = ids.reshape(batch, -1).gather(1, order)
        source = rows + order // (k + 1)  # (B, C) the proposing row
        ends = proposed == eot
        others = torch.cumsum(~ends, dim=1)  # proposals not ending so far, inclusive
        # Finished: ends ranked before the k-th kept proposal; kept: the first k others.
        finished = ends & ((others - (~ends).long()) < k) & live[:, None]
        kept = torch.sort((~(~ends & (others <= k))).long(), dim=1, stable=True).indices[:, :k]  # (B, k)
        # Candidates finished now go to each utterance's list, best first, while it has room.
        slot = count[:, None] + torch.cumsum(finished, dim=1) - 1
        slot = torch.where(finished & (slot < most), slot, size)
        done[utterance, slot] = tokens[source]
        done_scores[utterance, slot] = sums
        count = torch.clamp(count + finished.sum(dim=1), max=most)
        # The kept proposals become the beams: rows gathered (tokens and self-attention caches);
        # a waiting utterance keeps its rows.
        chosen = torch.where(live[:, None], source.gather(1, kept), rows + torch.arange(k, device=device))
        chosen = chosen.reshape(-1)  # (B k,)
        tokens = tokens[chosen]
        written = proposed.gather(1, kept).reshape(-1)
        tokens[:, c] = torch.where(live.repeat_interleave(k), written, tokens[:, c])
        scores = torch.where(live[:, None], sums.gather(1, kept), scores.reshape(batch, k)).reshape(-1)
        for layer in cache["layers"]:
            layer["attn"] = _rows(layer["attn"], chosen)
        searching = (c + 1 - real < limit) & (count < most)  # (B,) utterances neither done nor out of room
        if (c + 1 - low) % every == 0 and not bool(searching.any()):
            break
        fed, cache = model.decoder(tokens[:, c : c + 1], xa, cache)
        logits = torch.where(at >= 0, fed[:, -1], logits)  # still before its last prompt token: the first logits

    # Too few finished: the remaining beams, best first, until an utterance has k candidates.
    best = torch.sort(scores.reshape(batch, k), dim=1, descending=True, stable=True).indices  # (B, k)
    fill = torch.arange(k, device=device)[None, :] + count[:, None]  # the slot each beam would take
    fill = torch.where(fill < k, fill, size)
    done[utterance, fill] = tokens.reshape(batch, k, length).gather(1, best[..., None].expand(-1, -1, length))
    done_scores[utterance, fill] = scores.reshape(batch, k).gather(1, best)
    pool, pool_scores = done[:, :size], done_scores[:, :size]
    # Rank by the sum over the length penalty; the first best wins.
    ends = sampled(pool, real[:, None]) == eot  # (B, size, max_new)
    lengths = torch.where(ends.any(dim=-1), ends.int().argmax(dim=-1), limit[:, None]).float()
    penalty = lengths if beam.length_penalty is None else ((5 + lengths) / 6) ** beam.length_penalty
    ranked = torch.where(torch.isfinite(pool_scores), pool_scores / penalty, -torch.inf)
    pick = ranked.argmax(dim=1)
    return pool[torch.arange(batch), pick], pool_scores[torch.arange(batch), pick], no_speech
