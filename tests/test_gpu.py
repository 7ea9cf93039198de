"""On a CUDA GPU: the cuDNN flash-attention path against the float32 XLA path (`-m gpu`).

Left out of the default run (the `gpu` marker; CI has no GPU): `python -m pytest -m gpu` on a
machine with one. cuDNN needs bfloat16/float16 inputs, so each case compares it with the XLA
path on the same inputs upcast to float32, to bfloat16's precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_pair, random_batch, tiny_config
from flax import nnx

import flax_whisper.kernel as fk
from flax_whisper import greedy_decode
from flax_whisper.decoding import decode_with_scores
from whisper_io import decoding_options, tokenizer_for
from whisper_io.decoding import steps_per_check

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_a_gpu():
    assert jax.default_backend() == "gpu", "the gpu tests run on a CUDA GPU (python -m pytest -m gpu)"


def qkv(t: int, s: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, n, 4, 64)), jnp.bfloat16) for n in (t, s, s)]


@pytest.mark.parametrize(
    "mask",
    [
        fk.Mask(),
        fk.Mask(causal=True),
        fk.Mask(causal=True, window=16),
        fk.Mask(window=16),
        fk.Mask(prefix=8),
        fk.Mask(causal=True, prefix=8),
    ],
    ids=["full", "causal", "left_window", "symmetric_band", "memory_slots", "memory_slots_causal"],
)
def test_cudnn_matches_float32_xla(mask):
    q, k, v = qkv(128, 128 + mask.prefix)
    fast = fk.attend(q, k, v, mask, scale=0.125, implementation="cudnn")
    exact = fk.attend(*(x.astype(jnp.float32) for x in (q, k, v)), mask, scale=0.125, implementation="einsum")
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(exact), atol=2e-2)


@pytest.mark.parametrize("mask", [fk.Mask(causal=True, prefix=8), fk.Mask(window=16)], ids=["memory_slots", "band"])
def test_cudnn_gradients_of_masks_it_takes_as_causal_ones(mask):
    """The decoder's memory slots (a prefix before causal keys) and the encoder's symmetric band
    reach cuDNN as causal masks over queries moved behind zero rows: every gradient against the
    float32 materialised softmax's."""
    q, k, v = qkv(128, 128 + mask.prefix, seed=3)
    assert fk.choose("auto", q, 128 + mask.prefix, mask, 0, None) == "cudnn"

    def grads(implementation, *args):
        def loss(*a):
            y = fk.attend(*a, mask, scale=0.125, implementation=implementation)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    fast = grads("cudnn", q, k, v)
    exact = grads("einsum", *(x.astype(jnp.float32) for x in (q, k, v)))
    for got, want in zip(fast, exact, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2, rtol=5e-2)


def test_cudnn_log_sum_exp_of_memory_slots():
    """The encoder's memory slots (a prefix, nothing masked) go through cuDNN, whose log-sum-exp
    (the slot weights of memory write-back) comes back in bfloat16."""
    q, k, v = qkv(128, 136, seed=2)
    mask = fk.Mask(prefix=8)
    assert fk.choose("auto", q, 136, mask, 0, None) == "cudnn"
    _, fast = fk.attend(q, k, v, mask, scale=0.125, return_lse=True)
    _, exact = fk.attend(*(x.astype(jnp.float32) for x in (q, k, v)), mask, scale=0.125, implementation="xla",
                         return_lse=True)  # fmt: skip
    assert fast.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fast), np.asarray(exact), atol=5e-2)


def test_cudnn_decoding_step_uses_key_lengths():
    """One query after 40 cached positions in a cache of 64: valid key lengths, not is_causal.
    (`auto` takes XLA for one query; cuDNN still serves such a step when asked for.)"""
    q, k, v = qkv(1, 64, seed=1)
    offset = jnp.int32(40)
    assert fk.choose("auto", q, 64, fk.Mask(causal=True), offset, None) == "xla"
    step = jax.jit(lambda o: fk.attend(q, k, v, fk.Mask(causal=True), scale=0.125, offset=o, implementation="cudnn"))
    fast = step(offset)
    exact = fk.attend(
        *(x.astype(jnp.float32) for x in (q, k, v)), fk.Mask(causal=True), scale=0.125, offset=40, implementation="xla"
    )
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(exact), atol=2e-2)


