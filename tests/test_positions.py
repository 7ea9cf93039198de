"""Position schemes: rotary is relative, tables have the right kind, over-long input is an error."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import VARIANTS, assert_close, greedy_cover, random_batch, variant_params, variant_settings
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_whisper.positions as fpos
import torch_ref.positions as tpos
from whisper_config import InputError

N_HEAD, WIDTH = 4, 32


def rotate(framework: str, x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """x (B, T, d) rotated per head of width d / N_HEAD -> (B, T, d)"""
    heads = x.reshape(*x.shape[:2], N_HEAD, -1)
    if framework == "torch":
        rotated = tpos.apply_rotary(torch.from_numpy(heads), torch.from_numpy(positions), base).numpy()
    else:
        rotated = np.asarray(fpos.apply_rotary(jnp.asarray(heads), jnp.asarray(positions), base))
    return rotated.reshape(x.shape)


def head_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(1, T, d) queries and keys -> (H, T, T) per-head dot products."""
    q, k = q.reshape(-1, N_HEAD, WIDTH // N_HEAD), k.reshape(-1, N_HEAD, WIDTH // N_HEAD)
    return np.einsum("thd,shd->hts", q, k)


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("shift", [1, 37, 400])
def test_rotary_scores_depend_only_on_distance(framework, shift):
    rng = np.random.default_rng(shift)
    x = rng.standard_normal((1, 9, WIDTH)).astype(np.float32)
    w_q, w_k = rng.standard_normal((2, WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)
    positions = np.arange(9)

    def rotary_scores(p):
        return head_scores(rotate(framework, x @ w_q, p), rotate(framework, x @ w_k, p))

    def absolute_scores(p):
        h = x + tpos.sinusoids(512, WIDTH).numpy()[p]
        return head_scores(h @ w_q, h @ w_k)

    assert_close(rotary_scores(positions + shift), rotary_scores(positions), 1e-4, "rotary")
    assert np.max(np.abs(absolute_scores(positions + shift) - absolute_scores(positions))) > 1e-2
    assert np.max(np.abs(rotary_scores(positions) - head_scores(x @ w_q, x @ w_k))) > 1e-2, "rotary must rotate"


def test_rotary_is_the_spec_rotation():
    """Pair (x[2i], x[2i+1]) of each head turns by position * base ** (-2i / dh)."""
    x = np.zeros((1, 1, WIDTH), np.float32)
    x[0, 0, 8 + 2] = 1.0  # head 1, pair i = 1, first element
    out = rotate("torch", x, np.array([3]))
    angle = 3 * 10000.0 ** (-2 / 8)
    assert_close(out[0, 0, 8 + 2 : 8 + 4], [np.cos(angle), np.sin(angle)], 1e-6)
    assert np.count_nonzero(out) == 2


@settings(max_examples=5, deadline=None)
@given(st.integers(1, 12), st.integers(0, 500), st.sampled_from([100.0, 10000.0]))
def test_apply_rotary_parity(length, offset, base):
    x = np.random.default_rng(length).standard_normal((2, length, WIDTH)).astype(np.float32)
    positions = offset + np.arange(length)
    assert_close(rotate("flax", x, positions, base), rotate("torch", x, positions, base), 1e-5)


def test_table_kinds(variant_pair, variant):
    t, f = variant_pair
    for side, kind in (("encoder", variant.encoder_positions), ("decoder", variant.decoder_positions)):
        torch_table = getattr(t, side).positional_embedding
        flax_table = getattr(f, side).positional_embedding
        assert (torch_table is None) == (flax_table is None) == (kind == "none")
        if kind == "none":
            continue
        trainable = kind != "sinusoidal"
        assert isinstance(torch_table, torch.nn.Parameter) == trainable
        assert isinstance(flax_table, nnx.Param) == trainable


# The tables depend on the position settings alone: the main suite runs variants that give each of
# them every value, the rest are slow.
POSITION_SETTINGS = (
    "encoder_positions",
    "decoder_positions",
    "normalize_positions",
    "encoder_rotary",
    "decoder_rotary",
)


@pytest.mark.parametrize(
    "variant",
    variant_params(greedy_cover({name: variant_settings(name, POSITION_SETTINGS) for name in VARIANTS})),
    indirect=True,
)
def test_sinusoid_tables_are_openais(variant, variant_pair):
    """The fixed and the initial learned-sinusoidal tables of both frameworks against two
    independent tables: the float64 oracle's loop (1e-6) and OpenAI's own `whisper.model.sinusoids`
    (float32 arithmetic, which drifts up to ~1e-4 at the far positions; 2e-4)."""
    import whisper
    from reference.numpy_whisper import sinusoids

    from convert.core import flax_to_torch
    from torch_ref import Whisper

    fresh_torch = Whisper(variant).state_dict()
    fresh_flax = flax_to_torch(variant_pair[1].__class__(variant, rngs=nnx.Rngs(0)))
    for side, kind in (("encoder", variant.encoder_positions), ("decoder", variant.decoder_positions)):
        if kind not in ("sinusoidal", "learned_sinusoidal"):
            continue
        for table in (fresh_torch[f"{side}.positional_embedding"].numpy(), fresh_flax[f"{side}.positional_embedding"]):
            assert_close(table, sinusoids(*table.shape), 1e-6, f"{side} vs the oracle")
            assert_close(table, whisper.model.sinusoids(*table.shape).numpy(), 2e-4, f"{side} vs OpenAI")


def test_normalized_rows_are_unit_length():
    table = np.random.default_rng(0).standard_normal((10, WIDTH)).astype(np.float32) * 3
    ours = np.asarray(fpos.lookup_positions(jnp.asarray(table), 2, 5, "t", normalize=True))
    theirs = tpos.lookup_positions(torch.from_numpy(table), 2, 5, "t", normalize=True).numpy()
    assert_close(np.linalg.norm(ours, axis=-1), np.ones(5), 1e-6)
    assert_close(ours, theirs, 1e-6)


def test_overlong_input_on_every_variant(variant_pair, variant):
    t, f = variant_pair
    mel, tokens = random_batch(variant, 1, 2 * variant.n_audio_ctx, variant.n_text_ctx)
    with torch.no_grad():
        assert t(torch.from_numpy(mel), torch.from_numpy(tokens)).shape == (1, variant.n_text_ctx, variant.n_vocab)
    long_mel = np.zeros((1, variant.n_mels, 2 * variant.n_audio_ctx + 1), np.float32)
    long_tokens = np.zeros((1, variant.n_text_ctx + 1), np.int64)
    for call in (
        lambda: t(torch.from_numpy(long_mel), torch.from_numpy(tokens)),
        lambda: f(long_mel, tokens),
    ):
        with pytest.raises(InputError, match="audio too long"):
            call()
    for call in (
        lambda: t(torch.from_numpy(mel), torch.from_numpy(long_tokens)),
        lambda: f(mel, long_tokens),
    ):
        with pytest.raises(InputError, match="too many tokens: 13 exceed n_text_ctx=12"):
            call()
