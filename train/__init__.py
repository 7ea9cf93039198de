"""Training `flax_whisper` models with optax (the full loop arrives with the training issue)."""

from train.step import decay_mask, make_optimizer, train_step

__all__ = ["decay_mask", "make_optimizer", "train_step"]
