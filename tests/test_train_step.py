"""The jitted optax step: it learns, it compiles once, and it decays only weight matrices."""

import jax
import numpy as np
from conftest import random_batch, tiny_config
from flax import nnx

from flax_whisper import Whisper
from train import decay_mask, make_optimizer, train_step


def test_loss_falls_on_a_fixed_batch():
    config = tiny_config()
    model = Whisper(config, rngs=nnx.Rngs(0))
    model.eval()  # no dropout configured; eval keeps the run deterministic anyway
    optimizer = make_optimizer(model, learning_rate=3e-3)
    mel, labels = random_batch(config, 4, 20, 8, seed=0)
    labels[2:, 5:] = -100
    losses = [float(train_step(model, optimizer, mel, labels)) for _ in range(40)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert int(optimizer.step[...]) == 40


def _name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def test_decay_mask_covers_matrices_only():
    model = Whisper(tiny_config(), rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_flatten_with_path(decay_mask(nnx.state(model, nnx.Param)))[0]
    mask = {".".join(_name(k) for k in path if _name(k) != "value"): bool(v) for path, v in leaves}
    decayed = {k for k, v in mask.items() if v}
    assert len(mask) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert {
        "encoder.conv1.kernel",
        "encoder.blocks.0.attn.query.kernel",
        "decoder.token_embedding.embedding",
    } <= decayed
    assert {"decoder.blocks.1.mlp.fc2.kernel", "decoder.blocks.0.cross_attn.key.kernel"} <= decayed
    for key in mask.keys() - decayed:
        assert key.endswith((".bias", ".scale", "positional_embedding")), key
    assert "decoder.positional_embedding" in mask and "decoder.positional_embedding" not in decayed
