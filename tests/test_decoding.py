"""Greedy decoding: OpenAI's `whisper.decoding.decode` as the oracle, flax vs torch on every
variant, and one compile per shape."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from conftest import SAMPLE_LEN, SETTING_COVER, counting_compiles, openai_greedy, variant_params

import flax_whisper.decoding as flax_decoding
import torch_ref.decoding as torch_decoding
from convert import load_checkpoint, load_flax_model, load_torch_model
from whisper_config import InputError
from whisper_io import DecodingOptions, decoding_options, text_tokens, tokenizer_for
from whisper_io.decoding import BeamSearch


@pytest.fixture(scope="module")
def decoding_setup(decoding_checkpoint):
    """The decoding oracle's OpenAI model and checkpoint, loaded into both frameworks."""
    model, path, mel = decoding_checkpoint
    flax_model = load_flax_model(path)
    flax_model.eval()
    return model, path, mel, flax_model, load_torch_model(path).eval()


def decode_both(flax_model, torch_model, mel, prompt, options):
    """("flax" | "torch", tokens (B, P + max_new)) of greedy decoding `mel` after `prompt` in each framework."""
    prompts = np.tile(prompt, (len(mel), 1))
    for name, decode, model in [
        ("flax", flax_decoding.greedy_decode, flax_model),
        ("torch", torch_decoding.greedy_decode, torch_model),
    ]:
        yield name, np.asarray(decode(model, mel, prompts, options))


@pytest.mark.parametrize("language", ["en", None], ids=["english", "detected"])
def test_greedy_tokens_match_openai(decoding_setup, language):
    model, path, mel, flax_model, torch_model = decoding_setup
    config = load_checkpoint(path).config
    tokenizer = tokenizer_for(config)
    expected = openai_greedy(model, mel, language)
    prompt, options = decoding_options(tokenizer, config, language, max_new_tokens=SAMPLE_LEN)
    for name, tokens in decode_both(flax_model, torch_model, mel, prompt, options):
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


@pytest.fixture(scope="module")
def timestamp_setup(tmp_path_factory):
    """A random OpenAI model that samples timestamps as well as text: each timestamp's embedding
    row is 0.8 times the row of one of three tokens the model favours, plus noise, so that the
    timestamps' summed probability often beats the best text token's."""
    from conftest import favour_timestamps, random_openai_model, save_openai_model

    model = random_openai_model(noise=1.0, seed=0)
    mel = np.random.default_rng(0).standard_normal((4, 80, 2 * model.dims.n_audio_ctx)).astype(np.float32)
    favour_timestamps(model, [18979, 4767, 6765], tokenizer_for(load_config_of(model)).timestamp_begin)
    path = save_openai_model(model, tmp_path_factory.mktemp("timestamps") / "random.pt")
    flax_model = load_flax_model(path)
    flax_model.eval()
    return model, path, mel, flax_model, load_torch_model(path).eval()


def load_config_of(model):
    from whisper_config import ModelConfig

    return ModelConfig.from_openai_dims(vars(model.dims))


@pytest.mark.parametrize("language", ["en", None], ids=["english", "detected"])
def test_timestamp_tokens_match_openai(timestamp_setup, language):
    """OpenAI's timestamp rules (pairs, monotonic, max initial timestamp, the timestamp-vs-text
    probability rule) in both frameworks: the tokens of `decode(without_timestamps=False)`."""
    import whisper

    model, path, mel, flax_model, torch_model = timestamp_setup
    config = load_checkpoint(path).config
    tokenizer = tokenizer_for(config)
    sample_len = 12
    oracle = whisper.DecodingOptions(
        language=language, without_timestamps=False, fp16=False, temperature=0.0, sample_len=sample_len
    )
    expected = whisper.decoding.decode(model, torch.from_numpy(mel), oracle)
    prompt, options = decoding_options(tokenizer, config, language, max_new_tokens=sample_len, timestamps=True)
    assert tokenizer.no_timestamps not in prompt
    for name, tokens in decode_both(flax_model, torch_model, mel, prompt, options):
        assert text_tokens(tokens, len(prompt), tokenizer.eot) == [r.tokens for r in expected], name
    # Not degenerate: rows differ, each mixes timestamps (several, some in pairs) with text, and
    # the rules show: a first timestamp within max_initial_timestamp, none ever decreasing.
    begin = tokenizer.timestamp_begin
    stamps = [[t for t in r.tokens if t >= begin] for r in expected]
    assert len({tuple(r.tokens) for r in expected}) == len(expected)
    assert all(len(s) >= 3 and len(s) < len(r.tokens) for s, r in zip(stamps, expected, strict=True))
    assert all(begin <= r.tokens[0] <= begin + options.max_initial_timestamp_index for r in expected)
    assert all(s == sorted(s) for s in stamps)


