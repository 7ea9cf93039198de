"""What each attention mechanism and norm is supposed to do, shown directly, in both frameworks."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close, make_pair, tiny_config

import flax_whisper.layers as flayers
import torch_ref.layers as tlayers
from convert import new_flax_model
from convert.core import torch_to_numpy
from flax_whisper.blocks import layer
from torch_ref import Whisper
from torch_ref.attention import MultiHeadAttention

WINDOW, KERNEL = 2, 5


@pytest.fixture(scope="module")
def mechanism_pair():
    config = tiny_config(
        "whisper",
        encoder_attention="hybrid",
        decoder_attention="dynamic_conv",
        window_size=WINDOW,
        conv_kernel_size=KERNEL,
    )
    return make_pair(config, seed=5)


def both(module_pair, x, **kwargs):
    """Outputs `(torch, flax)` of a mirrored module pair on the same input."""
    t, f = module_pair
    with torch.no_grad():
        out_t = t(torch.from_numpy(x), **kwargs)
    out_f = f(jnp.asarray(x), **kwargs)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return first(out_t).numpy(), np.asarray(first(out_f))


def perturb(x, position):
    y = x.copy()
    y[:, position] += 5.0
    return y


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_local_branch_sees_only_its_band(mechanism_pair, causal):
    t, f = mechanism_pair
    local = (t.encoder.blocks[0].attn.local_attn, layer(f.encoder.blocks, 0).attn.local_attn)
    x = np.random.default_rng(0).standard_normal((1, 12, 32)).astype(np.float32)
    query = 6
    base = both(local, x, causal=causal)
    for key in range(12):
        changed = both(local, perturb(x, key), causal=causal)
        inside = (0 <= query - key <= WINDOW) if causal else abs(query - key) <= WINDOW
        for out, ref in zip(changed, base, strict=True):
            moved = np.max(np.abs(out[0, query] - ref[0, query]))
            assert (moved > 1e-4) == inside, f"key {key}: moved {moved:.2e}, inside band {inside}"
    # The global branch sees everything.
    glob = (t.encoder.blocks[0].attn.global_attn, layer(f.encoder.blocks, 0).attn.global_attn)
    far = both(glob, perturb(x, 0))
    assert np.max(np.abs(far[0][0, query] - both(glob, x)[0][0, query])) > 1e-4


def test_dynamic_conv_decoder_is_causal_and_local(mechanism_pair):
    t, f = mechanism_pair
    conv = (t.decoder.blocks[0].attn, layer(f.decoder.blocks, 0).attn)
    x = np.random.default_rng(1).standard_normal((2, 12, 32)).astype(np.float32)
    base = both(conv, x, causal=True)
    query = 7
    for key in range(12):
        changed = both(conv, perturb(x, key), causal=True)
        inside = 0 <= query - key <= KERNEL - 1
        for out, ref in zip(changed, base, strict=True):
            assert (np.max(np.abs(out[:, query] - ref[:, query])) > 1e-5) == inside, key


def test_dynamic_conv_encoder_is_centred():
    config = tiny_config("whisper", encoder_attention="dynamic_conv", conv_kernel_size=KERNEL)
    t, f = make_pair(config, seed=6)
    conv = (t.encoder.blocks[0].attn, layer(f.encoder.blocks, 0).attn)
    x = np.random.default_rng(2).standard_normal((1, 12, 32)).astype(np.float32)
    base, query = both(conv, x), 6
    for key in range(12):
        changed = both(conv, perturb(x, key))
        inside = abs(query - key) <= KERNEL // 2
        for out, ref in zip(changed, base, strict=True):
            assert (np.max(np.abs(out[0, query] - ref[0, query])) > 1e-5) == inside, key


def test_biased_attention_adds_a_content_bias_to_every_query():
    """With the query projection zeroed, logits are `u . k * s`: the bias alone picks the keys."""
    config = tiny_config("whisper", encoder_attention="biased")
    t, f = make_pair(config, seed=7)
    attn_t, attn_f = t.encoder.blocks[0].attn, layer(f.encoder.blocks, 0).attn
    x = np.random.default_rng(3).standard_normal((1, 5, 32)).astype(np.float32)
    with torch.no_grad():
        attn_t.query.weight.zero_()
        attn_t.query.bias.zero_()
        xt = torch.from_numpy(x)
        k = attn_t.key(xt).view(1, 5, 4, 8)
        v = attn_t.value(xt).view(1, 5, 4, 8)
        logits = torch.einsum("hd,bshd->bhs", attn_t.content_bias, k) * 8**-0.5  # same for every query
        expected = attn_t.out(torch.einsum("bhs,bshd->bhd", logits.softmax(-1), v).reshape(1, 1, 32).expand(1, 5, 32))
        got = attn_t(xt)[0]
    assert_close(got.numpy(), expected.numpy(), 1e-5)
    attn_f = layer(new_flax_model(config, torch_to_numpy(t)).encoder.blocks, 0).attn
    assert_close(np.asarray(attn_f(jnp.asarray(x))[0]), expected.numpy(), 1e-5)


def test_biased_starts_as_mha():
    config = tiny_config("whisper", decoder_attention="biased")
    t, _ = make_pair(config, seed=8)
    biased = t.decoder.blocks[0].attn
    with torch.no_grad():
        biased.content_bias.zero_()
        x = torch.randn(2, 6, 32)
        plain = MultiHeadAttention(32, 4, config)
        plain.load_state_dict({k: v for k, v in biased.state_dict().items() if k != "content_bias"})
        assert torch.equal(biased(x, causal=True)[0], plain(x, causal=True)[0])


def test_learned_temperature_is_one_scalar_per_attention_module():
    config = tiny_config("whisper", learned_temperature=True)
    t, f = make_pair(config, seed=9)
    temperatures = {k: v for k, v in t.state_dict().items() if k.endswith("temperature")}
    # encoder: one self-attention per block; decoder: self and cross per block
    assert len(temperatures) == config.n_audio_layer + 2 * config.n_text_layer
    assert Whisper(config).encoder.blocks[0].attn.temperature.item() == pytest.approx(8**-0.5)
    assert layer(f.decoder.blocks, 1).cross_attn.temperature[...].shape == ()


@pytest.mark.parametrize("groups", [1, 4])
def test_norms_match_their_formulas(groups):
    x = (np.random.default_rng(groups).standard_normal((2, 3, 32)) * 3 + 1).astype(np.float32)
    g = np.random.default_rng(10).standard_normal(32).astype(np.float32)
    b = np.random.default_rng(11).standard_normal(32).astype(np.float32)
    xg = x.reshape(2, 3, groups, 32 // groups).astype(np.float64)
    group_rms = (xg / np.sqrt((xg**2).mean(-1, keepdims=True) + 1e-6)).reshape(x.shape) * g + b
    rms = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * g

    t_group, f_group = tlayers.GroupRMSNorm(32, groups), flayers.GroupRMSNorm(32, groups)
    t_rms, f_rms = tlayers.RMSNorm(32), flayers.RMSNorm(32)
    with torch.no_grad():
        t_group.weight.copy_(torch.from_numpy(g))
        t_group.bias.copy_(torch.from_numpy(b))
        t_rms.weight.copy_(torch.from_numpy(g))
    f_group.scale[...] = jnp.asarray(g)
    f_group.bias[...] = jnp.asarray(b)
    f_rms.scale[...] = jnp.asarray(g)
    with torch.no_grad():
        assert_close(t_group(torch.from_numpy(x)).numpy(), group_rms, 1e-5)
        assert_close(t_rms(torch.from_numpy(x)).numpy(), rms, 1e-5)
    assert_close(f_group(jnp.asarray(x)), group_rms, 1e-5)
    assert_close(f_rms(jnp.asarray(x)), rms, 1e-5)
    # Per position: a prefix normalises the same as the whole sequence (the seed's did not).
    assert_close(f_group(jnp.asarray(x[:, :1])), group_rms[:, :1], 1e-5)


def test_readme_parameter_counts():
    """The README's mechanism table states what the modules really hold."""
    import re
    from pathlib import Path

    from torch_ref.registry import ATTENTION
    from whisper_config import ModelConfig

    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) \|$", readme, re.M))
    assert set(rows) == set(ATTENTION)
    for kind, stated in rows.items():
        module = ATTENTION[kind](384, 6, ModelConfig(), False)
        assert sum(p.numel() for p in module.parameters()) == int(stated.replace(",", "")), kind
