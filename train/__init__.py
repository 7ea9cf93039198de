"""Training `flax_whisper` models: `python -m train`, or `Trainer(TrainConfig(...)).run()`.

The names below are imported when first used (PEP 562), so that `python -m train` reaches its
huge-page restart (`whisper_io.huge_pages`) before JAX is loaded, and starts again in a fraction
of a second instead of after importing JAX, Flax and optax twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.config import TrainConfig
    from train.step import TrainState, decay_mask, make_optimizer, train_step

__all__ = ["TrainConfig", "TrainState", "decay_mask", "make_optimizer", "train_step"]
_HOMES = {name: "train.config" if name == "TrainConfig" else "train.step" for name in __all__}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
