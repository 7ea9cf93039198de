"""Optimizer, training state, and the jit-compiled train and eval steps.

The state is a pytree (`TrainState`) of the model's parameters, its other state (buffers such
as `memory_state`, dropout RNG counters), the optax state and counters, so one `jax.jit` with
donated state and explicit shardings runs a step on one CPU or a TPU pod alike. The model's
structure (`nnx.GraphDef`) is static: one for training mode and one for evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_whisper import Whisper
from flax_whisper.audio import log_mel_spectrogram
from flax_whisper.model import IGNORE_INDEX, cross_entropy, shift_right
from train.config import TrainConfig

# Weight decay reaches the true weight matrices only: the kernels of the linear and convolution
# layers and the token table. Not norms, biases, position tables, a learned temperature, the
# biased attention's content bias or the memory slots (matrices by shape, not weights of a map).
DECAYED = ("kernel", "embedding")


def _leaf_name(path) -> str:
    names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
    return names[-2] if names[-1] == "value" else names[-1]  # past an nnx.Variable's own field


def decay_mask(params) -> Any:
    """A pytree of bools over `params`: True for the leaves weight decay reaches (`DECAYED`)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _leaf_name(path) in DECAYED, params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * final_lr_ratio`."""
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay on matrices only) or Adafactor."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        tx = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask
        )
    else:
        tx = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None, weight_decay_mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), tx) if config.clip_norm else tx


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # nnx.Param leaves, float32: what the optimizer updates
    rest: nnx.State  # everything else the model carries (buffers, memory state, RNG counters)
    opt_state: Any
    step: jax.Array  # steps taken (skipped ones included): the data position
    skipped: jax.Array  # steps whose loss or gradients were not finite (not applied)
    bad_streak: jax.Array  # consecutive skipped steps now
    worst_streak: jax.Array  # the longest run of skipped steps so far
    key: jax.Array  # data augmentation: step s uses fold_in(key, s)


@dataclasses.dataclass(frozen=True)
class Graphs:
    """The model's static structure in training and in evaluation mode."""

    train: nnx.GraphDef
    eval: nnx.GraphDef
    n_mels: int

    @classmethod
    def of(cls, model: Whisper) -> Graphs:
        model.train()
        train_graph = nnx.split(model)[0]
        model.eval()
        eval_graph = nnx.split(model)[0]
        model.train()
        return cls(train_graph, eval_graph, model.config.n_mels)

    def model(self, state: TrainState, training: bool = False) -> Whisper:
        return nnx.merge(self.train if training else self.eval, state.params, state.rest)


def new_state(model: Whisper, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """The initial state of `model` (usable inside `jax.jit` / `jax.eval_shape`)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return state_from(params, rest, tx, seed)


def state_from(params: nnx.State, rest: nnx.State, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """The initial training state around given parameters and model state: fresh optimizer
    state and counters (usable inside `jax.jit`)."""
    counters = [jnp.zeros((), jnp.int32) for _ in range(4)]  # distinct buffers: the state is donated
    return TrainState(params, rest, tx.init(params), *counters, key=jax.random.key(seed))


def _masks(key: jax.Array, batch: int, size: int, count: int, width: int) -> jax.Array:
    """(batch, size) bools: `count` spans per row, each of a uniform width in [0, width]."""
    widths_key, starts_key = jax.random.split(key)
    widths = jax.random.randint(widths_key, (batch, count, 1), 0, width + 1)
    starts = jax.random.randint(starts_key, (batch, count, 1), 0, jnp.maximum(size - widths, 0) + 1)
    positions = jnp.arange(size)
    return jnp.any((positions >= starts) & (positions < starts + widths), axis=1)


def spec_augment(mel: jax.Array, key: jax.Array, config: TrainConfig) -> jax.Array:
    """SpecAugment's time and frequency masking. mel (B, n_mels, F) -> (B, n_mels, F)"""
    if not (config.time_masks and config.time_mask_width) and not (config.freq_masks and config.freq_mask_width):
        return mel
    batch, n_mels, frames = mel.shape
    time_key, freq_key = jax.random.split(key)
    masked = _masks(time_key, batch, frames, config.time_masks, config.time_mask_width)[:, None, :]
    masked |= _masks(freq_key, batch, n_mels, config.freq_masks, config.freq_mask_width)[:, :, None]
    return jnp.where(masked, mel.mean(axis=(1, 2), keepdims=True), mel)


def batch_mel(batch: dict[str, jax.Array], n_mels: int) -> jax.Array:
    """The batch's log-mel (B, n_mels, F): computed here, on the devices, from the padded 16 kHz
    audio (B, F * 160) the loader gives (Whisper's frontend, per utterance), or taken as given."""
    if "audio" in batch:
        return log_mel_spectrogram(batch["audio"], n_mels)
    return batch["mel"]


def _compute_dtype(config: TrainConfig):
    return jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32


def skips_by_branch() -> bool:
    """How a step drops a non-finite update: a branch on a CPU, a select elsewhere.

    A CPU runs the update only when it is kept, and nothing reads the old parameters and moments
    again (a 37M-parameter step: 23 ms less than the select). On a GPU the branch's results were
    copied into the donated state's buffers after it, every parameter and both moments (150 copies,
    2.9 GB a step for `small`: XLA's program for an H200), where the select is one more operand
    of the optimiser's update kernels, which read the old values anyway."""
    return jax.default_backend() == "cpu"


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphs: Graphs,
    tx: optax.GradientTransformation,
    config: TrainConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` {"audio" (B, N) or "mel" (B, n_mels, F), "labels" (B, T)},
    split into `accumulation_steps` micro-batches of strided rows (micro-batch i holds rows i,
    i + k, ...: on a batch sharded over devices, each one stays spread over all of them) whose
    gradients are summed, weighted by their tokens.

    A step whose loss or gradient norm is not finite changes nothing but the counters.
    Jit it with `functools.partial` for the keyword arguments and `donate_argnums=0`.
    """
    k = config.accumulation_steps
    mel = batch_mel(batch, graphs.n_mels)
    batch = {"mel": spec_augment(mel, jax.random.fold_in(state.key, state.step), config), "labels": batch["labels"]}
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)
    total_tokens = jnp.maximum(jnp.sum(batch["labels"] != IGNORE_INDEX), 1)

    def micro_loss(params, rest, mel, labels):
        rest = jax.tree.map(lambda x: x, rest)  # fresh Variables in this trace: dropout advances its RNG count
        model = nnx.merge(graphs.train, params, rest)
        loss = model.loss(mel.astype(_compute_dtype(config)), labels)
        weight = jnp.sum(labels != IGNORE_INDEX) / total_tokens
        return loss * weight, nnx.state(model, nnx.Not(nnx.Param))

    def accumulate(carry, inputs):
        grads, loss, rest = carry
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        (part, rest), g = grad_fn(state.params, rest, inputs["mel"], inputs["labels"])
        return (jax.tree.map(jnp.add, grads, g), loss + part, rest), None

    # Unrolled rather than `lax.scan`: XLA:CPU ran the scanned step 4x slower, and k is small.
    carry = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), state.rest)
    for i in range(k):
        carry, _ = accumulate(carry, jax.tree.map(operator.itemgetter(i), micro))
    grads, loss, rest = carry
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), rest, opt_state

    kept = (state.params, state.rest, state.opt_state)
    if skips_by_branch():
        params, rest, opt_state = jax.lax.cond(finite, apply, lambda _: kept, None)
    else:
        params, rest, opt_state = jax.tree.map(functools.partial(jax.lax.select, finite), apply(None), kept)
    bad_streak = jnp.where(finite, 0, state.bad_streak + 1)
    new = TrainState(
        params=params,
        rest=rest,
        opt_state=opt_state,
        step=state.step + 1,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_streak=bad_streak,
        worst_streak=jnp.maximum(state.worst_streak, bad_streak),
        key=state.key,
    )
    # The rate this step's update used: the schedule advances with applied updates only (a skipped
    # step keeps the optimizer state, count included), so it is indexed by them, not by `step`.
    learning_rate = learning_rate_schedule(config)(state.step - state.skipped)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "tokens": total_tokens,
        "learning_rate": learning_rate,
    }
    return new, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphs: Graphs, config: TrainConfig) -> dict:
    """Sums over one batch: token cross-entropy, correctly predicted tokens, and tokens counted."""
    model = graphs.model(state, training=False)
    labels = batch["labels"]
    mel = batch_mel(batch, model.config.n_mels).astype(_compute_dtype(config))
    logits = model.logits(mel, shift_right(labels, model.config.start_token_id), padded_vocab=True)
    counted = labels != IGNORE_INDEX
    tokens = counted.sum()
    loss_sum = cross_entropy(logits, labels) * jnp.maximum(tokens, 1)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & counted)
    return {"loss_sum": loss_sum, "correct": correct, "tokens": tokens}
