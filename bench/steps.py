"""Shared by the benchmarks: the jitted training step of a config, traced from abstract shapes
(nothing allocated, nothing run), for compile times and FLOP counts; the layer layouts their
`--layers` flags name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flax_whisper import Whisper
from train.config import TrainConfig
from train.step import Graphs, make_optimizer, new_state, train_step
from whisper_config import ModelConfig

# `--layers` -> `unroll_layers`: the default (auto: up to 12 layers a side unrolled, deeper
# stacks scanned), every stack scanned, every stack unrolled.
LAYOUTS = {"auto": "auto", "scan": False, "unrolled": True}


def layout_name(config: ModelConfig) -> str:
    """How `config` runs its encoder's and decoder's layers: "unrolled", "scan", or which side is unrolled."""
    encoder, decoder = config.unrolls(config.n_audio_layer), config.unrolls(config.n_text_layer)
    if encoder == decoder:
        return "unrolled" if encoder else "scan"
    return "encoder unrolled" if encoder else "decoder unrolled"


def abstract_train_step(config: TrainConfig, batch: int, frames: int, tokens: int):
    """(the jitted step, its abstract state, the abstract batch {"mel" (B, n_mels, frames) float32,
    "labels" (B, tokens) int32}) for `config`'s model and optimiser: `step.lower(state, batch)`."""
    model_config = config.model_config()
    tx = make_optimizer(config)
    model = nnx.eval_shape(lambda: Whisper(model_config, rngs=nnx.Rngs(0)))
    state = jax.eval_shape(lambda: new_state(model, tx))
    step = jax.jit(functools.partial(train_step, graphs=Graphs.of(model), tx=tx, config=config), donate_argnums=0)
    shapes = {
        "mel": jax.ShapeDtypeStruct((batch, model_config.n_mels, frames), jnp.float32),
        "labels": jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
    }
    return step, state, shapes
