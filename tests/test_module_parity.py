"""Every module of torch_ref against its flax_whisper mirror, on the same weights, float32.

Weights come from one perturbed torch model converted by `convert`, so these tests also check that
the conversion table puts every tensor where the Flax module reads it. Modules: <= 1e-5 max abs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_whisper.positions
import torch_ref.positions
from flax_whisper.blocks import layer

ATOL = 1e-5
shapes = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**16))
SETTINGS = settings(max_examples=5, deadline=None)


def states(config, batch, length, seed, width=None):
    x = np.random.default_rng(seed).standard_normal((batch, length, width or config.n_audio_state))
    return x.astype(np.float32)


def run_torch(module, *args, **kwargs):
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.asarray(a)) for a in args], **kwargs)
    return out[0].numpy() if isinstance(out, tuple) else out.numpy()


@functools.partial(nnx.jit, static_argnames=("causal",))
def _call(module, *args, causal=None):
    out = module(*args) if causal is None else module(*args, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def run_flax(module, *args, causal=None):
    """Jitted: one compile per shape instead of one per primitive (eager NNX is slow to warm up)."""
    return np.asarray(_call(module, *[jnp.asarray(a) for a in args], causal=causal))


def test_sinusoids_match_openai_formula():
    assert_close(flax_whisper.positions.sinusoids(1500, 384), torch_ref.positions.sinusoids(1500, 384), 1e-5)


@SETTINGS
@given(shapes)
def test_linear(pair, config, shape):
    t, f = pair
    x = states(config, *shape)
    for name in ("query", "key", "value", "out"):
        tm, fm = getattr(t.encoder.blocks[0].attn, name), getattr(layer(f.encoder.blocks, 0).attn, name)
        assert_close(run_flax(fm, x), run_torch(tm, x), ATOL, name)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 32), st.integers(0, 2**16))
def test_conv1d(pair, config, batch, frames, seed):
    t, f = pair
    mel = np.random.default_rng(seed).standard_normal((batch, config.n_mels, frames)).astype(np.float32)
    # torch NCW, flax NWC
    assert_close(
        run_flax(f.encoder.conv1, mel.transpose(0, 2, 1)), run_torch(t.encoder.conv1, mel).transpose(0, 2, 1), ATOL
    )
    x = states(config, batch, frames, seed)
    ours = run_flax(f.encoder.conv2, x)
    assert_close(ours, run_torch(t.encoder.conv2, x.transpose(0, 2, 1)).transpose(0, 2, 1), ATOL)


@SETTINGS
@given(shapes)
def test_layernorm_and_mlp(pair, config, shape):
    t, f = pair
    x = 3.0 * states(config, *shape) + 1.0
    for name in ("attn_ln", "mlp_ln", "mlp"):
        tm, fm = getattr(t.decoder.blocks[1], name), getattr(layer(f.decoder.blocks, 1), name)
        assert_close(run_flax(fm, x), run_torch(tm, x), ATOL, name)


@SETTINGS
@given(shapes)
def test_embedding(pair, config, shape):
    t, f = pair
    batch, length, seed = shape
    tokens = np.random.default_rng(seed).integers(0, config.n_vocab, (batch, length))
    assert_close(run_flax(f.decoder.token_embedding, tokens), run_torch(t.decoder.token_embedding, tokens), ATOL)


@SETTINGS
@given(shapes, st.integers(1, 16))
def test_attention_self_causal_and_cross(pair, config, shape, n_audio):
    t, f = pair
    x = states(config, *shape)
    xa = states(config, shape[0], n_audio, shape[2] + 1)
    enc_t, enc_f = t.encoder.blocks[0].attn, layer(f.encoder.blocks, 0).attn
    assert_close(run_flax(enc_f, x), run_torch(enc_t, x), ATOL, "self")
    dec_t, dec_f = t.decoder.blocks[0].attn, layer(f.decoder.blocks, 0).attn
    assert_close(run_flax(dec_f, x, causal=True), run_torch(dec_t, x, causal=True), ATOL, "causal")
    cross_t, cross_f = t.decoder.blocks[0].cross_attn, layer(f.decoder.blocks, 0).cross_attn
    assert_close(run_flax(cross_f, x, xa), run_torch(cross_t, x, xa), ATOL, "cross")


@pytest.mark.parametrize("transposed", [False, True], ids=["kernel_in_out", "decoding_copy_out_in"])
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_the_output_projection_takes_the_heads_as_attention_leaves_them(pair, config, backend, transposed, monkeypatch):
    """`MultiHeadAttention.output` takes `attend`'s (B, T, H, dh): on a CPU it merges the heads
    for its product; traced as for a GPU it contracts them where they lie, with the kernel `(in,
    out)` or, as a GPU's decoding copy holds it (`prepare_products`), `(out, in)`. Either way,
    torch's output projection of the merged heads."""
    from flax_whisper import layers

    t, f = pair
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(layers, "transposes_decoding_kernels", lambda: transposed)
    attn = layer(f.encoder.blocks, 0).attn
    layers.prepare_products(attn, jnp.float32)
    assert attn.out.transposed == transposed
    y = states(config, 2, 5, seed=3)
    got = nnx.jit(lambda m, heads: m.output(heads))(attn, jnp.asarray(y.reshape(2, 5, attn.n_head, -1)))
    assert_close(np.asarray(got), run_torch(t.encoder.blocks[0].attn.out, y), ATOL, "out")


