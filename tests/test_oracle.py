"""Both frameworks against the float64 NumPy oracle (`tests/reference`), written from the model
contract alone: agreement between torch and flax could hide a misreading both share; this
cannot. Per module <= 1e-5 and per model <= 1e-4, relative to the largest float64 value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SETTING_COVER, make_pair, random_batch, tiny_config, variant_config, variant_params
from flax import nnx
from reference.numpy_whisper import IGNORE, Oracle

import flax_whisper.attention
from convert.core import flax_to_torch, torch_to_numpy
from flax_whisper.blocks import layer

MODULE_RTOL, MODEL_RTOL = 1e-5, 1e-4


def assert_relative(ours, oracle, rtol: float, what: str) -> None:
    ours, oracle = np.asarray(ours, np.float64), np.asarray(oracle, np.float64)
    assert ours.shape == oracle.shape, f"{what}: shape {ours.shape} vs {oracle.shape}"
    error = float(np.max(np.abs(ours - oracle)) / np.max(np.abs(oracle)))
    assert error <= rtol, f"{what}: {error:.2e} relative to the oracle (> {rtol:.0e})"


# Every variant against the oracle under slow; the main suite, the variants that give every setting
# each of its values (conftest.SETTING_COVER).
@pytest.fixture(scope="module", params=variant_params(SETTING_COVER))
def case(request):
    config = variant_config(request.param)
    t, f = make_pair(config, seed=31)
    return config, t, f, Oracle(config, torch_to_numpy(t))


def states(config, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, length, config.n_audio_state)).astype(np.float32)


def test_self_attention_and_blocks(case):
    """Each side's self-attention mechanism (rotary where the variant has it; the decoder's
    causal), then a whole block of each side, on the same input."""
    config, t, f, oracle = case
    x, xa = states(config, 9, 0), states(config, 7, 1)
    for side, causal in (("encoder", False), ("decoder", True)):
        kind = config.decoder_attention if causal else config.encoder_attention
        n_head = config.n_text_head if causal else config.n_audio_head
        rotary = config.decoder_rotary if causal else config.encoder_rotary
        expected = oracle.attention(f"{side}.blocks.0.attn", x.astype(np.float64), kind, n_head, causal, rotary)
        with torch.no_grad():
            torch_y, _ = getattr(t, side).blocks[0].attn(torch.from_numpy(x), causal=causal)
        flax_y, _ = layer(getattr(f, side).blocks, 0).attn(jnp.asarray(x), causal=causal)
        assert_relative(torch_y.numpy(), expected, MODULE_RTOL, f"torch {side} {kind}")
        assert_relative(flax_y, expected, MODULE_RTOL, f"flax {side} {kind}")
    expected = oracle.block("decoder.blocks.1", x.astype(np.float64), xa.astype(np.float64))
    with torch.no_grad():
        torch_y, _ = t.decoder.blocks[1](torch.from_numpy(x), torch.from_numpy(xa), causal=True)
    flax_y, _ = layer(f.decoder.blocks, 1)(jnp.asarray(x), jnp.asarray(xa), causal=True)
    assert_relative(torch_y.numpy(), expected, MODULE_RTOL, "torch decoder block")
    assert_relative(flax_y, expected, MODULE_RTOL, "flax decoder block")


def test_whole_model_logits_and_loss(case):
    config, t, f, oracle = case
    mel, tokens = random_batch(config, 2, 2 * config.n_audio_ctx - 3, config.n_text_ctx, seed=2)
    expected = oracle.logits(mel, tokens)
    with torch.no_grad():
        torch_logits = t(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
    flax_logits = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(f, jnp.asarray(mel), jnp.asarray(tokens)))
    assert_relative(torch_logits, expected, MODEL_RTOL, "torch logits")
    assert_relative(flax_logits, expected, MODEL_RTOL, "flax logits")
    labels = tokens.copy()
    labels[1, 5:] = IGNORE
    loss = oracle.loss(mel, labels)
    with torch.no_grad():
        assert abs(t.loss(torch.from_numpy(mel), torch.from_numpy(labels)).item() - loss) <= MODEL_RTOL * loss
    assert abs(float(f.loss(jnp.asarray(mel), jnp.asarray(labels))) - loss) <= MODEL_RTOL * loss


def test_incremental_decoding_with_the_cache(case):
    """Token by token through each framework's KV cache (the dynamic convolution's past rows,
    memory slots written once, rotary at the true positions): each step's logits are the
    oracle's full causal forward at that position."""
    config, t, f, oracle = case
    mel, tokens = random_batch(config, 2, 20, 6, seed=3)
    xa_t = t.encoder(torch.from_numpy(mel))
    expected = oracle.decoder(tokens, xa_t.detach().numpy().astype(np.float64))
    xa_f = f.encoder(jnp.asarray(mel))
    cache_t, cache_f = t.decoder.init_cache(xa_t), f.decoder.init_cache(xa_f)
    step = nnx.jit(lambda m, tok, xa, cache: m.decoder(tok, xa, cache))
    for i in range(tokens.shape[1]):
        with torch.no_grad():
            torch_logits, cache_t = t.decoder(torch.from_numpy(tokens[:, i : i + 1]), xa_t, cache_t)
        flax_logits, cache_f = step(f, jnp.asarray(tokens[:, i : i + 1]), xa_f, cache_f)
        assert_relative(torch_logits.numpy()[:, 0], expected[:, i], MODEL_RTOL, f"torch step {i}")
        assert_relative(np.asarray(flax_logits)[:, 0], expected[:, i], MODEL_RTOL, f"flax step {i}")


