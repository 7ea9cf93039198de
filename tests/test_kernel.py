"""The attention kernel: every implementation computes what the `Mask` says, in both frameworks.

The reference here is a direct float64 NumPy evaluation of the definition (scores, a mask built
from positions by two nested loops, softmax), independent of both kernels.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import product_operand_dtypes

import flax_whisper.kernel as fk
import torch_ref.kernel as tk

MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "band": dict(window=2),
    "causal_band": dict(causal=True, window=2),
    "prefix": dict(prefix=3),
    "causal_prefix": dict(causal=True, prefix=3),
}


def reference(q, k, v, causal=False, window=None, prefix=0, offset=0, scale=0.5):
    """float64: q (B, T, H, dh), k, v (B, S, H, dh) -> (B, T, H, dh) and lse (B, T, H)."""
    t, s = q.shape[1], k.shape[1]
    ok = np.zeros((t, s), bool)
    for i in range(t):
        for j in range(s):
            if j < prefix:
                ok[i, j] = True
                continue
            qp, kp = offset + i, j - prefix
            seen = not causal or kp <= qp
            if window is not None:
                seen = seen and qp - kp <= window and kp - qp <= (0 if causal else window)
            ok[i, j] = seen
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    logits = np.where(ok, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    weights = np.exp(logits - lse[..., None])
    return np.einsum("bhts,bshd->bthd", weights, v), lse.transpose(0, 2, 1)


def inputs(t: int, s: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in ((2, t, 3, 8), (2, s, 3, 8), (2, s, 3, 8))]


@pytest.mark.parametrize("implementation", ["xla", "chunked", "einsum"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_flax_implementations_compute_the_mask(implementation, name, monkeypatch):
    monkeypatch.setattr(fk, "CHUNK", 4)  # several blocks and a padded last one at this size
    mask = MASKS[name]
    q, k, v = inputs(7, 7 + mask.get("prefix", 0))
    expected, lse = reference(q, k, v, **mask)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    y, got_lse = fk.attend(*args, fk.Mask(**mask), scale=0.5, implementation=implementation, return_lse=True)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)


@pytest.mark.parametrize("implementation", ["auto", "einsum"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_torch_implementations_compute_the_mask(implementation, name):
    mask = MASKS[name]
    q, k, v = inputs(7, 7 + mask.get("prefix", 0))
    expected, lse = reference(q, k, v, **mask)
    args = [torch.from_numpy(x).float() for x in (q, k, v)]
    y = tk.attend(*args, tk.Mask(**mask), scale=0.5, implementation=implementation)
    np.testing.assert_allclose(y.numpy(), expected, atol=2e-6)
    _, got_lse = tk.attend(*args, tk.Mask(**mask), scale=0.5, implementation=implementation, return_lse=True)
    np.testing.assert_allclose(got_lse.numpy(), lse, atol=2e-6)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "einsum"])
@pytest.mark.parametrize("name", ["causal", "causal_band", "causal_prefix"])
def test_queries_after_a_cache_offset_static_and_traced(implementation, name, monkeypatch):
    """Three new queries after five cached positions, against a cache of capacity 12 (unwritten
    slots must stay hidden); the offset given as an int and traced inside jit."""
    monkeypatch.setattr(fk, "CHUNK", 2)
    mask = MASKS[name]
    prefix = mask.get("prefix", 0)
    q, k, v = inputs(3, prefix + 12, seed=1)
    expected, _ = reference(q, k, v, offset=5, **mask)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    spec = fk.Mask(**mask)
    static = fk.attend(*args, spec, scale=0.5, offset=5, implementation=implementation)
    traced = jax.jit(lambda o: fk.attend(*args, spec, scale=0.5, offset=o, implementation=implementation))(5)
    for y in (static, traced):
        np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    torch_y = tk.attend(*[torch.from_numpy(x).float() for x in (q, k, v)], tk.Mask(**mask), scale=0.5, offset=5)
    np.testing.assert_allclose(torch_y.numpy(), expected, atol=2e-6)


def test_a_learned_temperature_is_folded_into_the_queries():
    q, k, v = inputs(5, 5, seed=2)
    expected, _ = reference(q, k, v, causal=True, scale=0.3)
    flax_y = fk.attend(*[jnp.asarray(x, jnp.float32) for x in (q, k, v)], fk.Mask(causal=True), scale=jnp.float32(0.3))
    torch_y = tk.attend(
        *[torch.from_numpy(x).float() for x in (q, k, v)], tk.Mask(causal=True), scale=torch.tensor(0.3)
    )
    np.testing.assert_allclose(np.asarray(flax_y), expected, atol=2e-6)
    np.testing.assert_allclose(torch_y.numpy(), expected, atol=2e-6)


def test_bfloat16_inputs_keep_float32_scores():
    """Scores and softmax in float32 (contract 4): bf16 inputs give the float32 answer to bf16 rounding."""
    q, k, v = inputs(64, 64, seed=3)
    expected, _ = reference(q, k, v, causal=True)
    for implementation in ("xla", "chunked", "einsum"):
        y = fk.attend(*[jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)], fk.Mask(causal=True), scale=0.5,
                      implementation=implementation)  # fmt: skip
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)


def test_auto_on_a_gpu_takes_xla_for_one_query_and_cudnn_for_more(monkeypatch):
    """The choice `auto` makes on a GPU (decided without one: only the backend's name is read).
    A decoding step (one query over a cache) goes to XLA, whose kernels for one query row are
    small, rather than to cuDNN's flash kernel and its fixed cost per call; longer inputs that
    cuDNN can express go to cuDNN, a symmetric band too where it is longer than twice its
    window (`_band_as_causal_window`); float32 goes to XLA."""
    monkeypatch.setattr(fk.jax, "default_backend", lambda: "gpu")
    one = jnp.zeros((2, 1, 4, 64), jnp.bfloat16)
    many = jnp.zeros((2, 128, 4, 64), jnp.bfloat16)
    causal = fk.Mask(causal=True)
    assert fk.choose("auto", one, 64, causal, jnp.int32(40), None) == "xla"  # a cached self-attention step
    assert fk.choose("auto", one, 1500, fk.Mask(), 0, None) == "xla"  # a step's cross-attention
    assert fk.choose("auto", many, 128, causal, 0, None) == "cudnn"  # training, a prompt
    assert fk.choose("auto", many, 1500, fk.Mask(), 0, None) == "cudnn"  # the encoder
    assert fk.choose("auto", many.astype(jnp.float32), 128, causal, 0, None) == "xla"
    assert fk.choose("auto", many, 128, fk.Mask(window=8), 0, None) == "cudnn"  # an encoder's band
    assert fk.choose("auto", many[:, :16], 16, fk.Mask(window=8), 0, None) == "xla"  # shorter than 2w + 1
    assert fk.choose("cudnn", one, 64, causal, jnp.int32(40), None) == "cudnn"  # still there when asked for


def test_auto_on_a_tpu_takes_splash_for_queries_from_position_zero(monkeypatch):
    """The choice `auto` makes on a TPU (decided without one): Pallas' flash kernel wherever the
    mask is known when tracing (queries from position 0: training, the encoder, a prompt written
    at the start of a cache), XLA's op for a decoding step after a traced offset, the
    materialised softmax under attention dropout. Asked for, `splash` refuses a traced offset;
    asked for the log-sum-exp (memory write-back), it gives the materialised softmax's."""
    from flax import nnx

    monkeypatch.setattr(fk.jax, "default_backend", lambda: "tpu")
    one = jnp.zeros((2, 1, 4, 64), jnp.bfloat16)
    many = jnp.zeros((2, 128, 4, 64), jnp.bfloat16)
    causal = fk.Mask(causal=True)
    assert fk.choose("auto", many, 128, causal, 0, None) == "splash"  # training, a prompt
    assert fk.choose("auto", many, 1500, fk.Mask(), 0, None) == "splash"  # the encoder, cross-attention
    assert fk.choose("auto", many, 128, fk.Mask(window=8), 0, None) == "splash"  # hybrid's band
    assert fk.choose("auto", many.astype(jnp.float32), 136, fk.Mask(causal=True, prefix=8), 0, None) == "splash"
    assert fk.choose("auto", one, 64, causal, jnp.int32(40), None) == "xla"  # a cached step
    assert fk.choose("auto", one, 1500, fk.Mask(), 0, None) == "xla"  # a step's cross-attention
    assert fk.choose("auto", many, 128, causal, 0, nnx.Dropout(0.1, rngs=nnx.Rngs(0))) == "einsum"
    with pytest.raises(ValueError, match="needs queries from position 0"):
        fk.choose("splash", one, 64, causal, jnp.int32(40), None)
    mask = MASKS["causal_prefix"]
    q, k, v = inputs(7, 10, seed=3)
    expected, lse = reference(q, k, v, **mask)
    y, got_lse = fk.attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), fk.Mask(**mask), scale=0.5,
                           implementation="splash", return_lse=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)


