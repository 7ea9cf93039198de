"""The jitted train step on its own: it learns (AdamW, Adafactor, bfloat16 compute), compiles
once, skips non-finite steps, and decays only weight matrices."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import product_operand_dtypes, random_batch, tiny_config
from flax import nnx

from flax_whisper import Whisper
from train import TrainConfig, decay_mask, make_optimizer, train_step
from train.checkpointing import to_savable
from train.step import Graphs, new_state, spec_augment


def step_function(config: TrainConfig, model_config):
    model = Whisper(model_config, rngs=nnx.Rngs(0))
    tx = make_optimizer(config)
    step = jax.jit(functools.partial(train_step, graphs=Graphs.of(model), tx=tx, config=config), donate_argnums=0)
    return new_state(model, tx), step


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(optimizer="adafactor", learning_rate=5e-2), dict(precision="bfloat16")],
    ids=["adamw", "adafactor", "bfloat16"],
)
def test_loss_falls_on_a_fixed_batch(settings):
    base = dict(learning_rate=3e-3, warmup_steps=0, steps=1000, clip_norm=None, weight_decay=0.01)
    config = TrainConfig(**{**base, **settings})
    model_config = tiny_config()
    state, step = step_function(config, model_config)
    mel, labels = random_batch(model_config, 4, 20, 8, seed=0)
    labels[2:, 5:] = -100
    batch = {"mel": jnp.asarray(mel), "labels": jnp.asarray(labels)}
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and int(state.skipped) == 0 and int(state.step) == 40
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))  # float32 master weights
    assert step._cache_size() == 1  # one compile for all 40 steps


@pytest.mark.parametrize("branch", [True, False], ids=["branch_as_on_a_cpu", "select_as_on_a_gpu"])
def test_a_non_finite_step_changes_nothing_but_the_counters(branch, monkeypatch):
    import train.step

    monkeypatch.setattr(train.step, "skips_by_branch", lambda: branch)
    config = TrainConfig(warmup_steps=0)
    model_config = tiny_config()
    state, step = step_function(config, model_config)
    mel, labels = random_batch(model_config, 2, 20, 8, seed=0)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    mel[0, 0, 3] = np.nan
    state, metrics = step(state, {"mel": jnp.asarray(mel), "labels": jnp.asarray(labels)})
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.bad_streak) == 1
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    state, metrics = step(state, {"mel": jnp.asarray(np.nan_to_num(mel)), "labels": jnp.asarray(labels)})
    assert bool(metrics["finite"]) and int(state.bad_streak) == 0 and int(state.worst_streak) == 1
    updated = jax.tree.map(np.asarray, (state.params, state.opt_state))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(updated), strict=True)]
    assert sum(changed) > len(changed) // 2  # the finite step applied its update


def test_the_logged_learning_rate_is_the_applied_one_after_skipped_steps():
    """A skipped step does not advance the optimizer's schedule, so the rate reported for the next
    step is the one optax applies: the schedule at the count of applied updates."""
    import optax

    from train.step import learning_rate_schedule

    config = TrainConfig(warmup_steps=10, steps=50, learning_rate=1e-3)
    model_config = tiny_config()
    state, step = step_function(config, model_config)
    mel, labels = random_batch(model_config, 2, 20, 8, seed=1)
    bad = mel.copy()
    bad[0, 0, 0] = np.nan
    schedule = learning_rate_schedule(config)
    for batch_mel in (mel, bad, bad, mel):
        state, metrics = step(state, {"mel": jnp.asarray(batch_mel), "labels": jnp.asarray(labels)})
    applied = int(state.step) - int(state.skipped)
    assert int(state.skipped) == 2 and applied == 2
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
    assert [int(s.count) for s in adam] == [applied]  # optax's own count of the updates it applied
    assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(applied - 1)))
    assert float(metrics["learning_rate"]) != pytest.approx(float(schedule(int(state.step) - 1)))


def test_dropout_rng_and_memory_state_advance_in_the_state():
    """Training-mode state (dropout RNG counters, augmented memory's write-back) flows through
    the jitted step: it changes every step, and the same state gives the same step."""
    config = TrainConfig(warmup_steps=0, time_masks=0, freq_masks=0)
    model_config = tiny_config(
        "rotary_rotary_sinusoidal", encoder_attention="memory", memory_size=3, memory_update=True, dropout=0.1
    )
    state, step = step_function(config, model_config)
    mel, labels = random_batch(model_config, 2, 20, 8, seed=0)
    batch = {"mel": jnp.asarray(mel), "labels": jnp.asarray(labels)}
    rest = jax.tree.map(np.asarray, to_savable(state.rest))  # typed RNG keys as their raw data
    state, first = step(state, batch)
    after = jax.tree.map(np.asarray, to_savable(state.rest))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(after), strict=True)]
    assert any(changed) and bool(first["finite"])
    memory = [v for k, v in nnx.to_flat_state(state.rest) if "memory_state" in map(str, k)]
    assert memory and all(np.abs(np.asarray(m.get_value())).sum() > 0 for m in memory)  # written back from zeros


def test_spec_augment_masks_bounded_spans_with_the_mean():
    config = TrainConfig(time_masks=2, time_mask_width=5, freq_masks=1, freq_mask_width=3)
    mel = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 40)), jnp.float32)
    out = np.asarray(spec_augment(mel, jax.random.key(1), config))
    changed = out != np.asarray(mel)
    for row in range(4):
        mean = float(np.asarray(mel[row]).mean())
        np.testing.assert_allclose(out[row][changed[row]], mean, atol=1e-6)
        time_masked = changed[row].all(axis=0).sum()  # frames masked over every bin
        freq_masked = changed[row].all(axis=1).sum()  # bins masked over every frame
        assert time_masked <= 2 * 5 and freq_masked <= 3
        assert changed[row].sum() <= time_masked * 8 + freq_masked * 40
    assert changed.any()
    np.testing.assert_array_equal(out, spec_augment(mel, jax.random.key(1), config))  # same key, same masks
    assert not np.array_equal(out, spec_augment(mel, jax.random.key(2), config))
    off = TrainConfig(time_masks=0, freq_masks=0)
    np.testing.assert_array_equal(spec_augment(mel, jax.random.key(1), off), mel)


def _name(key) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def test_decay_mask_covers_matrices_only(variant):
    """Per mechanism: decay reaches exactly the kernels and the token table, in flax and in the
    torch mirror alike (mapped through the converter's plan)."""
    from convert import build_plan
    from torch_ref import Whisper as TorchWhisper
    from train.torch_train import decayed_names

    model = Whisper(variant, rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_flatten_with_path(decay_mask(nnx.state(model, nnx.Param)))[0]
    names = [[_name(k) for k in path] for path, _ in leaves]
    keys = [".".join(n[:-1] if n[-1] == "value" else n) for n in names]  # past an nnx.Variable's own field
    mask = {key: bool(v) for key, (_, v) in zip(keys, leaves, strict=True)}
    assert len(mask) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    decayed = {k for k, v in mask.items() if v}
    assert {k.rsplit(".", 1)[-1] for k in decayed} == {"kernel", "embedding"}
    assert "encoder.conv1.kernel" in decayed and "decoder.token_embedding.embedding" in decayed
    for key in mask.keys() - decayed:  # never decayed, whatever their shape
        leaf = key.rsplit(".", 1)[-1]
        assert leaf in {"bias", "scale", "positional_embedding", "temperature", "content_bias", "memory"}, key
    if variant.encoder_attention in ("biased", "memory"):
        assert "encoder.blocks.attn.content_bias" in mask and "encoder.blocks.attn.content_bias" not in decayed
    if variant.encoder_attention == "memory":
        assert "encoder.blocks.attn.memory" in mask and "encoder.blocks.attn.memory" not in decayed
    torch_decayed = {e.torch_key for e in build_plan(variant) if e.trainable and e.flax_key in decayed}
    assert decayed_names(TorchWhisper(variant)) == torch_decayed


@pytest.mark.parametrize("preset", ["whisper", pytest.param("integrated", marks=pytest.mark.slow)])
def test_unrolled_layers_train_as_the_scan(preset):
    """`unroll_layers=True` lays the encoder's and decoder's layers out one after another (no loop
    left in the program given to XLA): the same loss and gradients as the scanned layers (integrated:
    dynamic convolution, hybrid and memory write-back)."""
    mel, labels = random_batch(tiny_config(preset), 2, 20, 8, seed=1)

    def gradients(graphdef, state):
        model = nnx.merge(graphdef, state)
        return nnx.value_and_grad(lambda m: m.loss(mel, labels))(model)

    results = []
    for unroll in (False, True):
        config = tiny_config(preset, unroll_layers=unroll, n_audio_layer=3, n_text_layer=3)
        graphdef, state = nnx.split(Whisper(config, rngs=nnx.Rngs(0)))
        grad = jax.jit(functools.partial(gradients, graphdef))
        # The program handed to XLA (which may itself unroll a short loop, as its CPU backend does
        # without its fusion emitters, the test session's setting: tests/conftest.py).
        assert ("stablehlo.while" in grad.lower(state).as_text()) is not unroll
        results.append(grad(state))
    (scan_loss, scan_grads), (loss_value, grads) = results
    np.testing.assert_allclose(loss_value, scan_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(scan_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def layer_loops(config) -> list[str]:
    """How the loss's program runs each stack of layers, in order: "unrolled" or "scan" (the
    jaxpr's scans of the layers, whose unroll factor is their length when unrolled)."""
    model = Whisper(config, rngs=nnx.Rngs(0))
    mel, labels = random_batch(config, 1, 20, 4, seed=0)
    graphdef, state = nnx.split(model)
    program = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state).loss(mel, labels))(state)
    loops = [e.params for e in program.jaxpr.eqns if e.primitive.name == "scan"]
    return ["unrolled" if loop["unroll"] == loop["length"] > 1 else "scan" for loop in loops]


def test_the_automatic_layer_layout_unrolls_shallow_stacks_unless_checkpointing():
    """`unroll_layers="auto"` (the default) unrolls each side of up to UNROLL_AUTO_LAYERS layers
    and scans deeper ones or any under gradient checkpointing; True and False decide for both."""
    from whisper_config.config import UNROLL_AUTO_LAYERS

    deep = UNROLL_AUTO_LAYERS + 1
    assert layer_loops(tiny_config()) == ["unrolled", "unrolled"]
    assert layer_loops(tiny_config(n_text_layer=deep)) == ["unrolled", "scan"]
    assert layer_loops(tiny_config(n_audio_layer=deep)) == ["scan", "unrolled"]
    assert layer_loops(tiny_config(gradient_checkpointing=True)) == ["scan", "scan"]
    assert layer_loops(tiny_config(n_text_layer=deep, unroll_layers=True)) == ["unrolled", "unrolled"]
    assert layer_loops(tiny_config(unroll_layers=False)) == ["scan", "scan"]


def test_bfloat16_logits_backward_rounds_only_the_cotangent():
    """The 16-bit vocabulary projection's gradients (cotangent rounded to bfloat16, matmuls
    accumulated in float32) against float32 autodiff of the same bfloat16 inputs: within bfloat16
    rounding, and their dtypes are the inputs'."""
    from flax_whisper.layers import float32_logits

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.bfloat16)
    table = jnp.asarray(rng.standard_normal((40, 16)) * 0.1, jnp.bfloat16)
    weights = jnp.asarray(rng.standard_normal((2, 5, 40)), jnp.float32)

    def objective(logits_fn, x, table):
        return jnp.sum(jnp.tanh(logits_fn(x, table)) * weights)

    exact = jax.grad(lambda x, t: objective(lambda a, b: jnp.einsum("btd,vd->btv", a, b), x, t), argnums=(0, 1))(
        x.astype(jnp.float32), table.astype(jnp.float32)
    )
    ours = jax.grad(lambda x, t: objective(float32_logits, x, t), argnums=(0, 1))(x, table)
    np.testing.assert_allclose(
        float32_logits(x, table),
        jnp.einsum("btd,vd->btv", *[a.astype(jnp.float32) for a in (x, table)]),
        rtol=1e-6,
        atol=1e-6,
    )
    for got, want, like in zip(ours, exact, (x, table), strict=True):
        assert got.dtype == like.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2 * scale)
        assert float(jnp.abs(got.astype(jnp.float32) - want).max()) > 0  # the cotangent really was rounded


def row_contracting_products(compiled) -> int:
    """How many 2-D float32 products of a compiled program contract their left operand's rows
    (`x^T g`), the form XLA:CPU leaves to Eigen."""
    return len(re.findall(r"= f32\[\d+,\d+\]\S* dot\([^)]*\), lhs_contracting_dims=\{0\}", compiled.as_text()))


@pytest.mark.parametrize("shape", [(2, 7, 16, 48), (2, 7, 48, 16), (1, 9, 16, 16)], ids=["widens", "narrows", "square"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_matmul_is_autodiffs_product_and_compiles_no_row_contracting_product(shape, dtype):
    """`Linear`'s product on a CPU (`_cpu_matmul`): the value and the gradients of x and the kernel
    against float64 NumPy (`g k^T`, `x^T g`), for layers that widen, narrow and keep the width,
    dtypes kept; and in float32 the compiled gradient holds no product that contracts its left
    operand's rows, which XLA:CPU gives to Eigen (autodiff of `x @ kernel` does compile one; XLA:CPU
    multiplies bfloat16 in float32 with layouts of its own choosing)."""
    from flax_whisper.layers import _cpu_matmul

    b, t, d_in, d_out = shape
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((b, t, d_in)), dtype)
    kernel = jnp.asarray(rng.standard_normal((d_in, d_out)) * 0.2, dtype)
    weights = rng.standard_normal((b, t, d_out))

    def loss(product):
        return lambda x, k: jnp.sum(product(x, k).astype(jnp.float32) * weights)

    x64, k64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, kernel))
    rounding = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2**-7, atol=2**-7 * d_in)
    got = _cpu_matmul(x, kernel)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), x64 @ k64, **rounding)
    grads = jax.grad(loss(_cpu_matmul), argnums=(0, 1))(x, kernel)
    exact = (weights @ k64.T, x64.reshape(-1, d_in).T @ weights.reshape(-1, d_out))
    for grad, want, like in zip(grads, exact, (x, kernel), strict=True):
        assert grad.dtype == like.dtype and grad.shape == like.shape
        scale = dict(rtol=1e-5, atol=1e-4) if dtype == jnp.float32 else dict(atol=2e-2 * float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want, **scale)

    def kernel_gradient(product):
        return jax.jit(jax.grad(loss(product), argnums=1)).lower(x, kernel).compile()

    if dtype == jnp.float32:
        assert row_contracting_products(kernel_gradient(jnp.matmul)) == 1
        assert row_contracting_products(kernel_gradient(_cpu_matmul)) == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="how XLA:CPU multiplies bfloat16")
