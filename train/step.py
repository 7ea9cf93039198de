"""The jit-compiled optax training step for `flax_whisper` models.

`make_optimizer` builds AdamW with weight decay on weight matrices only (not norms, biases or
position tables, as in nanoGPT/big_vision); `train_step` is one `nnx.jit` update. The training
issue builds the loop, data pipeline, sharding and orbax checkpoints around these.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from flax_whisper import Whisper

NO_DECAY = ("positional_embedding",)


def decay_mask(params) -> object:
    """A pytree of bools over `params`: decay matrices (ndim >= 2) except position tables."""

    def keep(path, leaf) -> bool:
        names = {getattr(p, "key", getattr(p, "name", None)) for p in path}
        return leaf.ndim >= 2 and not names & set(NO_DECAY)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    model: Whisper,
    learning_rate: float | optax.Schedule = 1e-3,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> nnx.Optimizer:
    """AdamW over the model's `nnx.Param`s (buffers and RNG state are not optimised)."""
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: Whisper, optimizer: nnx.Optimizer, mel: jax.Array, labels: jax.Array) -> jax.Array:
    """One AdamW update on the teacher-forcing loss; returns the loss before the update.

    mel (B, n_mels, frames), labels (B, T) with -100 for padding -> loss ()
    """
    loss, grads = nnx.value_and_grad(lambda m: m.loss(mel, labels))(model)
    optimizer.update(model, grads)
    return loss