# Pallas interprets the TPU kernel here, a few seconds a case: the main suite takes two masks.
@pytest.mark.parametrize(
    "name", [n if n in ("band", "causal_prefix") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(MASKS)]
)
def test_splash_computes_the_mask_and_its_gradient(name):
    """Pallas' TPU flash kernel (splash attention), interpreted on this CPU, queries and keys
    padded to one tile: the float64 reference's outputs, and the gradients of the materialised
    softmax's autodiff."""
    mask = fk.Mask(**MASKS[name])
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs(7, 10 if mask.prefix else 7, seed=4))
    expected, _ = reference(*(np.asarray(x, np.float64) for x in (q, k, v)), **MASKS[name])

    def loss(implementation):
        return lambda *a: jnp.sum(jnp.sin(fk.attend(*a, mask, scale=0.5, implementation=implementation)))

    np.testing.assert_allclose(
        np.asarray(fk.attend(q, k, v, mask, scale=0.5, implementation="splash")), expected, atol=2e-6
    )
    splash = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(splash, dense, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.slow
def test_splash_over_tiles_a_band_never_sees():
    """A band over 300 positions in tiles of 128 (three a side, the last padded): the first
    queries' tile of the last keys holds nothing the band sees (the kernel skips such tiles), and
    the outputs are the reference's."""
    q, k, v = inputs(300, 300, seed=5)
    expected, _ = reference(q, k, v, window=2)
    args = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    y = fk.attend(*args, fk.Mask(window=2), scale=0.5, implementation="splash")
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)