def test_a_bfloat16_model_on_cudnn_matches_float32():
    config = tiny_config(n_audio_state=128, n_text_state=128, n_audio_head=2, n_text_head=2)
    _, f = make_pair(config)
    mel, labels = random_batch(config, 4, 32, 12)
    loss = nnx.jit(lambda m, x, y: m.loss(x, y))
    half = float(loss(f, jnp.asarray(mel, jnp.bfloat16), jnp.asarray(labels)))
    full = float(loss(f, jnp.asarray(mel), jnp.asarray(labels)))
    assert abs(half - full) <= 2e-3 * full


def test_greedy_decoding_in_bfloat16_picks_a_float32_best_first_token():
    """The bf16 greedy token is float32's best up to the logits' bf16 error: its float32 logit is
    within twice the largest |bf16 - float32| logit difference of the float32 choice's (a random
    model has near ties, so the two argmaxes may differ; both see the same suppressed tokens)."""
    config = tiny_config(n_vocab=51865, decoder_start_token_id=None)
    _, f = make_pair(config)
    prompt, options = decoding_options(tokenizer_for(config), config, language="en", max_new_tokens=4)
    mel = np.random.default_rng(0).standard_normal((2, config.n_mels, 32)).astype(np.float32)
    prompts = np.tile(prompt, (2, 1))
    full = np.asarray(greedy_decode(f, mel, prompts, options))[:, len(prompt)]
    half = np.asarray(greedy_decode(f, jnp.asarray(mel, jnp.bfloat16), prompts, options))[:, len(prompt)]
    last = nnx.jit(lambda m, x, t: m(x, t)[:, -1, : config.n_vocab].astype(jnp.float32))
    full_logits = np.asarray(last(f, jnp.asarray(mel), jnp.asarray(prompts)), np.float64)
    half_logits = np.asarray(last(f, jnp.asarray(mel, jnp.bfloat16), jnp.asarray(prompts)), np.float64)
    error = np.abs(full_logits - half_logits).max()
    assert error < 0.15 * full_logits.std(), "bf16 logits far from float32"
    rows = np.arange(2)
    assert (full_logits[rows, half] >= full_logits[rows, full] - 2 * error).all()


def test_gpu_decoding_checks_for_the_end_every_few_steps_with_the_same_tokens():
    """On a GPU the decoding loop checks that every row has finished every few steps (its runtime
    waits for the device at each check); the tokens and sums are those of checking every step."""
    assert steps_per_check(jax.default_backend()) > 1
    config = tiny_config(n_vocab=51865, decoder_start_token_id=None)
    _, f = make_pair(config)
    prompt, options = decoding_options(tokenizer_for(config), config, language="en", max_new_tokens=9)
    mel = np.random.default_rng(0).standard_normal((3, config.n_mels, 32)).astype(np.float32)
    prompts, lengths = np.tile(prompt, (3, 1)), [2, 3, len(prompt)]
    default = decode_with_scores(f, mel, prompts, options, prompt_length=lengths)
    each = decode_with_scores(f, mel, prompts, options, prompt_length=lengths, check_every=1)
    np.testing.assert_array_equal(np.asarray(default[0]), np.asarray(each[0]))
    np.testing.assert_allclose(np.asarray(default[1]), np.asarray(each[1]), rtol=1e-6)


def test_decoding_one_row_gives_that_row_of_a_batch():
    """At batch 1 a decoding step's norms have one row, which the GPU path pads with a row of
    zeros (`layers._normalize_forward`): greedy decoding of one utterance gives its tokens and
    sum of log-probabilities in a batch of two (float32 products at full precision)."""
    config = tiny_config(n_vocab=51865, decoder_start_token_id=None)
    _, f = make_pair(config)
    prompt, options = decoding_options(tokenizer_for(config), config, language="en", max_new_tokens=9)
    mel = np.random.default_rng(1).standard_normal((2, config.n_mels, 32)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        alone = decode_with_scores(f, mel[:1], np.asarray([prompt]), options)
        both = decode_with_scores(f, mel, np.tile(prompt, (2, 1)), options)
    np.testing.assert_array_equal(np.asarray(alone[0])[0], np.asarray(both[0])[0])
    np.testing.assert_allclose(np.asarray(alone[1])[0], np.asarray(both[1])[0], rtol=1e-4, atol=1e-4)