@pytest.mark.parametrize("shape", [(2, 256, 64, 96), (2, 256, 96, 64)], ids=["widens", "narrows"])
def test_cpu_matmul_multiplies_bfloat16_operands_into_float32(shape, monkeypatch):
    """In bfloat16, every product of `_cpu_matmul`'s value and gradients (the kernel's included)
    takes bfloat16 operands and gives float32 (XLA:CPU's path to the CPU's bfloat16 dot-product
    instructions; README "Speed", bfloat16 on a CPU). With the kernel gradient's transpose held
    only by an optimisation barrier, XLA:CPU multiplies float32 copies instead."""
    from flax_whisper import layers

    b, t, d_in, d_out = shape
    x = jax.ShapeDtypeStruct((b, t, d_in), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((d_in, d_out), jnp.bfloat16)

    def products():
        def loss(x, kernel):
            return jnp.sum(jnp.sin(layers._cpu_matmul(x, kernel).astype(jnp.float32)))

        both = jax.jit(lambda x, kernel: (layers._cpu_matmul(x, kernel), jax.grad(loss, argnums=(0, 1))(x, kernel)))
        return product_operand_dtypes(both.lower(x, kernel).compile().as_text())

    found = products()
    assert len(found) >= 3 and set(found) == {("bf16", "bf16")}, found
    monkeypatch.setattr(layers, "_transposed", lambda a: jax.lax.optimization_barrier(a.T))
    assert ("f32", "f32") in products()


@pytest.mark.parametrize("bias_shape", [(8,), (2, 4)], ids=["linear", "per_head"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_add_bias_sums_the_bias_gradient_in_float32(dtype, bias_shape):
    """`add_bias` (on a CPU `_cpu_add_bias`): y + bias in y's dtype; y's gradient passes through,
    the (float32) bias's is the float32 sum of the cotangent over y's leading axes (to float32
    rounding, in bfloat16 runs too), for a layer's bias and for one per head (biased attention's
    content bias)."""
    from flax_whisper.layers import add_bias

    rng = np.random.default_rng(4)
    y = jnp.asarray(rng.standard_normal((3, 200, *bias_shape)), dtype)
    bias = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((3, 200, *bias_shape)), dtype)
    out, pullback = jax.vjp(add_bias, y, bias)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(y + bias.astype(dtype)))
    grad_y, grad_bias = pullback(cotangent)
    assert grad_y.dtype == dtype and grad_bias.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(grad_y), np.asarray(cotangent))
    exact = np.asarray(cotangent.astype(jnp.float32), np.float64).sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(grad_bias), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_position_rows_gradient_is_the_batch_sum(dtype):
    """`layers._add_rows` (what `add_positions` runs off a CPU): x + rows; x's gradient passes
    through, the rows' is the cotangent summed over the batch (as a product with ones, accumulated
    in float32), the value and both gradients of autodiff's broadcast add to float32 rounding."""
    from flax_whisper.layers import _add_rows

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((5, 7, 16)), dtype)
    rows = jnp.asarray(rng.standard_normal((7, 16)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((5, 7, 16)), dtype)
    out, pullback = jax.vjp(_add_rows, x, rows)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x + rows, np.float32))
    grad_x, grad_rows = pullback(cotangent)
    assert grad_x.dtype == dtype and grad_rows.dtype == dtype and grad_rows.shape == rows.shape
    np.testing.assert_array_equal(np.asarray(grad_x, np.float32), np.asarray(cotangent, np.float32))
    exact = np.asarray(cotangent, np.float64).sum(axis=0)
    rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(grad_rows, np.float64), exact, rtol=rtol, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="how XLA:CPU reduces bfloat16")