def test_auto_chooses_by_backend_size_and_dropout():
    small = jnp.zeros((1, 8, 2, 4))
    long = jnp.zeros((1, 1024, 4, 4))
    assert fk.choose("auto", small, 8, fk.Mask(), 0, None) == "einsum"  # this machine is a CPU
    assert fk.choose("auto", long, 1024, fk.Mask(), 0, None) == "chunked"
    assert fk.choose("xla", long, 1024, fk.Mask(), 0, None) == "xla"
    band = fk.Mask(window=64)  # hybrid's local branch over an encoder: blocks of the band
    assert fk.choose("auto", long, 1024, band, 0, None) == "xla" and fk.banded_applies(band, 1024, 1024, 0)
    assert fk.choose("auto", long[:, :128], 128, band, 0, None) == "einsum"  # the band spans the sequence
    from flax import nnx

    dropping = nnx.Dropout(0.1, rngs=nnx.Rngs(0))
    assert fk.choose("auto", long, 1024, fk.Mask(), 0, dropping) == "einsum"
    with pytest.raises(ValueError, match="needs bfloat16/float16 inputs"):
        fk.choose("cudnn", small, 8, fk.Mask(), 0, None)
    with pytest.raises(ValueError, match="not one of"):
        fk.choose("flash", small, 8, fk.Mask(), 0, None)
    half = small.astype(jnp.bfloat16)
    assert fk.cudnn_expressible(half, fk.Mask(window=3), 0)  # a symmetric band over 8 > 2 x 3 positions
    assert not fk.cudnn_expressible(half, fk.Mask(window=4), 0)  # 8 = 2 x 4: too short
    assert not fk.cudnn_expressible(half, fk.Mask(window=3), 0, n_keys=12)  # not a self-attention
    one = jnp.zeros((1, 1, 2, 4), jnp.bfloat16)
    assert not fk.cudnn_expressible(one, fk.Mask(window=3), jnp.int32(5))  # nor after a cache offset
    assert fk.cudnn_expressible(half, fk.Mask(causal=True, window=3), 0)
    assert fk.cudnn_expressible(one, fk.Mask(causal=True), jnp.int32(5))  # a cached step: key lengths
    assert fk.cudnn_expressible(half, fk.Mask(prefix=2), 0)  # memory slots with nothing masked: more keys
    # Memory slots before causal keys: with as many queries in front, the plain causal mask;
    # not for a cached step, whose key lengths would have to count the slots.
    assert fk.cudnn_expressible(half, fk.Mask(causal=True, prefix=2), 0)
    assert not fk.cudnn_expressible(one, fk.Mask(causal=True, prefix=2), jnp.int32(5))
    assert not fk.cudnn_expressible(half, fk.Mask(causal=True, window=3, prefix=2), 0)
    assert fk.kv_layout() == fk.cache_layout() == "bhsd"  # heads-major keys on a CPU
    assert fk.cross_kv_layout() == "bhds"  # and cross-attention's keys transposed


