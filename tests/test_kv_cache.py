"""Incremental decoding with the KV cache equals the full forward pass, in each framework."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SETTING_COVER, assert_close, make_pair, random_batch, tiny_config, use_kv_layout, variant_params
from flax import nnx

from whisper_config import InputError

# A prompt, single tokens, and a run of two after an offset: 12 = n_text_ctx, three chunk shapes.
CHUNKS = (3, 1, 1, 2, 1, 1, 1, 1, 1)


def test_torch_incremental_equals_full(variant_pair, variant):
    t, _ = variant_pair
    config = variant
    mel, tokens = random_batch(config, 2, 30, sum(CHUNKS), seed=5)
    tokens = torch.from_numpy(tokens)
    with torch.no_grad():
        xa = t.encoder(torch.from_numpy(mel))
        full, _ = t.decoder(tokens, xa)
        cache, start, steps = t.decoder.init_cache(xa), 0, []
        for n in CHUNKS:
            logits, cache = t.decoder(tokens[:, start : start + n], xa, cache)
            steps.append(logits)
            start += n
    assert cache["offset"] == sum(CHUNKS)
    assert_close(torch.cat(steps, 1).numpy(), full.numpy(), 1e-5)


@pytest.mark.parametrize("variant", variant_params(SETTING_COVER), indirect=True)
def test_flax_incremental_equals_full(variant_pair, variant):
    _, f = variant_pair
    config = variant
    mel, tokens = random_batch(config, 2, 30, sum(CHUNKS), seed=5)
    decode = nnx.jit(lambda model, tokens, xa, cache: model.decoder(tokens, xa, cache))
    xa = f.encoder(mel)
    full, _ = decode(f, tokens, xa, None)
    cache, start, steps = f.decoder.init_cache(xa), 0, []
    for n in CHUNKS:
        logits, cache = decode(f, tokens[:, start : start + n], xa, cache)
        steps.append(logits)
        start += n
    assert int(cache["offset"]) == sum(CHUNKS)
    assert_close(np.concatenate(steps, 1), full, 1e-5)


@pytest.mark.parametrize("preset", ["whisper", pytest.param("integrated", marks=pytest.mark.slow)])
def test_unrolled_decoder_layers_decode_as_the_scan(preset):
    """`decode_unroll=True` lays the cached decoder's layers out one by one: the same logits and
    cache (integrated: dynamic convolution, hybrid and memory caches)."""
    mel, tokens = random_batch(tiny_config(preset), 2, 30, sum(CHUNKS), seed=6)
    decode = nnx.jit(lambda model, tokens, xa, cache: model.decoder(tokens, xa, cache))
    results = []
    for unroll in (False, True):
        _, f = make_pair(tiny_config(preset, decode_unroll=unroll), seed=3)
        xa = f.encoder(mel)
        cache, start, steps = f.decoder.init_cache(xa), 0, []
        for n in CHUNKS:
            logits, cache = decode(f, tokens[:, start : start + n], xa, cache)
            steps.append(logits)
            start += n
        results.append((np.concatenate(steps, 1), cache))
    (scanned, scan_cache), (unrolled, unrolled_cache) = results
    assert_close(unrolled, scanned, 1e-5)
    for a, b in zip(jax.tree.leaves(unrolled_cache), jax.tree.leaves(scan_cache), strict=True):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("preset", ["whisper", "integrated"])
def test_the_accelerators_cache_layout_decodes_as_this_cpus(preset, monkeypatch):
    """GPUs and TPUs keep keys and values sequence-major, `(B, S, H, dh)` (`kv_layout()`), and
    their KV caches heads-major with each head's values transposed (`cache_layout()`: keys `(B, H,
    S, dh)`, values `(B, H, dh, S)`), cross-attention's included: on this CPU, in those layouts,
    incremental decoding gives the logits of the CPU layout's full forward (integrated: memory
    slots, dynamic convolution and the hybrid band in the cache too)."""
    from flax_whisper import kernel

    config = tiny_config(preset)
    _, f = make_pair(config, seed=4)
    mel, tokens = random_batch(config, 2, 30, sum(CHUNKS), seed=5)
    reference = f(mel, tokens)  # heads-major, this CPU's layout

    use_kv_layout(monkeypatch, "bshd")
    assert kernel.cache_layout() == kernel.cross_kv_layout() == "bhdv"
    decode = nnx.jit(lambda model, tokens, xa, cache: model.decoder(tokens, xa, cache))
    xa = f.encoder(mel)
    cache, start, steps = f.decoder.init_cache(xa), 0, []
    heads, width = config.n_text_head, config.n_text_state // config.n_text_head
    buffers = [
        (jax.tree_util.keystr(path), path[-1].key, leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]
        if path[-1].key in ("k", "v") and leaf.ndim == 5  # (layers, B, ...)
    ]
    assert any("cross_attn" in name for name, *_ in buffers) and any("'attn'" in name for name, *_ in buffers)
    for name, key, shape in buffers:
        length = shape[3] if key == "k" else shape[4]
        assert shape[1:] == ((2, heads, length, width) if key == "k" else (2, heads, width, length)), name
    for n in CHUNKS:
        logits, cache = decode(f, tokens[:, start : start + n], xa, cache)
        steps.append(logits)
        start += n
    assert_close(np.concatenate(steps, 1), reference, 1e-5)


@pytest.mark.parametrize("preset", ["whisper", "rotary_learned_sinusoidal"])
def test_flax_jitted_decode_step_compiles_once(preset):
    config = tiny_config(preset)
    _, f = make_pair(config)
    mel, tokens = random_batch(config, 2, 30, config.n_text_ctx, seed=6)
    xa = f.encoder(mel)
    full, _ = f.decoder(tokens, xa)
    traces = []

    @nnx.jit
    def step(model, token, cache):
        traces.append(1)  # runs only while tracing
        return model.decoder(token, xa, cache)

    cache, steps = f.decoder.init_cache(xa), []
    for i in range(config.n_text_ctx):
        logits, cache = step(f, tokens[:, i : i + 1], cache)
        steps.append(logits)
    assert len(traces) == 1, "the offset is traced data: one compilation serves every step"
    assert_close(np.concatenate(steps, 1), full, 1e-5)


def test_cache_of_smaller_capacity(pair, config):
    t, f = pair
    mel, tokens = random_batch(config, 1, 10, 4, seed=7)
    xa = f.encoder(mel)
    cache = f.decoder.init_cache(xa, max_length=4)
    logits, cache = f.decoder(tokens, xa, cache)
    assert_close(logits, f.decoder(tokens, xa)[0], 1e-5)
    with pytest.raises(InputError, match="KV cache full: 4 cached \\+ 1 new tokens exceed its 4 slots"):
        f.decoder(tokens[:, :1], xa, cache)
    with torch.no_grad():
        xa_t = t.encoder(torch.from_numpy(mel))
        cache_t = t.decoder.init_cache(xa_t, max_length=4)
        _, cache_t = t.decoder(torch.from_numpy(tokens), xa_t, cache_t)
        with pytest.raises(InputError, match="KV cache full"):
            t.decoder(torch.from_numpy(tokens[:, :1]), xa_t, cache_t)


def test_cache_is_a_pytree(pair, config):
    _, f = pair
    mel, _ = random_batch(config, 3, 8, 1, seed=8)
    cache = f.decoder.init_cache(f.encoder(mel))
    leaves = jax.tree.leaves(cache)
    layers, heads, width = config.n_text_layer, config.n_text_head, config.n_text_state // config.n_text_head
    assert len(leaves) == 1 + 4  # the offset, and every layer's buffers stacked on a leading axis
    # Heads-major keys and values on a CPU (kernel.kv_layout): no transposes in a decoding step;
    # cross-attention's keys, only read, each head's transposed (kernel.cross_kv_layout).
    assert cache["layers"]["attn"]["k"].shape == (layers, 3, heads, config.n_text_ctx, width)
    assert cache["layers"]["cross_attn"]["k"].shape == (layers, 3, heads, width, 4)
    assert cache["layers"]["cross_attn"]["v"].shape == (layers, 3, heads, 4, width)


def test_a_jitted_loop_past_the_cache_gives_nan_logits_not_clamped_writes(pair, config):
    """Inside jit the decoder cannot raise: steps past the cache's capacity give NaN logits, so a
    loop that runs too far fails loudly instead of overwriting the last slot."""
    _, f = pair
    mel, tokens = random_batch(config, 2, 8, 5, seed=9)
    xa = f.encoder(mel)
    cache = f.decoder.init_cache(xa, max_length=3)
    step = nnx.jit(lambda m, tok, cache: m.decoder(tok, xa, cache))
    finite = []
    for i in range(5):
        logits, cache = step(f, jnp.asarray(tokens[:, i : i + 1]), cache)
        finite.append(bool(jnp.isfinite(logits).all()))
    assert finite == [True, True, True, False, False]


@pytest.mark.parametrize("preset", ["whisper", "integrated"])
@pytest.mark.parametrize("transposed", [False, True], ids=["this_cpu", "gpu_kernels"])
def test_the_decoding_copy_gives_the_decoders_logits(preset, transposed, monkeypatch):
    """`TextDecoder.for_decoding` (what every decoding loop runs): every product's weights cast
    once to the compute dtype and, as on a GPU (`gpu_kernels`, forced here, with the GPU's
    sequence-major caches), each `Linear`'s kernel laid out `(out, in)`: the original decoder's
    incremental logits, float32 and bfloat16 (integrated: the mechanisms' own products), while the
    original keeps its float32 `(in, out)` weights."""
    from flax_whisper import layers
    from flax_whisper.layers import Embedding, Linear

    config = tiny_config(preset)
    _, f = make_pair(config, seed=4)
    mel, tokens = random_batch(config, 2, 30, sum(CHUNKS), seed=5)
    if transposed:
        use_kv_layout(monkeypatch, "bshd")
        monkeypatch.setattr(layers, "transposes_decoding_kernels", lambda: True)

    def incremental(decoder, layers_, xa):
        cache, start, steps = decoder.init_cache(xa, sum(CHUNKS), layers_), 0, []
        for n in CHUNKS:
            logits, cache = decoder(tokens[:, start : start + n], xa, cache, layers=layers_)
            steps.append(np.asarray(logits, np.float32))
            start += n
        return np.concatenate(steps, 1)

    for dtype, tolerance in ((jnp.float32, 1e-6), (jnp.bfloat16, 0.0)):
        xa = f.encoder(jnp.asarray(mel, dtype))
        expected = incremental(f.decoder, f.decoder.layers(), xa)
        copy, copied_layers = f.decoder.for_decoding(dtype)
        linears = [m for layer in copied_layers for _, m in nnx.iter_modules(layer) if isinstance(m, Linear)]
        assert len(linears) >= 2 * 10  # each layer's: four per attention, two in the MLP
        for m in linears:
            assert m.transposed == transposed and m.kernel.dtype == dtype
        for _, m in nnx.iter_modules(copy.blocks):  # the stack the layers came from, unread by their steps
            if isinstance(m, Linear):
                assert not m.transposed and m.kernel.dtype == jnp.float32
        table = next(m for _, m in nnx.iter_modules(copy) if isinstance(m, Embedding))
        assert (table.output is None) == (dtype == jnp.float32)
        got = incremental(copy, copied_layers, xa)
        if transposed or dtype == jnp.float32:  # products in another layout: float32 rounding apart
            np.testing.assert_allclose(got, expected, rtol=0, atol=max(tolerance, 1e-5 * np.abs(expected).max()))
        else:  # the same products of the same values
            np.testing.assert_array_equal(got, expected)
    for _, m in nnx.iter_modules(f.decoder):
        if isinstance(m, Linear):
            assert not m.transposed and m.kernel.dtype == jnp.float32 and m.kernel.shape[-1] == m.out_features
