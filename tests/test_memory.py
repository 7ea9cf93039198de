"""Augmented memory write-back and gradient checkpointing, in both frameworks.

Write-back is training-mode state: the two frameworks must hold the same `memory_state` after
several training-mode steps (dropout 0, so the frameworks' different RNGs do not matter), leave
it alone in eval mode, and write it exactly once per step under gradient checkpointing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close, make_pair, random_batch, tiny_config, use_kv_layout
from flax import nnx

from convert.core import flax_to_torch

STEPS = 3


def memory_states_torch(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if k.endswith("memory_state")}


def memory_states_flax(model) -> dict[str, np.ndarray]:
    """Under torch's per-layer names (the flax blocks are stacked)."""
    return {k: v for k, v in flax_to_torch(model).items() if k.endswith("memory_state")}


def loss_and_grads(model, mel, labels):
    """Loss and gradients in training mode; memory_state is written as a side effect."""
    return nnx.value_and_grad(lambda m: m.loss(mel, labels))(model)


flax_step = nnx.jit(loss_and_grads)


def torch_step(model, mel, labels):
    model.zero_grad()
    loss = model.loss(torch.from_numpy(mel), torch.from_numpy(labels))
    loss.backward()
    return loss.item(), {
        k: np.zeros(p.shape) if p.grad is None else p.grad.numpy().copy() for k, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    "preset, attention, layout",
    [
        ("rotary_rotary_sinusoidal", "memory", "bhsd"),
        ("rotary_rotary_sinusoidal", "memory", "bshd"),
        ("rotary_rotary_sinusoidal", "memory", "as_on_a_gpu"),
        pytest.param("integrated", "integrated", "bhsd", marks=pytest.mark.slow),
    ],
)
def test_memory_state_after_training_steps(preset, attention, layout, monkeypatch):
    """`layout`: keys and values heads-major as on a CPU (`bhsd`), or sequence-major as on GPUs
    and TPUs (`bshd`), where the slots' weights read the keys in that layout; or the whole model
    traced as for a GPU (`as_on_a_gpu`), where the values, the slots' too, leave out their bias
    for the output projection to add (`MultiHeadAttention.folds_value_bias`)."""
    config = tiny_config(
        preset, encoder_attention=attention, decoder_attention=attention, memory_update=True, n_audio_layer=1
    )
    if layout == "as_on_a_gpu":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    else:
        use_kv_layout(monkeypatch, layout)
    step_in_layout = nnx.jit(loss_and_grads)  # traced afresh: the module's flax_step may hold another layout's trace
    t, f = make_pair(config, seed=12)
    t.train()
    f.train()
    before = memory_states_torch(t)
    assert before and all(not v.any() for v in before.values()), "memory_state starts at zero"
    for step in range(STEPS):
        mel, labels = random_batch(config, 2, 20, 6, seed=step)
        loss_t, _ = torch_step(t, mel, labels)
        loss_f, _ = step_in_layout(f, jnp.asarray(mel), jnp.asarray(labels))
        assert abs(float(loss_f) - loss_t) < 1e-5
        ours, reference = memory_states_flax(f), memory_states_torch(t)
        assert ours.keys() == reference.keys()
        for key in reference:
            assert np.abs(reference[key]).max() > 0, f"{key} was not written"
            assert_close(ours[key], reference[key], 1e-5, key)

    # Eval mode: the state is read, never written.
    t.eval()
    f.eval()
    frozen_t, frozen_f = memory_states_torch(t), memory_states_flax(f)
    mel, labels = random_batch(config, 2, 20, 6, seed=99)
    torch_step(t, mel, labels)
    step_in_layout(f, jnp.asarray(mel), jnp.asarray(labels))
    for key, value in memory_states_torch(t).items():
        assert np.array_equal(value, frozen_t[key])
    for key, value in memory_states_flax(f).items():
        assert np.array_equal(value, frozen_f[key])


def test_memory_without_update_never_writes():
    config = tiny_config("whisper", encoder_attention="memory", decoder_attention="memory")
    t, f = make_pair(config, seed=13)
    t.train()
    f.train()
    mel, labels = random_batch(config, 2, 20, 6)
    torch_step(t, mel, labels)
    flax_step(f, jnp.asarray(mel), jnp.asarray(labels))
    assert all(not v.any() for v in memory_states_torch(t).values())
    assert all(not v.any() for v in memory_states_flax(f).values())


def test_gradient_checkpointing_changes_nothing_and_writes_once():
    """Same loss, gradients and memory_state with and without checkpointing, in each framework."""
    plain = tiny_config("integrated", memory_update=True, n_audio_layer=1, n_text_layer=1)
    checkpointed = plain.replace(gradient_checkpointing=True)
    mel, labels = random_batch(plain, 2, 20, 6, seed=4)
    results = {}
    for name, config in (("plain", plain), ("checkpointed", checkpointed)):
        t, f = make_pair(config, seed=14)
        t.train()
        f.train()
        loss_t, grads_t = torch_step(t, mel, labels)
        loss_f, grads_f = flax_step(f, jnp.asarray(mel), jnp.asarray(labels))
        flat_f = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads_f)}
        results[name] = (loss_t, grads_t, memory_states_torch(t), float(loss_f), flat_f, memory_states_flax(f))
    (lt0, gt0, mt0, lf0, gf0, mf0), (lt1, gt1, mt1, lf1, gf1, mf1) = results["plain"], results["checkpointed"]
    assert lt0 == pytest.approx(lt1, abs=1e-6) and lf0 == pytest.approx(lf1, abs=1e-6)
    for key in gt0:
        assert_close(gt1[key], gt0[key], 1e-6, f"torch grad {key}")
    for key in gf0:
        assert_close(gf1[key], gf0[key], 1e-6, f"flax grad {key}")
    # Written exactly once. After one write the state is mu * delta; a second write (from the
    # written state) would give about mu * delta * (1 + (1 - mu)), 10% more at mu = 0.9: far
    # outside the tolerance, which only allows float reassociation under recompilation.
    for states_plain, states_checkpointed in ((mt0, mt1), (mf0, mf1)):
        for key, value in states_plain.items():
            assert np.abs(value).max() > 1e-2, f"{key}: too small to tell one write from two"
            assert_close(states_checkpointed[key], value, 1e-5, key)


def test_checkpointed_blocks_are_rematerialised():
    """The flax blocks really go through nnx.remat: the jaxpr holds a checkpoint (remat) primitive,
    with either policy."""
    config = tiny_config("whisper", gradient_checkpointing=True, n_audio_layer=1, n_text_layer=2)
    mel, labels = random_batch(config, 1, 8, 3)

    def remat_count(config) -> int:
        graphdef, state = nnx.split(make_pair(config)[1])

        def gradients(state):
            model = nnx.merge(graphdef, state)
            return nnx.grad(lambda m: m.loss(mel, labels))(model)

        return str(jax.make_jaxpr(gradients)(state)).count("remat")

    # One remat per side, inside the scanned block: the program does not grow with depth.
    assert remat_count(config) == remat_count(config.replace(n_text_layer=5)) == 2
    assert remat_count(config.replace(remat_policy="save_matmuls")) == 2
    assert remat_count(config.replace(gradient_checkpointing=False)) == 0
