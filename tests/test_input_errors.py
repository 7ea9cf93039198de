"""Bad model input is a clear `InputError` in both frameworks, never a crash deep in a library."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_batch
from flax import nnx

from whisper_config import InputError


def both(pair, mel, tokens, loss=False):
    """Call the torch and the flax model on the same input; yields one callable per framework."""
    t, f = pair
    if loss:
        return [lambda: t.loss(torch.from_numpy(mel), torch.from_numpy(tokens)).detach(), lambda: f.loss(mel, tokens)]
    return [lambda: t(torch.from_numpy(mel), torch.from_numpy(tokens)), lambda: f(jnp.asarray(mel), tokens)]


@pytest.mark.parametrize(
    "mel_shape, n_tokens, message",
    [
        ((1, 5, 20), 3, r"mel has 5 mel bins but the model expects n_mels=8"),
        ((1, 8, 33), 3, r"audio too long: 33 mel frames give 17 encoder positions, more than n_audio_ctx=16"),
        ((8, 20), 3, r"mel must have shape \(batch, n_mels=8, frames\)"),
        ((1, 8, 20), 13, r"too many tokens: 13 exceed n_text_ctx=12"),
    ],
)
def test_shape_errors(pair, config, mel_shape, n_tokens, message):
    mel = np.zeros(mel_shape, np.float32)
    tokens = np.zeros((1, n_tokens), np.int64)
    for call in both(pair, mel, tokens):
        with pytest.raises(InputError, match=message):
            call()


@pytest.mark.parametrize("bad", [-1, 96, 10_000])
def test_token_ids_outside_vocabulary(pair, config, bad):
    mel, tokens = random_batch(config, 2, 20, 4)
    tokens[1, 2] = bad
    for call in both(pair, mel, tokens) + both(pair, mel, tokens, loss=True):
        with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary \[0, 96\)"):
            call()


def test_ignored_labels_are_not_token_ids(pair, config):
    mel, labels = random_batch(config, 2, 20, 4)
    labels[:, 2:] = -100
    losses = [float(call()) for call in both(pair, mel, labels, loss=True)]
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 1e-5


def test_labels_closed_over_by_a_jitted_loss_are_checked_on_the_host(pair, config):
    """Labels a jitted function closes over are concrete: their ids are checked, with the ignored
    ones left out on the host (not by array ops that an outer `jit` would trace)."""
    _, f = pair
    mel, labels = random_batch(config, 2, 20, 4)
    labels[:, 2:] = -100
    good, bad = jnp.asarray(labels), jnp.asarray(labels).at[0, 0].set(96)
    assert float(nnx.jit(lambda m: m.loss(mel, good))(f)) == pytest.approx(float(f.loss(mel, good)), abs=1e-6)
    with pytest.raises(InputError, match=r"token id 96 is outside the vocabulary"):
        nnx.jit(lambda m: m.loss(mel, bad))(f)


def test_all_labels_ignored_gives_zero_loss(pair, config):
    mel, labels = random_batch(config, 1, 20, 4)
    labels[:] = -100
    assert [float(call()) for call in both(pair, mel, labels, loss=True)] == [0.0, 0.0]


def test_longest_valid_input_is_accepted(pair, config):
    mel, tokens = random_batch(config, 1, 2 * config.n_audio_ctx, config.n_text_ctx)
    for call in both(pair, mel, tokens):
        assert call().shape == (1, config.n_text_ctx, config.n_vocab)


@pytest.mark.parametrize(
    "mel, tokens, message",
    [
        (np.zeros((2, 8, 20), np.float32), np.zeros((2, 3), np.float32), "tokens must be integer token ids, got dtype"),
        (np.zeros((2, 8, 20), np.float32), np.zeros((2, 3), bool), "tokens must be integer token ids, got dtype"),
        (np.zeros((0, 8, 20), np.float32), np.zeros((0, 3), np.int64), r"mel holds no examples \(shape \(0, 8, 20\)\)"),
        (
            np.zeros((2, 8, 20), np.float32),
            np.zeros((3, 3), np.int64),
            "tokens hold 3 examples but the encoder output 2: batch sizes must match",
        ),
        (np.zeros((2, 8, 20), np.int64), np.zeros((2, 3), np.int64), "mel must be floating point"),
    ],
)
def test_dtypes_and_batch_sizes(pair, mel, tokens, message):
    for call in both(pair, mel, tokens):
        with pytest.raises(InputError, match=message):
            call()


def test_labels_must_be_integers(pair, config):
    mel, labels = random_batch(config, 2, 20, 4)
    for call in both(pair, mel, labels.astype(np.float32), loss=True):
        with pytest.raises(InputError, match="labels must be integer token ids"):
            call()
