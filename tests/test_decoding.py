"""Greedy decoding: OpenAI's `whisper.decoding.decode` as the oracle, flax vs torch on every
variant, and one compile per shape."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import SAMPLE_LEN, openai_greedy

import flax_whisper.decoding as flax_decoding
import torch_ref.decoding as torch_decoding
from convert import load_checkpoint, load_flax_model, load_torch_model
from whisper_config import InputError
from whisper_io import DecodingOptions, decoding_options, text_tokens, tokenizer_for


@pytest.fixture(scope="module")
def decoding_setup(decoding_checkpoint):
    """The decoding oracle's OpenAI model and checkpoint, loaded into both frameworks."""
    model, path, mel = decoding_checkpoint
    flax_model = load_flax_model(path)
    flax_model.eval()
    return model, path, mel, flax_model, load_torch_model(path).eval()


@pytest.mark.parametrize("language", ["en", None], ids=["english", "detected"])
def test_greedy_tokens_match_openai(decoding_setup, language):
    model, path, mel, flax_model, torch_model = decoding_setup
    config = load_checkpoint(path).config
    tokenizer = tokenizer_for(config)
    expected = openai_greedy(model, mel, language)
    prompt, options = decoding_options(tokenizer, config, language, max_new_tokens=SAMPLE_LEN)
    prompts = np.tile(prompt, (len(mel), 1))
    for name, decode, ours in [
        ("flax", flax_decoding.greedy_decode, flax_model),
        ("torch", torch_decoding.greedy_decode, torch_model),
    ]:
        tokens = np.asarray(decode(ours, mel, prompts, options))
        assert text_tokens(tokens, len(prompt), tokenizer.eot) == [r.tokens for r in expected], name
        languages = [tokenizer.language_codes[tokenizer.language_tokens.index(t)] for t in tokens[:, 1]]
        assert languages == [r.language for r in expected], name
        assert [tokenizer.decode(t).strip() for t in text_tokens(tokens, len(prompt), tokenizer.eot)] == [
            r.text for r in expected
        ]
    # The case is not degenerate: rows stop at different lengths, some before the limit.
    lengths = [len(r.tokens) for r in expected]
    assert len(set(lengths)) > 1 and min(lengths) < SAMPLE_LEN
    if language is None:
        assert len({r.language for r in expected}) > 1


def test_flax_decoding_compiles_once_per_shape(decoding_setup):
    _, _, mel, flax_model, _ = decoding_setup
    tokenizer = tokenizer_for(flax_model.config)
    prompt, options = decoding_options(tokenizer, flax_model.config, "en", max_new_tokens=4)
    prompts = np.tile(prompt, (2, 1))
    flax_decoding.greedy_decode(flax_model, mel[:2], prompts, options)  # compiles
    compiles = []

    def count(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        second = flax_decoding.greedy_decode(flax_model, mel[2:], prompts, options)
        jax.block_until_ready(second)
        assert compiles == [], f"{len(compiles)} compilations for a batch of an already compiled shape"
        shorter = dataclasses.replace(options, max_new_tokens=3)
        flax_decoding.greedy_decode(flax_model, mel[2:], prompts, shorter)
        assert len(compiles) >= 1  # the listener does see compilations
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


def test_decoding_parity_on_every_variant(variant_pair):
    """Same tokens from both frameworks on each mechanism and position scheme, via the cache."""
    torch_model, flax_model = variant_pair
    config = flax_model.config
    rng = np.random.default_rng(3)
    mel = rng.standard_normal((3, config.n_mels, 2 * config.n_audio_ctx)).astype(np.float32)
    prompt = np.tile([config.start_token_id, 5, 7], (3, 1))
    # End of text is the token the model picks most often after the prompt, so rows do end.
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(mel), torch.from_numpy(rng.integers(0, config.n_vocab, (3, 8))))
    eot = int(np.bincount(logits.argmax(-1).flatten().numpy()).argmax())
    options = DecodingOptions(eot, config.n_text_ctx - 2, suppress_tokens=(0, 1), blank_tokens=(eot,))
    ours = np.asarray(flax_decoding.greedy_decode(flax_model, mel, prompt, options))
    reference = torch_decoding.greedy_decode(torch_model, mel, prompt, options).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert (ours[:, 3:] != 0).all() and (ours[:, 3:] != 1).all()  # suppressed ids never sampled
    assert (ours[:, 3] != eot).all()  # blank tokens are not sampled first


def test_decoding_rejects_lengths_beyond_the_context(pair):
    torch_model, flax_model = pair
    config = flax_model.config
    mel = np.zeros((1, config.n_mels, 8), np.float32)
    too_many = DecodingOptions(eot=2, max_new_tokens=config.n_text_ctx)  # a 2-token prompt leaves n_text_ctx - 1
    for decode, model in [(flax_decoding.greedy_decode, flax_model), (torch_decoding.greedy_decode, torch_model)]:
        with pytest.raises(InputError, match="at most 11 new tokens"):
            decode(model, mel, [[1, 3]], too_many)
        with pytest.raises(InputError, match="outside the vocabulary"):
            decode(model, mel, [[1, config.n_vocab]], DecodingOptions(eot=2, max_new_tokens=2))
