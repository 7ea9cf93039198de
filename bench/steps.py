"""Shared by the benchmarks: the jitted training step of a config, traced from abstract shapes
(nothing allocated, nothing run), for compile times and FLOP counts; the model FLOPs of a step
and of an encoder forward; the layer layouts their `--layers` flags name."""

from __future__ import annotations

import dataclasses
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

# How a model is lowered for counting its FLOPs: XLA's cost analysis counts a loop's body once
# (a scanned stack would show one layer, the CPU's chunked attention one block of one head), a
# rematerialised block twice, and nothing inside a fused kernel (cuDNN's attention). So: layers
# unrolled, no recomputation, XLA's attention.
COUNTED = {
    "unroll_layers": True,
    "gradient_checkpointing": False,
    "remat_policy": "full",
    "attention_implementation": "xla",
}


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


def counted_flops(lower) -> float:
    """XLA's cost analysis of the program `lower()` lowers (not compiled): its FLOPs (0.0 where
    there is none). Lowered for the CPU with the CPU as the default device, whatever the machine:
    a GPU's client does not analyse unoptimised programs (jax 0.11 on an H200 answered None even
    for a program lowered for the CPU, until the CPU was the default device)."""
    with jax.default_device(jax.devices("cpu")[0]):
        cost = lower().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def step_flops(config: TrainConfig, batch: int, frames: int, tokens: int) -> float:
    """The model FLOPs of one training step (forward, cross-entropy, backward, optimiser), lowered
    for the CPU whatever the device (`counted_flops`)."""
    counted = dataclasses.replace(config, model={**config.model, **COUNTED})
    step, state, shapes = abstract_train_step(counted, batch, frames, tokens)
    return counted_flops(lambda: step.trace(state, shapes).lower(lowering_platforms=("cpu",)))


def encoder_flops(config: ModelConfig, batch: int, frames: int) -> float:
    """The model FLOPs of one encoder forward of a (B, n_mels, frames) mel, lowered likewise."""
    model = nnx.eval_shape(lambda: Whisper(dataclasses.replace(config, **COUNTED), rngs=nnx.Rngs(0)))
    graph, state = nnx.split(model)
    encode = jax.jit(lambda state, mel: nnx.merge(graph, state).encoder(mel))
    mel = jax.ShapeDtypeStruct((batch, config.n_mels, frames), jnp.float32)
    return counted_flops(lambda: encode.trace(state, mel).lower(lowering_platforms=("cpu",)))