@pytest.mark.parametrize("layout", ["bhsd", "bhds", "bhdv"])
@pytest.mark.parametrize("implementation", ["xla", "chunked", "einsum"])
def test_heads_major_keys_give_the_same_attention(implementation, layout, monkeypatch):
    """Keys and values (B, H, S, dh), or (`bhds`, cross-attention's cache on a CPU) keys
    (B, H, dh, S), or (`bhdv`, decoding caches on a GPU) values (B, H, dh, S): every path gives
    the sequence-major layout's attention, and `seq_axis` finds each one's sequence."""
    monkeypatch.setattr(fk, "CHUNK", 4)
    q, k, v = inputs(7, 10, seed=4)
    expected, lse = reference(q, k, v, causal=True, prefix=3)
    keys = k.transpose(0, 2, 3, 1) if layout == "bhds" else k.transpose(0, 2, 1, 3)
    values = v.transpose(0, 2, 3, 1) if layout == "bhdv" else v.transpose(0, 2, 1, 3)
    heads_major = [jnp.asarray(x, jnp.float32) for x in (keys, values)]
    assert keys.shape[fk.seq_axis(layout)] == values.shape[fk.seq_axis(layout, values=True)] == 10
    for x, stored in zip((k, v), heads_major, strict=True):
        np.testing.assert_array_equal(fk.to_layout(jnp.asarray(x, jnp.float32), layout, keys=x is k), stored)
    y, got_lse = fk.attend(jnp.asarray(q, jnp.float32), *heads_major, fk.Mask(causal=True, prefix=3), scale=0.5,
                           layout=layout, implementation=implementation, return_lse=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)


@pytest.mark.parametrize("block", [3, 4])
@pytest.mark.parametrize("mask", [dict(window=3), dict(window=2), dict(causal=True, window=3)], ids=str)
def test_a_band_in_blocks_computes_the_mask_and_its_gradient(block, mask, monkeypatch):
    """`xla` takes a band self-attention in blocks of the band (`_banded`): 23 positions in blocks of
    3 or 4 (a padded last one), forward, log-sum-exp and gradients as the materialised softmax."""
    monkeypatch.setattr(fk, "band_block", lambda m: max(m.window, block))
    spec = fk.Mask(**mask)
    assert fk.banded_applies(spec, 23, 23, 0) and not fk.banded_applies(spec, 1, 23, jnp.int32(4))
    q, k, v = inputs(23, 23, seed=5)
    expected, lse = reference(q, k, v, **mask)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    y, got_lse = fk.attend(*args, spec, scale=0.5, implementation="xla", return_lse=True)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)
    heads_major = [jnp.swapaxes(x, 1, 2) for x in args[1:]]  # the CPU's key layout
    y = fk.attend(args[0], *heads_major, spec, scale=0.5, layout="bhsd", implementation="xla")
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)

    def loss(implementation):
        return lambda *a: jnp.sum(jnp.sin(fk.attend(*a, spec, scale=0.5, implementation=implementation)))

    banded = jax.grad(loss("xla"), argnums=(0, 1, 2))(*args)
    dense = jax.grad(loss("einsum"), argnums=(0, 1, 2))(*args)
    for got, want in zip(banded, dense, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("n_keys", [10, 14])
def test_memory_slots_before_causal_keys_as_queries_in_front(n_keys):
    """The fused op takes memory slots before causal keys as the plain causal mask over queries
    with `prefix` zero rows put in front (their outputs dropped): training (3 slots, 7 queries,
    10 keys) and a prompt at the start of a cache of capacity 11 (14 keys, the unwritten ones
    hidden). Output, log-sum-exp and every gradient, through both, as the reference and the
    materialised softmax's autodiff."""
    mask = fk.Mask(causal=True, prefix=3)
    q, k, v = inputs(7, n_keys, seed=7)
    expected, lse = reference(q, k, v, causal=True, prefix=3)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    y, got_lse = fk.attend(*args, mask, scale=0.5, implementation="xla", return_lse=True)
    assert y.shape == (2, 7, 3, 8) and got_lse.shape == (2, 7, 3)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)

    def loss(implementation):
        def f(q, k, v):
            y, lse = fk.attend(q, k, v, mask, scale=0.5, implementation=implementation, return_lse=True)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(jax.lax.stop_gradient(lse)))

        return jax.grad(f, argnums=(0, 1, 2))

    for got, want in zip(loss("xla")(*args), loss("einsum")(*args), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("window", [2, 5])
def test_a_symmetric_band_as_a_causal_window_over_moved_queries(window):
    """cuDNN takes causal left windows only; a symmetric band reaches it as one over queries moved
    `window` rows later behind zero rows, the last `window` queries apart. The same call through
    XLA's fused op here: 11 positions, output, log-sum-exp and every gradient as the reference
    and the materialised softmax's autodiff."""
    mask = fk.Mask(window=window)
    assert fk.symmetric_band_applies(mask, 11, 11, 0)
    q, k, v = inputs(11, 11, seed=8)
    expected, lse = reference(q, k, v, window=window)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    y, got_lse = fk._band_as_causal_window(*args, mask, 0.5, "xla", return_lse=True)
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got_lse), lse, atol=2e-6)

    def banded(*a):
        return jnp.sum(jnp.sin(fk._band_as_causal_window(*a, mask, 0.5, "xla", return_lse=False)))

    def dense(*a):
        return jnp.sum(jnp.sin(fk.attend(*a, mask, scale=0.5, implementation="einsum")))

    for got, want in zip(jax.grad(banded, (0, 1, 2))(*args), jax.grad(dense, (0, 1, 2))(*args), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_chunked_gradients_are_autodiff_of_the_materialised_softmax(name, monkeypatch):
    """`chunked` has a hand-written backward (each block's weights rebuilt from the saved
    log-sum-exp): through the outputs and the log-sum-exp, after a cache offset, in blocks of 3
    with a padded last one, its gradients are those of `einsum`'s autodiff."""
    monkeypatch.setattr(fk, "CHUNK", 3)
    mask = fk.Mask(**MASKS[name])
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs(7, 9 + mask.prefix, seed=6))
    offset = 2 if mask.causal else 0

    def loss(implementation):
        def f(q, k, v):
            y, lse = fk.attend(q, k, v, mask, scale=0.5, offset=offset, implementation=implementation, return_lse=True)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(lse))

        return jax.grad(f, argnums=(0, 1, 2))

    chunked, dense = loss("chunked")(q, k, v), loss("einsum")(q, k, v)
    for got, want in zip(chunked, dense, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="chunked is XLA:CPU's path")