@SETTINGS
@given(shapes, st.integers(1, 16))
def test_residual_blocks(pair, config, shape, n_audio):
    t, f = pair
    x = states(config, *shape)
    xa = states(config, shape[0], n_audio, shape[2] + 1)
    assert_close(run_flax(layer(f.encoder.blocks, 1), x), run_torch(t.encoder.blocks[1], x), ATOL, "encoder block")
    ours = run_flax(layer(f.decoder.blocks, 1), x, xa, causal=True)
    assert_close(ours, run_torch(t.decoder.blocks[1], x, xa, causal=True), ATOL, "decoder block")


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 32), st.integers(0, 2**16))
def test_audio_encoder(pair, config, batch, frames, seed):
    t, f = pair
    mel = np.random.default_rng(seed).standard_normal((batch, config.n_mels, frames)).astype(np.float32)
    assert_close(run_flax(f.encoder, mel), run_torch(t.encoder, mel), ATOL)


@SETTINGS
@given(shapes, st.integers(1, 16))
def test_text_decoder(pair, config, shape, n_audio):
    t, f = pair
    batch, length, seed = shape
    tokens = np.random.default_rng(seed).integers(0, config.n_vocab, (batch, length))
    xa = states(config, batch, n_audio, seed + 1)
    assert_close(run_flax(f.decoder, tokens, xa), run_torch(t.decoder, tokens, xa), ATOL)


def test_modules_of_every_variant(variant_pair, variant):
    """Self-attention mechanism (rotary where the variant has it), blocks, encoder and decoder."""
    t, f = variant_pair
    x = states(variant, 2, 9, 0)
    xa = states(variant, 2, 7, 1)
    for side in ("encoder", "decoder"):
        causal = side == "decoder"
        tm, fm = getattr(t, side).blocks[0].attn, layer(getattr(f, side).blocks, 0).attn
        if getattr(variant, f"{side}_attention") == "mha":
            assert (tm.rotary_base is not None) == (fm.rotary_base is not None) == getattr(variant, f"{side}_rotary")
        assert_close(run_flax(fm, x, causal=causal), run_torch(tm, x, causal=causal), ATOL, f"{side} attention")
    assert_close(
        run_flax(layer(f.decoder.blocks, 0), x, xa, causal=True),
        run_torch(t.decoder.blocks[0], x, xa, causal=True),
        ATOL,
    )
    mel = np.random.default_rng(2).standard_normal((2, variant.n_mels, 31)).astype(np.float32)
    assert_close(run_flax(f.encoder, mel), run_torch(t.encoder, mel), ATOL, "encoder")
    tokens = np.random.default_rng(3).integers(0, variant.n_vocab, (2, 9))
    assert_close(run_flax(f.decoder, tokens, xa), run_torch(t.decoder, tokens, xa), ATOL, "decoder")