@pytest.mark.parametrize("attention", ["memory", "integrated"])
def test_memory_state_after_training_steps_with_padding(attention):
    """Three training-mode forward passes over batches with padded (ignored) label positions:
    after each, every layer's memory_state is the oracle's revision-2 write-back (the module's
    output, padding counting nowhere), read again by the next pass."""
    config = tiny_config(
        "rotary_rotary_sinusoidal", encoder_attention=attention, decoder_attention=attention, memory_update=True
    )
    t, f = make_pair(config, seed=32)
    oracle = Oracle(config, torch_to_numpy(t))
    t.train()
    f.train()
    loss_f = nnx.jit(lambda m, mel, labels: m.loss(mel, labels))
    for step in range(3):
        mel, labels = random_batch(config, 3, 20, 8, seed=10 + step)
        labels[0, 3:] = IGNORE
        labels[2, 6:] = IGNORE
        oracle.loss(mel, labels, train=True)
        for prefix, state in oracle.written.items():
            oracle.w[f"{prefix}.memory_state"] = state
        with torch.no_grad():
            t.loss(torch.from_numpy(mel), torch.from_numpy(labels))
        loss_f(f, jnp.asarray(mel), jnp.asarray(labels))
        torch_states, flax_states = torch_to_numpy(t), flax_to_torch(f)
        assert len(oracle.written) == config.n_audio_layer + config.n_text_layer
        for prefix in oracle.written:
            key = f"{prefix}.memory_state"
            assert np.abs(oracle.w[key]).max() > 1e-3, f"{key} was not written"
            assert_relative(torch_states[key], oracle.w[key], MODULE_RTOL, f"torch {key} after step {step}")
            assert_relative(flax_states[key], oracle.w[key], MODULE_RTOL, f"flax {key} after step {step}")


def test_padding_changes_the_written_state():
    """The oracle's write-back does depend on which positions are padding (else the test above
    could not tell revision 1 from revision 2)."""
    config = tiny_config("whisper", encoder_attention="memory", decoder_attention="memory", memory_update=True)
    t, _ = make_pair(config, seed=33)
    mel, labels = random_batch(config, 2, 20, 8, seed=4)
    padded = labels.copy()
    padded[0, 4:] = IGNORE
    written = []
    for batch_labels in (labels, padded):
        oracle = Oracle(config, torch_to_numpy(t))
        oracle.loss(mel, batch_labels, train=True)
        written.append(oracle.written["decoder.blocks.0.attn"])
    assert np.abs(written[0] - written[1]).max() > 1e-3


def test_a_wrong_mechanism_fails_the_oracle(monkeypatch):
    """The comparison can fail: flax's biased attention with the content bias added to the keys
    instead of the queries (a plausible misreading) is caught, while torch and flax, wrong alike,
    would have agreed with each other."""
    config = tiny_config("whisper", encoder_attention="biased", decoder_attention="biased")
    t, f = make_pair(config, seed=34)
    oracle = Oracle(config, torch_to_numpy(t))
    x = states(config, 9, 5)
    expected = oracle.attention(
        "encoder.blocks.0.attn", x.astype(np.float64), "biased", config.n_audio_head, False, False
    )
    attn = layer(f.encoder.blocks, 0).attn
    right, _ = attn(jnp.asarray(x))
    assert_relative(right, expected, MODULE_RTOL, "flax biased")

    original_queries, original_keys = attn.queries, attn.keys_values

    def queries_without_bias(x, positions=None):
        bias = attn.content_bias
        attn.content_bias = None
        try:
            return original_queries(x, positions)
        finally:
            attn.content_bias = bias

    def keys_with_bias(x, positions=None, layout=None, value_bias=True):
        k, v = original_keys(x, positions, layout, value_bias)
        u = attn.content_bias[...]  # (H, dh), onto heads-major or sequence-major keys alike
        shift = u[:, None, :] if (layout or flax_whisper.kernel.kv_layout()) == "bhsd" else u[None, :, :]
        return k + shift.astype(k.dtype), v

    monkeypatch.setattr(attn, "queries", queries_without_bias)
    monkeypatch.setattr(attn, "keys_values", keys_with_bias)
    wrong, _ = attn(jnp.asarray(x))
    with pytest.raises(AssertionError, match="relative to the oracle"):
        assert_relative(wrong, expected, MODULE_RTOL, "flax biased, bias on the keys")
    assert jax.numpy.abs(wrong - right).max() > 1e-3
