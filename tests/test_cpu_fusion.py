"""`cpu_fusion_fence` (`flax_whisper/layers.py`): an identity that keeps XLA:CPU from fusing a
norm into the MLP's first product, and the encoder's last block and final norm into one slow
library call."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_whisper import Whisper, layers
from flax_whisper import model as flax_model
from flax_whisper.layers import cpu_fusion_fence
from whisper_config import ModelConfig


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_fence_returns_every_value_as_it_is_and_passes_gradients_through(dtype):
    info = jnp.finfo(dtype)
    special = [0.0, -0.0, float(info.smallest_subnormal), float(info.tiny), float(info.max), -float(info.max)]
    special += [np.inf, -np.inf, np.nan, 1 / 3, -2.5e-3]
    x = jnp.concatenate([jnp.asarray(special, dtype), jax.random.normal(jax.random.key(0), (1000,), dtype) * 100])
    y = jax.jit(cpu_fusion_fence)(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32).view(np.uint32), np.asarray(x, np.float32).view(np.uint32))
    weights = (jnp.arange(x.size) % 97).astype(jnp.float32)  # exact in bfloat16 too
    grad = jax.grad(lambda x: jnp.sum(cpu_fusion_fence(x.astype(dtype)).astype(jnp.float32) * weights))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))


def fused_products(compiled_text: str) -> list[tuple[int, bool]]:
    """For each fused computation of a compiled program that holds a product: how many products
    it holds, and whether it also normalises (an `rsqrt`: a norm's statistics)."""
    found, name, products, norm = [], None, 0, False
    for line in compiled_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if header:
            name, products, norm = header.group(1), 0, False
        elif line.startswith("}"):
            if name and name.startswith("fused_computation") and products:
                found.append((products, norm))
            name = None
        elif name:
            products += " dot(" in line
            norm = norm or " rsqrt(" in line
    return found


def compiled_encoder(config: ModelConfig, batch: int) -> str:
    model = nnx.eval_shape(lambda: Whisper(config, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    mel = jax.ShapeDtypeStruct((batch, config.n_mels, 2 * config.n_audio_ctx), jnp.float32)
    return jax.jit(lambda state, mel: nnx.merge(graph, state).encoder(mel)).lower(state, mel).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="fusions XLA:CPU makes")
def test_the_cpu_encoder_multiplies_each_product_on_its_own(monkeypatch):
    """A one-layer `tiny` encoder at batch 4 over 30 s: every product is a fusion of its own, and
    none normalises (the README's Speed section has the timings). The test also checks that XLA:CPU
    still fuses without each fence, so a compiler that no longer needs one shows up here: without
    the MLP's, its first product takes in the norm before it; without the one before the final
    norm, the last block's two MLP products become one computation."""
    config = dataclasses.replace(ModelConfig.from_preset("whisper", "tiny"), n_audio_layer=1)
    assert all(fusion == (1, False) for fusion in fused_products(compiled_encoder(config, batch=4)))
    with monkeypatch.context() as patch:
        patch.setattr(layers, "cpu_fusion_fence", lambda x: x)  # the MLP's
        fusions = fused_products(compiled_encoder(config, batch=4))
        assert sorted(fusions)[-1] == (1, True) and fusions.count((1, True)) == 1, fusions
    monkeypatch.setattr(flax_model, "cpu_fusion_fence", lambda x: x)  # the encoder's, before ln_post
    fusions = fused_products(compiled_encoder(config, batch=4))
    assert sorted(fusions)[-1][0] == 2 and sorted(fusions)[-2][0] == 1, fusions  # fc1 and fc2 as one