def test_a_bfloat16_bias_gradient_is_one_reduction_on_a_cpu():
    """Autodiff of a bias added in bfloat16 after a product: XLA:CPU sums the gradient through a
    `reduce-window` tree (48 ms for one MLP bias of a `tiny` step at batch 4, against about 1 ms
    for the sum alone); `add_bias`'s float32 sum (`_cpu_add_bias`) compiles to none."""
    from flax_whisper.layers import _cpu_matmul, add_bias

    x = jax.ShapeDtypeStruct((2, 256, 64), jnp.bfloat16)
    kernel, bias = jax.ShapeDtypeStruct((64, 96), jnp.float32), jax.ShapeDtypeStruct((96,), jnp.float32)

    def windows(plus):
        def loss(x, kernel, bias):
            return jnp.sum(jax.nn.gelu(plus(_cpu_matmul(x, kernel.astype(x.dtype)), bias)).astype(jnp.float32))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kernel, bias).compile()
        return compiled.as_text().count(" reduce-window(")

    assert windows(add_bias) == 0
    assert windows(lambda y, bias: y + bias.astype(y.dtype)) >= 1


def test_the_cpu_training_step_computes_no_weight_gradient_as_a_row_contracting_product(monkeypatch):
    """Every `Linear` of the model multiplies through `layers.matmul`: the compiled float32 training
    step (both stacks, cross-entropy, AdamW) holds no 2-D product that contracts its left operand's
    rows, the form XLA:CPU leaves to Eigen; with `matmul` replaced by a plain `x @ kernel`, the same
    step holds one per kernel gradient (an encoder layer's four projections and two MLP layers, a
    decoder layer's eight projections and two MLP layers)."""
    from flax_whisper import layers

    config, model_config = TrainConfig(warmup_steps=0), tiny_config(unroll_layers=True)
    mel, labels = random_batch(model_config, 2, 32, 8, seed=0)
    batch = {"mel": jnp.asarray(mel), "labels": jnp.asarray(labels)}

    def compiled_step():
        state, step = step_function(config, model_config)
        return step.lower(state, batch).compile()

    assert row_contracting_products(compiled_step()) == 0
    monkeypatch.setattr(layers, "matmul", lambda x, kernel: x @ kernel)
    assert row_contracting_products(compiled_step()) == 6 * model_config.n_audio_layer + 10 * model_config.n_text_layer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_token_nll_is_the_log_softmax_and_keeps_no_logits(dtype):
    """The loss's vocabulary cross-entropy (`token_nll`) against autodiff of the log-softmax of
    float32 logits, with table padding rows and ignored labels: the values to float32 rounding,
    the gradients of x and the table too in float32 and within the cotangent's rounding in
    bfloat16 (their dtypes the inputs'); and what it saves for the backward pass holds no
    (B, T, rows) array."""
    from flax_whisper.layers import _token_nll_forward, token_nll

    rng = np.random.default_rng(0)
    n_vocab, rows = 37, 40
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), dtype)
    table = jnp.asarray(rng.standard_normal((rows, 16)) * 0.3, dtype)
    labels = jnp.asarray(rng.integers(0, n_vocab, (2, 5)), jnp.int32).at[1, 3:].set(-100)
    weights = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)

    def reference(x, table):  # float32 inputs
        logits = jnp.where(jnp.arange(rows) < n_vocab, jnp.einsum("btd,vd->btv", x, table), -jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(labels >= 0, -picked, 0.0)

    wide = [a.astype(jnp.float32) for a in (x, table)]
    got = token_nll(x, table, labels, n_vocab)
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(got, reference(*wide), rtol=1e-5, atol=1e-6)
    assert float(got[1, 3:].max()) == 0.0 and float(got[0].min()) > 0
    ours = jax.grad(lambda a, b: jnp.sum(token_nll(a, b, labels, n_vocab) * weights), argnums=(0, 1))(x, table)
    exact = jax.grad(lambda a, b: jnp.sum(reference(a, b) * weights), argnums=(0, 1))(*wide)
    for grad, want, like in zip(ours, exact, (x, table), strict=True):
        assert grad.dtype == like.dtype
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(atol=2e-2 * float(jnp.abs(want).max()))
        np.testing.assert_allclose(grad.astype(jnp.float32), want, **tolerance)
    assert float(jnp.abs(ours[1][n_vocab:].astype(jnp.float32)).max()) == 0.0  # padding rows learn nothing
    _, saved = _token_nll_forward(x, table, labels, n_vocab)
    assert [a.shape for a in saved] == [x.shape, table.shape, labels.shape, labels.shape]


@pytest.mark.parametrize("backend", ["cpu", "gpu"], ids=["as_on_a_cpu", "barrier_as_on_a_gpu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "group_rms"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_norms_hand_written_backward_is_autodiffs_and_keeps_no_float32_copy(norm, dtype, backend, monkeypatch):
    """The norms' custom backward pass (`normalize`) against autodiff of the textbook formulas
    computed in float32 (x upcast, the result cast back to x's dtype), with a scale and bias far
    from 1 and 0: values and the gradients of x, scale and bias to float32
    rounding (bfloat16 x: its gradient within bfloat16's rounding), dtypes kept; what the
    forward saves is x in its own dtype and float32 statistics per row (and group). Also as traced
    for a GPU, where the saved statistics pass an optimisation barrier."""
    from flax_whisper import layers
    from flax_whisper.layers import _normalize_forward, normalize

    monkeypatch.setattr(layers.jax, "default_backend", lambda: backend)

    rng = np.random.default_rng(1)
    d, groups = 16, {"layernorm": 1, "rmsnorm": 1, "group_rms": 4}[norm]
    x = jnp.asarray(rng.standard_normal((2, 5, d)) * 3 + 1, dtype)
    scale = jnp.asarray(rng.standard_normal(d) + 1, jnp.float32)
    bias = None if norm == "rmsnorm" else jnp.asarray(rng.standard_normal(d), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 5, d)), jnp.float32)

    def reference(x, scale, bias):  # the formulas of the model contract, in float32
        grouped = x.astype(jnp.float32).reshape(2, 5, groups, d // groups)
        if norm == "layernorm":
            centred = grouped - grouped.mean(-1, keepdims=True)
            y = centred / jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + 1e-5)
        else:
            y = grouped / jnp.sqrt(jnp.mean(grouped**2, -1, keepdims=True) + 1e-6)
        y = y.reshape(x.shape) * scale
        return (y if bias is None else y + bias).astype(x.dtype)

    center, eps = norm == "layernorm", 1e-5 if norm == "layernorm" else 1e-6

    def ours(x, scale, bias):
        return normalize(x, scale, bias, eps, groups, center)

    got = ours(x, scale, bias)
    assert got.dtype == dtype
    want = reference(x, scale, bias).astype(jnp.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # at most one bfloat16 rounding step apart
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2**-7, atol=0)
    argnums = (0, 1) if bias is None else (0, 1, 2)
    mine = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * weights), argnums)(x, scale, bias)
    exact = jax.grad(lambda *a: jnp.sum(reference(*a).astype(jnp.float32) * weights), argnums)(x, scale, bias)
    for grad, want, like in zip(mine, exact, (x, scale, bias), strict=False):
        assert grad.dtype == like.dtype and grad.shape == like.shape
        if dtype == jnp.float32 or like is not x:
            np.testing.assert_allclose(grad.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-4, atol=1e-4)
        else:
            bound = 1e-2 * float(jnp.abs(want.astype(jnp.float32)).max())
            np.testing.assert_allclose(grad.astype(jnp.float32), want.astype(jnp.float32), atol=bound)
    _, saved = _normalize_forward(x, scale, bias, eps, groups, center)
    kept, *rest = jax.tree.leaves(saved)
    assert kept.dtype == dtype and kept.shape == x.shape  # x itself
    assert all(a.dtype == jnp.float32 and a.size <= 2 * 5 * max(d, groups) for a in rest)  # scale, bias, statistics


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "group_rms"])
def test_a_one_row_norm_traced_for_a_gpu_is_the_same_norm(norm, monkeypatch):
    """Off a CPU, a norm of one row (decoding at batch 1) runs over that row and a row of zeros
    (XLA's GPU normalisation fusion takes two rows or more): its values, its gradients and what
    it saves for the backward pass are those of the row alone, as a CPU computes them."""
    from flax_whisper import layers
    from flax_whisper.layers import _normalize_forward, normalize

    rng = np.random.default_rng(2)
    d, groups, center = 16, {"layernorm": 1, "rmsnorm": 1, "group_rms": 4}[norm], norm == "layernorm"
    x = jnp.asarray(rng.standard_normal((1, 1, d)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(d) + 1, jnp.float32)
    bias = None if norm == "rmsnorm" else jnp.asarray(rng.standard_normal(d), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((1, 1, d)), jnp.float32)

    def run(backend):
        monkeypatch.setattr(layers.jax, "default_backend", lambda: backend)
        value = normalize(x, scale, bias, 1e-5, groups, center)
        loss = lambda *a: jnp.sum(normalize(*a, 1e-5, groups, center) * weights)  # noqa: E731
        grads = jax.grad(loss, (0, 1) if bias is None else (0, 1, 2))(x, scale, bias)
        return value, grads, _normalize_forward(x, scale, bias, 1e-5, groups, center)[1]

    (value, grads, saved), (want, want_grads, want_saved) = run("gpu"), run("cpu")
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [None if a is None else a.shape for a in saved] == [None if a is None else a.shape for a in want_saved]
    for got, expected in zip(jax.tree.leaves(saved), jax.tree.leaves(want_saved), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gelu_backward_is_the_exact_derivative_and_keeps_only_its_input(dtype):
    """GELU's hand-written backward against autodiff of x * Phi(x) (the normal CDF from erf) in
    float64 on the same inputs, over the range where the derivative changes sign; the forward is
    exact GELU; what it saves is the input alone."""
    from flax_whisper.layers import _gelu_forward, gelu

    x = jnp.asarray(np.linspace(-6, 6, 97), dtype)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(97), jnp.float32)
    wide = np.asarray(x.astype(jnp.float32), np.float64)
    with jax.enable_x64():
        exact = jax.grad(lambda a: jnp.sum(a * 0.5 * (1 + jax.scipy.special.erf(a / np.sqrt(2))) * weights))(
            jnp.asarray(wide)
        )
        value = wide * 0.5 * (1 + np.asarray(jax.scipy.special.erf(jnp.asarray(wide) / np.sqrt(2))))
    got = jax.grad(lambda a: jnp.sum(gelu(a).astype(jnp.float32) * weights))(x)
    assert got.dtype == dtype
    rounding = 1e-6 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), exact, rtol=rounding, atol=rounding * 2)
    np.testing.assert_allclose(np.asarray(gelu(x).astype(jnp.float32)), value, rtol=rounding * 2, atol=rounding)
    _, saved = _gelu_forward(x)
    assert saved.shape == x.shape and saved.dtype == dtype
