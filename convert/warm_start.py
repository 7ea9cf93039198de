"""Warm start: load a checkpoint into a model of another preset (the seed's own workflow).

Every tensor whose name, shape and role (trainable parameter or fixed buffer) match is copied;
the rest of the target is freshly initialised, and whatever the source holds that the target
cannot take is left out. Both lists are reported by name, with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from convert.checkpoints import Checkpoint
from convert.core import flax_to_torch
from convert.rules import build_plan
from flax_whisper import Whisper
from whisper_config import ModelConfig


@dataclasses.dataclass
class WarmStart:
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    copied: list[str]
    fresh: list[tuple[str, str]]  # (target key, why it was not copied)
    left_out: list[tuple[str, str]]  # (source key, why the target does not take it)

    def report(self) -> str:
        lines = [f"copied {len(self.copied)} tensors from the source"]
        for title, items in (("initialised fresh", self.fresh), ("left out of the source", self.left_out)):
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {key}: {why}" for key, why in items)
        return "\n".join(lines)


def _role(trainable: bool) -> str:
    return "a trainable parameter" if trainable else "a fixed buffer"


def warm_start(source: Checkpoint, target: ModelConfig, seed: int = 0) -> WarmStart:
    """Tensors for a `target` model: the source's where they fit, a fresh init (seed) elsewhere."""
    tensors = flax_to_torch(Whisper(target, rngs=nnx.Rngs(seed)))
    source_roles = {e.torch_key: e.trainable for e in build_plan(source.config)}
    target_plan = {e.torch_key: e for e in build_plan(target)}
    copied, fresh, left_out = [], [], []
    for key, entry in target_plan.items():
        if key not in source.tensors:
            fresh.append((key, "not in the source"))
            continue
        value = source.tensors[key]
        if tuple(value.shape) != entry.torch_shape:
            why = f"shape {tuple(value.shape)} in the source, {entry.torch_shape} in the target"
        elif source_roles[key] != entry.trainable:
            why = f"{_role(source_roles[key])} in the source, {_role(entry.trainable)} in the target"
        else:
            tensors[key] = np.asarray(value, np.float32)
            copied.append(key)
            continue
        fresh.append((key, why))
        left_out.append((key, why))
    left_out += [(key, "not in the target model") for key in source.tensors if key not in target_plan]
    return WarmStart(target, tensors, copied, fresh, sorted(left_out))