def test_chunked_bfloat16_gradients_multiply_bfloat16_operands(monkeypatch):
    """In bfloat16, the chunked backward multiplies bfloat16 operands into float32 (the rebuilt
    weights and the scores' gradient rounded to bfloat16 for their products, as flash kernels on
    GPUs do): every product of the compiled gradient takes bfloat16 operands, and the gradients
    stay within bfloat16 rounding of float32 autodiff of the materialised softmax on the same
    inputs."""
    monkeypatch.setattr(fk, "CHUNK", 16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs(40, 40, seed=7))

    def gradient(implementation):
        def f(q, k, v):
            y = fk.attend(q, k, v, fk.Mask(causal=True), scale=0.5, implementation=implementation)
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    chunked = gradient("chunked")
    assert set(product_operand_dtypes(chunked.lower(q, k, v).compile().as_text())) == {("bf16", "bf16")}
    want = gradient("einsum")(*(x.astype(jnp.float32) for x in (q, k, v)))
    for got, exact in zip(chunked(q, k, v), want, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=2**-6 * float(np.abs(exact).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="chunked is XLA:CPU's path")
def test_chunked_bfloat16_weights_are_rounded_in_the_pass_that_makes_them(monkeypatch):
    """In bfloat16 the chunked forward and backward write each block's `(c, S)` weights in
    bfloat16 from the exponential that makes them: XLA:CPU ran a separate float32-to-bfloat16
    pass over them at a fraction of the exponential's speed (a tenth of the bfloat16 `tiny` step).
    No array of a block's weights' shape comes out of a pass that only converts."""
    monkeypatch.setattr(fk, "CHUNK", 16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs(32, 48, seed=3))

    def loss(q, k, v):
        y = fk.attend(q, k, v, fk.Mask(), scale=0.5, implementation="chunked")
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    bodies, name = {}, None
    for line in text.splitlines():
        opened = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if opened:
            name, bodies[opened.group(1)] = opened.group(1), []
        elif name is not None:
            bodies[name].append(line)
    fused = set(re.findall(r"\bfusion\(.*calls=%([\w.\-]+)", text))
    made = [  # ops outside fused computations making a bfloat16 (c, S) or (S, c) array
        line
        for computation, lines in bodies.items()
        if computation not in fused
        for line in lines
        if re.search(r"= bf16\[(16,48|48,16)\]\{\S* (fusion|convert)\(", line)
    ]
    assert made, "no block of bfloat16 weights found"
    for line in made:
        called = re.search(r"\bfusion\(.*calls=%([\w.\-]+)", line)
        ops = set(re.findall(r"= \S+ ([\w\-]+)\(", "\n".join(bodies[called.group(1)]))) if called else {"convert"}
        assert ops - {"parameter", "convert", "bitcast"}, f"a pass that only converts: {line.strip()}"
