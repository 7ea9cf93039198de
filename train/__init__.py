"""Training `flax_whisper` models: `python -m train`, or `Trainer(TrainConfig(...)).run()`."""

from train.config import TrainConfig
from train.step import TrainState, decay_mask, make_optimizer, train_step

__all__ = ["TrainConfig", "TrainState", "decay_mask", "make_optimizer", "train_step"]