def test_a_vocabulary_without_timestamps_says_so():
    from whisper_config import ModelConfig
    from whisper_io import TokenizerError

    config = ModelConfig(n_vocab=258, decoder_start_token_id=257)
    with pytest.raises(TokenizerError, match="the bytes vocabulary has no timestamp tokens"):
        decoding_options(tokenizer_for(config), config, timestamps=True)


@pytest.mark.parametrize("patience", [1.0, 2.0])
@pytest.mark.parametrize(
    "setup, timestamps", [("decoding_setup", False), ("timestamp_setup", True)], ids=["text", "timestamps"]
)
def test_beam_search_matches_openai(request, setup, timestamps, patience):
    """Beam 5, patience 1 and 2: the chosen tokens and their sums of log-probabilities of
    `whisper.decoding.decode`, in both frameworks, text only and with timestamps."""
    import whisper

    model, path, mel, flax_model, torch_model = request.getfixturevalue(setup)
    config = load_checkpoint(path).config
    tokenizer = tokenizer_for(config)
    sample_len = 12 if timestamps else SAMPLE_LEN
    oracle = whisper.DecodingOptions(
        language="en", beam_size=5, patience=patience, without_timestamps=not timestamps, fp16=False,
        temperature=0.0, sample_len=sample_len,
    )  # fmt: skip
    # openai-whisper 20250625 cannot beam-search a batch of several utterances: one at a time.
    expected = [whisper.decoding.decode(model, torch.from_numpy(mel[i : i + 1]), oracle)[0] for i in range(len(mel))]
    prompt, options = decoding_options(tokenizer, config, "en", max_new_tokens=sample_len, timestamps=timestamps)
    prompts, beam = np.tile(prompt, (len(mel), 1)), BeamSearch(5, patience)
    for name, (tokens, sums, no_speech) in [
        ("flax", flax_decoding.beam_search_decode(flax_model, mel, prompts, options, beam)),
        ("torch", torch_decoding.beam_search_decode(torch_model, mel, prompts, options, beam)),
    ]:
        assert text_tokens(np.asarray(tokens), len(prompt), tokenizer.eot) == [r.tokens for r in expected], name
        oracle_sums = [r.avg_logprob * (len(r.tokens) + 1) for r in expected]
        np.testing.assert_allclose(np.asarray(sums), oracle_sums, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(np.asarray(no_speech), [r.no_speech_prob for r in expected], rtol=1e-4, atol=1e-7)
    # Not degenerate: the search chose other sequences than greedy decoding for some rows.
    greedy = flax_decoding.greedy_decode(flax_model, mel, prompts, options)
    assert text_tokens(np.asarray(greedy), len(prompt), tokenizer.eot) != [r.tokens for r in expected]
    if not timestamps:
        assert min(len(r.tokens) for r in expected) < sample_len  # some candidates ended early


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_flax_decoding_compiles_once_per_shape(decoding_setup, search):
    _, _, mel, flax_model, _ = decoding_setup
    tokenizer = tokenizer_for(flax_model.config)
    prompt, options = decoding_options(tokenizer, flax_model.config, "en", max_new_tokens=4)
    prompts = np.tile(prompt, (2, 1))
    if search == "beam":
        decode = functools.partial(flax_decoding.beam_search_decode, beam=BeamSearch(5, 2.0))
    else:
        decode = flax_decoding.greedy_decode
    decode(flax_model, mel[:2], prompts, options)  # compiles
    with counting_compiles() as compiles:
        second = decode(flax_model, mel[2:], prompts, options)
        jax.block_until_ready(second)
        assert compiles == [], f"{len(compiles)} compilations for a batch of an already compiled shape"
        shorter = dataclasses.replace(options, max_new_tokens=3)
        decode(flax_model, mel[2:], prompts, shorter)
        assert len(compiles) >= 1  # the listener does see compilations


@pytest.mark.parametrize("variant", variant_params(SETTING_COVER), indirect=True)
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


@pytest.mark.slow  # greedy decoding keeps this check in the main suite (tests/test_kv_cache.py)
def test_beam_search_with_each_layer_on_its_own_equals_the_layer_scan():
    """`decode_unroll` (each layer's weights and caches copied out of the stack once, the layers
    one after another) gives the scan's candidates, sums and no-speech probabilities with beams,
    whose reordering of the self-attention caches takes each layout's own path, on `integrated`
    (dynamic convolution, hybrid and memory caches). Greedy decoding in the default layout meets
    torch on every variant (`test_decoding_parity_on_every_variant`)."""
    from conftest import make_pair, tiny_config

    config = tiny_config("integrated")
    rng = np.random.default_rng(5)
    mel = rng.standard_normal((2, config.n_mels, 2 * config.n_audio_ctx)).astype(np.float32)
    prompt = np.tile([config.start_token_id, 5, 7], (2, 1))
    options = DecodingOptions(3, 6, suppress_tokens=(0, 1))
    results = []
    for unroll in (False, True):
        _, model = make_pair(dataclasses.replace(config, decode_unroll=unroll), seed=11)
        results.append(flax_decoding.beam_search_decode(model, mel, prompt, options, BeamSearch(3, 1.0)))
    (tokens, sums, no_speech), (unrolled_tokens, unrolled_sums, unrolled_no_speech) = results
    np.testing.assert_array_equal(np.asarray(unrolled_tokens), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(unrolled_sums), np.asarray(sums), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(unrolled_no_speech), np.asarray(no_speech), rtol=1e-5)


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
    # Sampling needs randomness, and only sampling takes it.
    sampled = DecodingOptions(eot=2, max_new_tokens=2, temperature=0.5)
    with pytest.raises(InputError, match="random key is needed"):
        flax_decoding.decode_with_scores(flax_model, mel, [[1, 3]], sampled)
    with pytest.raises(InputError, match="random key is needed"):
        flax_decoding.decode_with_scores(flax_model, mel, [[1, 3]], dataclasses.replace(sampled, temperature=0.0),
                                         jax.random.key(0))  # fmt: skip
    with pytest.raises(InputError, match="random generator is needed"):
        torch_decoding.decode_with_scores(torch_model, mel, [[1, 3]], sampled)
    with pytest.raises(InputError, match="greedy_decode takes the arg-max"):
        flax_decoding.greedy_decode(flax_model, mel, [[1, 3]], sampled)
    with pytest.raises(InputError, match="temperature must be >= 0"):
        DecodingOptions(eot=2, max_new_tokens=2, temperature=-1.0)


@pytest.mark.parametrize("search", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])  # beam: 10 s
def test_a_padded_prompt_decodes_as_the_prompt_alone(decoding_setup, search):
    """A prompt padded to a wider array (`prompt_length` real tokens) gives the tokens and scores
    of the prompt alone, in both frameworks; with a previous text long enough to leave less room
    than `max_new_tokens`, decoding stops where the context is full (as OpenAI's loop does)."""
    _, _, mel, flax_model, torch_model = decoding_setup
    config = flax_model.config
    tokenizer = tokenizer_for(config)
    width = config.n_text_ctx // 2 + 3  # <|startofprev|>, 7 previous tokens, sot, language, task
    beam = BeamSearch(3) if search == "beam" else None
    for previous, room in [(list(range(220, 223)), 8), (list(range(220, 240)), 6)]:
        prompt, options = decoding_options(tokenizer, config, "en", timestamps=True, previous=previous)
        assert options.max_new_tokens == room  # 16 positions: 8 sampled at most, or what is left
        padded = np.full((len(mel), width), 50000, np.int32)  # any ids: they are never attended
        padded[:, : len(prompt)] = prompt
        most = dataclasses.replace(options, max_new_tokens=8)
        for module, model in [(flax_decoding, flax_model), (torch_decoding, torch_model)]:
            if beam is None:
                alone = module.decode_with_scores(model, mel, np.tile(prompt, (len(mel), 1)), options)
                padded_run = module.decode_with_scores(model, mel, padded, most, prompt_length=len(prompt))
            else:
                alone = module.beam_search_decode(model, mel, np.tile(prompt, (len(mel), 1)), options, beam)
                padded_run = module.beam_search_decode(model, mel, padded, most, beam, prompt_length=len(prompt))
            assert text_tokens(np.asarray(padded_run[0]), len(prompt), tokenizer.eot) == text_tokens(
                np.asarray(alone[0]), len(prompt), tokenizer.eot
            ), module.__name__
            np.testing.assert_allclose(np.asarray(padded_run[1]), np.asarray(alone[1]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(padded_run[2]), np.asarray(alone[2]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "search", ["greedy", pytest.param("beam", marks=pytest.mark.slow), "beam-patience-0.5"]
)  # plain beam search on its own budget: patience 0.5, where utterances stop apart, covers it
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_rows_of_different_prompt_lengths_decode_together_as_each_alone(decoding_setup, framework, search):
    """Rows whose prompts (previous texts of 0, 3 and 20 tokens, timestamps) have different
    lengths, padded to one width and decoded in one call with a length per row, give each row's
    tokens, sum log-probability and no-speech probability of that row decoded alone: greedy, and
    beam search (with patience 0.5 an utterance holding its candidates stops while others go on)."""
    _, _, mel, flax_model, torch_model = decoding_setup
    module, model = (flax_decoding, flax_model) if framework == "flax" else (torch_decoding, torch_model)
    beam = {"greedy": None, "beam": BeamSearch(3), "beam-patience-0.5": BeamSearch(5, 0.5)}[search]

    def decode(mels, prompts, options, prompt_length):
        if beam is None:
            return module.decode_with_scores(model, mels, prompts, options, prompt_length=prompt_length)
        return module.beam_search_decode(model, mels, prompts, options, beam, prompt_length=prompt_length)

    config = flax_model.config
    tokenizer = tokenizer_for(config)
    width = config.n_text_ctx // 2 + 3
    rows, lengths = [], []
    for previous in ([], list(range(220, 223)), list(range(220, 240))):
        prompt, options = decoding_options(tokenizer, config, "en", timestamps=True, previous=previous)
        padded = np.full(width, tokenizer.eot, np.int32)
        padded[: len(prompt)] = prompt
        rows.append(padded)
        lengths.append(len(prompt))
    options = dataclasses.replace(options, max_new_tokens=8)
    batch = np.stack(rows)
    mels = np.concatenate([mel, mel])[: len(rows)]
    together = decode(mels, batch, options, lengths)
    assert len(set(lengths)) == 3
    for r, n in enumerate(lengths):
        alone = decode(mels[r : r + 1], batch[r : r + 1], options, n)
        got = text_tokens(np.asarray(together[0])[r : r + 1], n, tokenizer.eot)
        assert got == text_tokens(np.asarray(alone[0]), n, tokenizer.eot) and len(got[0]) > 0
        # A sum of 8 float32 log-probabilities over a 51,865-row vocabulary, from products of
        # another batch shape (3 rows, or 9 beams, against 1 or 3), which BLAS blocks and so rounds
        # differently: torch's beam search came 4.4e-5 apart (5.6e-5 relative) on one CI machine.
        np.testing.assert_allclose(np.asarray(together[1])[r], np.asarray(alone[1])[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(together[2])[r], np.asarray(alone[2])[0], rtol=1e-5, atol=1e-8)
    with pytest.raises(InputError, match="one per row"):
        decode(mels, batch, options, lengths[:2])


@pytest.mark.parametrize("search", ["greedy", "sampled", "beam-patience-0.5"])
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_checking_for_the_end_every_few_steps_changes_nothing(decoding_setup, framework, search):
    """Checking that every row has finished only every few steps (a GPU checks every 8) gives
    the tokens, sums and no-speech probabilities of checking at every step. The rows' prompts
    differ in length. On one audio pair a row fills the prompt array and samples up to its last
    column, so the steps after the last check write past the buffer's end (where the index is
    clamped); on the other every row ends early, so steps run after the end. torch checks at
    every step when sampling: its generator ends in the same state too."""
    _, _, mel, flax_model, torch_model = decoding_setup
    module, model = (flax_decoding, flax_model) if framework == "flax" else (torch_decoding, torch_model)
    beam = BeamSearch(5, 0.5) if search.startswith("beam") else None
    tokenizer = tokenizer_for(flax_model.config)
    prompt, options = decoding_options(tokenizer, flax_model.config, "en", max_new_tokens=6)
    if search == "sampled":
        options = dataclasses.replace(options, temperature=1.0)
    lengths = [2, len(prompt)]  # the second row's prompt fills the array; the first's is its start
    prompts = np.tile(prompt, (2, 1))
    steps = len(prompt) + options.max_new_tokens - 1 - min(lengths)  # the loop's steps at most
    every = next(n for n in (4, 5, 7) if steps % n)  # the last block of steps overshoots

    def decode(mels, every, generators):
        if beam is not None:
            return module.beam_search_decode(model, mels, prompts, options, beam, lengths, check_every=every)
        key = None
        if search == "sampled":
            key = jax.random.key(0) if framework == "flax" else torch.Generator().manual_seed(0)
            generators.append(key)
        return module.decode_with_scores(model, mels, prompts, options, key, lengths, check_every=every)

    new = options.max_new_tokens
    ends = []  # per pair, each row's samples before its end of text
    for rows in ([0, 2], [0, 1]):  # audio whose full row samples 6 tokens; audio whose rows end early
        generators = []
        each, few = decode(mel[rows], 1, generators), decode(mel[rows], every, generators)
        np.testing.assert_array_equal(np.asarray(few[0]), np.asarray(each[0]))
        np.testing.assert_allclose(np.asarray(few[1]), np.asarray(each[1]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(few[2]), np.asarray(each[2]), rtol=1e-6, atol=1e-9)
        if framework == "torch" and search == "sampled":
            assert torch.equal(generators[0].get_state(), generators[1].get_state())
        samples = [
            [*row[n : n + new], tokenizer.eot] for row, n in zip(np.asarray(each[0]).tolist(), lengths, strict=True)
        ]
        ends.append([row.index(tokenizer.eot) for row in samples])
    if beam is None:  # both cases happen (a beam search's own rows run on unless enough candidates end)
        assert ends[0][-1] == new and max(ends[1]) < new - 1, ends
    with pytest.raises(InputError, match="check_every must be a positive integer"):
        decode(mel[:2], 0, [])


def test_bfloat16_decoding_with_the_gpus_kernel_layout_picks_the_same_tokens(monkeypatch):
    """Greedy decoding in bfloat16 runs on a copy of the decoder whose weights were cast once
    (`TextDecoder.for_decoding`); with its kernels laid out `(out, in)` and its caches
    sequence-major, as on a GPU (forced here), the jitted loop picks the tokens it picks in this
    CPU's layout, with the same sums of log-probabilities (integrated: every mechanism's cache)."""
    from conftest import make_pair, tiny_config, use_kv_layout

    from flax_whisper import layers

    config = tiny_config("integrated")
    _, model = make_pair(config, seed=1)
    mel = np.random.default_rng(1).standard_normal((3, config.n_mels, 2 * config.n_audio_ctx)).astype(np.float32)
    mel = jax.numpy.asarray(mel, jax.numpy.bfloat16)
    prompt = np.tile([config.start_token_id, 5, 7], (3, 1))
    options = DecodingOptions(3, 7, suppress_tokens=(0, 1))
    jitted = flax_decoding._greedy_decode_jit
    jitted.clear_cache()  # programs traced in the other layout stay out of this test and the next
    tokens, sums, _ = flax_decoding.decode_with_scores(model, mel, prompt, options)
    jitted.clear_cache()
    use_kv_layout(monkeypatch, "bshd")
    monkeypatch.setattr(layers, "transposes_decoding_kernels", lambda: True)
    try:
        gpu_tokens, gpu_sums, _ = flax_decoding.decode_with_scores(model, mel, prompt, options)
    finally:
        jitted.clear_cache()
    np.testing.assert_array_equal(np.asarray(gpu_tokens), np.asarray(tokens))
    assert len(set(map(tuple, np.asarray(tokens)[:, 3:]))) == 3  # not degenerate: three different continuations
    np.testing.assert_allclose(np.asarray(gpu_sums), np.asarray(sums), rtol=2e-2)
