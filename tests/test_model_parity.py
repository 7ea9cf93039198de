"""Whole-model parity: logits (<= 1e-4), loss, and the gradient of the loss w.r.t. every parameter."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close, flax_forward, make_pair, random_batch, tiny_config
from flax import nnx

from convert import build_plan


@nnx.jit
def logits_and_loss(model, mel, tokens):
    return model(mel, tokens), model.loss(mel, tokens)


@pytest.mark.parametrize("batch, frames, n_tokens", [(1, 32, 12), (3, 5, 2)])
def test_logits_and_loss(variant_pair, variant, batch, frames, n_tokens):
    t, f = variant_pair
    mel, tokens = random_batch(variant, batch, frames, n_tokens, seed=frames)
    with torch.no_grad():
        logits_t = t(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
        loss_t = t.loss(torch.from_numpy(mel), torch.from_numpy(tokens)).item()
    logits_f, loss_f = logits_and_loss(f, mel, tokens)
    assert_close(logits_f, logits_t, 1e-4, "logits")
    assert abs(float(loss_f) - loss_t) <= 1e-5 * max(1.0, abs(loss_t))


def test_larger_model_logits():
    config = tiny_config(n_audio_state=64, n_text_state=64, n_audio_layer=3, n_text_layer=3, n_vocab=500)
    t, f = make_pair(config, seed=3)
    mel, tokens = random_batch(config, 2, 32, 12, seed=3)
    with torch.no_grad():
        logits_t = t(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
    assert_close(flax_forward(f, mel, tokens), logits_t, 1e-4, "logits")


def test_gradients_of_every_parameter(variant):
    config = variant
    t, f = make_pair(config, seed=1)
    mel, labels = random_batch(config, 2, 24, 10, seed=1)
    labels[1, 6:] = -100  # padding is ignored by the loss
    loss_t = t.loss(torch.from_numpy(mel), torch.from_numpy(labels))
    t.zero_grad()
    loss_t.backward()
    torch_grads = {name: p.grad.numpy() for name, p in t.named_parameters()}

    grad_fn = nnx.jit(nnx.value_and_grad(lambda m, x, y: m.loss(x, y)))
    loss_f, grads = grad_fn(f, jnp.asarray(mel), jnp.asarray(labels))
    flax_grads = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert abs(float(loss_f) - loss_t.item()) <= 1e-5

    trainable = [e for e in build_plan(config) if e.trainable]
    assert sorted(e.torch_key for e in trainable) == sorted(torch_grads)
    assert sorted(e.flax_key for e in trainable) == sorted(flax_grads)
    for entry in trainable:
        ours = entry.transform.to_torch(flax_grads[entry.flax_key])
        reference = torch_grads[entry.torch_key]
        scale = np.max(np.abs(reference))
        assert scale > 0, f"{entry.torch_key} gets no gradient"
        rel = np.max(np.abs(ours - reference)) / scale
        assert rel <= 1e-4, f"{entry.torch_key}: relative gradient difference {rel:.2e}"
