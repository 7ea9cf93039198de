"""Primitive layers of the Flax NNX model (model contract section 2), mirroring `torch_ref/layers.py`.

Layouts differ from torch where JAX convention does: Linear `kernel (in, out)` (torch `weight
(out, in)`, which a GPU's decoding copy holds: `prepare_products`), Conv1d NWC with `kernel (k,
in, out)` (torch NCW `(out, in, k)`), LayerNorm `scale` (torch `weight`), Embedding `embedding`
(torch `weight`). Numeric defaults are set explicitly to torch's: LayerNorm eps 1e-5, exact GELU.

Sharding is annotated, not decided, here: each weight carries the logical names of its axes
(`axes` metadata: "embed", "heads", "mlp", "vocab", and "layers" once stacked; None for an axis
never split), and `constrain` pins an activation's layout by the same kind of names. What the
names mean on a device mesh is a rules table of the training code (`train/sharding.py`); outside
`sharding_rules` the model runs unchanged. torch_ref has no counterpart: the annotations change
where arrays live, never what is computed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from whisper_config import ModelConfig

EMBEDDING_STD = 0.02
Axes = tuple[str | None, ...]  # logical axis names, one per dimension

# (logical axes, shape) -> a jax Sharding, or None to leave the array alone; set by `sharding_rules`.
_PLACEMENT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("placement", default=None)


@contextlib.contextmanager
def sharding_rules(placement: Callable[[Axes, tuple[int, ...]], jax.sharding.Sharding | None]):
    """Within this context (entered while a function is traced), `constrain` lays activations out
    as `placement(axes, shape)` says."""
    token = _PLACEMENT.set(placement)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def placed(axes: Axes, shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
    """The sharding `sharding_rules` give an activation of `shape` whose dimensions are named
    `axes`; None outside them."""
    placement = _PLACEMENT.get()
    return None if placement is None else placement(axes, shape)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """`x` with its sharding pinned to the one its logical `axes` map to under `sharding_rules`;
    `x` unchanged outside them."""
    sharding = placed(axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Buffer(nnx.Variable):
    """Non-trainable state kept in checkpoints (torch: a persistent buffer). Optimisers skip it."""


def is_traced(x) -> bool:
    """True inside `jit`/`grad` tracing, where values (not shapes) are unknown and cannot be checked."""
    return isinstance(x, jax.core.Tracer)


def host_offset(offset) -> int:
    """A cache offset as a Python int, or 0 while traced: bound checks then use lengths alone, and
    the fixed cache size enforces the rest."""
    return 0 if is_traced(offset) else int(offset)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., in) @ kernel (in, out), both in the compute dtype -> (..., out). What autodiff of
    `x @ kernel` computes everywhere; on a CPU through `_cpu_matmul`, whose kernel gradient XLA:CPU
    runs as one of its fast products, and whose bfloat16 products run at the CPU's bfloat16 rate."""
    return _cpu_matmul(x, kernel) if jax.default_backend() == "cpu" else x @ kernel


def cpu_fusion_fence(x: jax.Array) -> jax.Array:
    """x unchanged, as a boundary XLA:CPU's YNNPACK fusions do not cross (elsewhere, x itself).

    A float rounded to its own type's exponent and mantissa widths (`reduce_precision`, which
    YNNPACK's fusions do not take) is itself; `jax.lax.optimization_barrier` is gone before those
    fusions are made. Two places take it, each measured on the `tiny` encoder at batch 4:
    - before the encoder's final norm: with nothing after the last block but that norm, XLA:CPU
      fused the block's output projection, MLP and the norm into one library call (from about
      batch 4 of 1500 positions), slower than the separate products of every other block, and
      wrote GELU's three constants out as arrays of the MLP's hidden size for it;
    - before the MLP's first product: fused with the norm before it, that product ran at about
      166 GFLOP/s where the second, alone, ran at 197; the norm in a pass of its own costs less."""
    if jax.default_backend() != "cpu":
        return x
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` accumulated in float32 and rounded once to a's dtype: the accuracy of `a @ b` (for
    float32 operands the very same product), and for bfloat16 operands on a CPU with bfloat16
    dot-product instructions (AVX512-BF16) about twice its rate: XLA:CPU uses them only for a
    float32 result (`kernel.rounded_product` is the einsum form)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def _cpu_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` whose kernel gradient transposes the smaller of its two operands first.

    The kernel's gradient `x^T g` contracts the rows of both operands. XLA:CPU hands such a
    product (a transposed left operand) to Eigen rather than to YNNPACK, after a transposed copy
    of the cotangent, and in a training step Eigen's products ran slower, with the cores outside
    XLA's operations for most of 0.3 s of a `tiny` step of 3.6 s on a 2-core CPU. Here the smaller
    operand (`x`, or `g` for a layer that narrows) is transposed explicitly, behind an
    optimisation barrier that keeps XLA from folding the copy back into the product: one
    `(in, N) @ (N, out)` product, or `((out, N) @ (N, in))^T`, both of the form YNNPACK takes.
    Every product accumulates in float32 (`_product`): in bfloat16 runs, the CPU's bfloat16 ones."""
    return _product(x, kernel)


def _cpu_matmul_forward(x: jax.Array, kernel: jax.Array):
    return _product(x, kernel), (x, kernel)


def _transposed(a: jax.Array) -> jax.Array:
    """a (N, d) -> a^T (d, N), copied out in that order behind an optimisation barrier, so that
    XLA:CPU cannot fold the transpose back into the product that reads it. In float32 a barrier
    around `a.T` is enough; in bfloat16 XLA:CPU still gave that array the transposed layout and
    multiplied in float32 (a float32 copy of the operands, at a third of the bfloat16 rate on this
    project's CPU), so the transpose is written out flat and reshaped back, which only a copy in
    row order can give."""
    barrier = jax.lax.optimization_barrier
    if a.dtype == jnp.float32:
        return barrier(a.T)
    return barrier(a.T.reshape(-1)).reshape(a.shape[1], a.shape[0])


def _cpu_matmul_backward(saved, grad: jax.Array):
    x, kernel = saved
    rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # (N, in), (N, out)
    if rows.shape[1] > grads.shape[1]:  # a layer that narrows: ((out, N) @ (N, in))^T
        return _product(grad, kernel.T), jax.lax.optimization_barrier(_product(_transposed(grads), rows)).T
    return _product(grad, kernel.T), _product(_transposed(rows), grads)  # (in, N) @ (N, out)


_cpu_matmul.defvjp(_cpu_matmul_forward, _cpu_matmul_backward)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y (..., *bias.shape) + bias cast to y's dtype. What autodiff computes everywhere; on a CPU
    through `_cpu_add_bias`, whose bias gradient is one float32 sum."""
    return _cpu_add_bias(y, bias) if jax.default_backend() == "cpu" else y + bias.astype(y.dtype)


def add_positions(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x (B, T, d) + rows (T, d) cast to x's dtype: what autodiff computes; off a CPU through
    `_add_rows`, whose rows' gradient, the cotangent summed over the batch, is its product with a
    vector of ones. Given that sum as a reduction, XLA's GPU compiler laid the decoder's whole
    residual stream out batch-minor to make it a row reduction, with a transpose on both sides of
    every product and norm (the `small` step at batch 32 in XLA's program for an H200: 197
    transposes, 7.1 GB written; none with the product, one matrix-vector kernel)."""
    rows = rows.astype(x.dtype)
    return x + rows if jax.default_backend() == "cpu" else _add_rows(x, rows)


@jax.custom_vjp
def _add_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    return x + rows


def _add_rows_forward(x: jax.Array, rows: jax.Array):
    return _add_rows(x, rows), None


def _add_rows_backward(_, grad: jax.Array):
    ones = jnp.ones(grad.shape[:1], grad.dtype)
    return grad, jnp.einsum("b,btd->td", ones, grad, preferred_element_type=jnp.float32).astype(grad.dtype)


_add_rows.defvjp(_add_rows_forward, _add_rows_backward)


@jax.custom_vjp
def _cpu_add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` whose bias gradient sums the cotangent over y's leading axes in float32 (in
    bias's dtype). Of a bfloat16 cotangent after a product, autodiff's sum became an XLA:CPU
    `reduce-window` tree that took 48 ms for one MLP bias of a `tiny` step at batch 4 (about 1 ms
    as one sum)."""
    return y + bias.astype(y.dtype)


def _cpu_add_bias_forward(y: jax.Array, bias: jax.Array):
    return _cpu_add_bias(y, bias), bias  # for its shape and dtype


def _cpu_add_bias_backward(bias, grad: jax.Array):
    rows = grad.reshape(-1, *bias.shape)
    return grad, jnp.sum(rows, axis=0, dtype=jnp.float32).astype(bias.dtype)


_cpu_add_bias.defvjp(_cpu_add_bias_forward, _cpu_add_bias_backward)


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, kernel `(in, out)`; Xavier-uniform kernel, zero bias. `axes` names
    the kernel's (in, out) axes; the bias has the out axis. A decoding copy (`prepare_products`)
    may hold its kernel `(out, in)` instead (`transposed`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, axes: Axes = (None, None), rngs: nnx.Rngs
    ):
        self.out_features = out_features
        self.transposed = False
        init = jax.nn.initializers.xavier_uniform()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32), axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32), axes=axes[1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.product(x)
        return y if self.bias is None else add_bias(y, self.bias[...])

    def product(self, x: jax.Array) -> jax.Array:
        """x (..., in) -> x @ kernel (..., out) in x's dtype, without the bias."""
        kernel = self.kernel[...].astype(x.dtype)
        return jnp.einsum("...i,oi->...o", x, kernel) if self.transposed else matmul(x, kernel)

    def product_of_heads(self, x: jax.Array) -> jax.Array:
        """x (..., H, dh), the input's features split in heads (in = H dh) -> the product of the
        merged heads, x (..., in) @ kernel (..., out), in x's dtype, without the bias: the heads
        contracted where they lie, against the kernel viewed `(H, dh, out)` (or `(out, H, dh)`)."""
        kernel = self.kernel[...].astype(x.dtype)
        heads, width = x.shape[-2:]
        if self.transposed:
            return jnp.einsum("...hd,ohd->...o", x, kernel.reshape(-1, heads, width))
        return jnp.einsum("...hd,hdo->...o", x, kernel.reshape(heads, width, -1))


def transposes_decoding_kernels() -> bool:
    """Whether a decoding copy holds its kernels `(out, in)` (`prepare_products`): on a GPU. A
    decoding step's products there are vector-matrix ones below the size XLA hands to a GEMM: it
    multiplies and reduces, and only a reduction along each kernel row (a kernel `(out, in)`) takes
    the multiplication into the same kernel (with `(in, out)`, at batch 1, each product was a
    kernel writing the whole `(in, out)` matrix of products and one more reading it back)."""
    return jax.default_backend() == "gpu"


def prepare_products(module: nnx.Module, dtype: jnp.dtype) -> None:
    """In place, on a copy made for a decoding loop: every `Linear`'s kernel and bias (stacked
    ones too) cast once to the compute `dtype`, as each call would cast them, and the kernels laid
    out `(out, in)` where `transposes_decoding_kernels()`; the token table's output copy likewise
    (`Embedding.prepare_output`). The same products, without a cast of every weight at every step
    (on a GPU, a kernel per weight and step at batch 32)."""
    transpose = transposes_decoding_kernels()
    for _, child in list(nnx.iter_modules(module)):
        if isinstance(child, Embedding):
            child.prepare_output(dtype)
        if not isinstance(child, Linear) or (child.kernel.dtype == dtype and not transpose):
            continue  # nothing to cast or lay out: the copy keeps the very arrays
        kernel, axes = child.kernel[...].astype(dtype), child.kernel.get_metadata().get("axes")
        if transpose and not child.transposed:
            kernel, axes = jnp.swapaxes(kernel, -1, -2), None if axes is None else (*axes[:-2], axes[-1], axes[-2])
            child.transposed = True
        child.kernel = nnx.Param(kernel, axes=axes)
        if child.bias is not None:
            child.bias = nnx.Param(child.bias[...].astype(dtype), axes=child.bias.get_metadata().get("axes"))


class Conv1d(nnx.Module):
    """NWC convolution, kernel `(k, in, out)`; Kaiming-uniform (ReLU gain) kernel, zero bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.padding = padding
        init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
        kernel = init(rngs.params(), (kernel_size, in_features, out_features), jnp.float32)
        self.kernel = nnx.Param(kernel, axes=(None, None, "embed"))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32), axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, W, in) -> (B, W', out)"""
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return add_bias(y, self.bias[...])


class LayerNorm(nnx.Module):
    """LayerNorm with eps 1e-5 and float32 statistics; the result has the input's dtype."""

    def __init__(self, n_state: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32), axes=(None,))
        self.bias = nnx.Param(jnp.zeros((n_state,), jnp.float32), axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return normalize(x, self.scale[...], self.bias[...], self.eps, 1, True)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale`, eps 1e-6, float32 statistics."""

    def __init__(self, n_state: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32), axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return normalize(x, self.scale[...], None, self.eps, 1, False)


class GroupRMSNorm(nnx.Module):
    """The seeds' "GroupNorm (RMS)", per position: RMS-normalise each of `groups` channel groups,
    then `* scale + bias` per channel. Never across time."""

    def __init__(self, n_state: int, groups: int, eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((n_state,), jnp.float32), axes=(None,))
        self.bias = nnx.Param(jnp.zeros((n_state,), jnp.float32), axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d)"""
        return normalize(x, self.scale[...], self.bias[...], self.eps, self.groups, False)


def _statistics(x: jax.Array, eps: float, groups: int, center: bool):
    """x (..., d) -> its `groups` channel groups in float32 (..., G, d/G), each group's mean
    (..., G, 1; None unless `center`) and 1 / (root mean square about it + eps) (..., G, 1)."""
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, -1)
    mean = grouped.mean(-1, keepdims=True) if center else None
    centered = grouped if mean is None else grouped - mean
    return grouped, mean, jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, groups: int, center: bool):
    """x (..., d) in any dtype, scale (and bias, or None) (d,) float32 -> each of `groups` equal
    channel groups normalised with float32 statistics, `* scale + bias`, in x's dtype: LayerNorm
    (one group, `center`: minus the mean, over the standard deviation), RMSNorm and the seeds'
    group RMS norm (over the root mean square).

    Its backward pass keeps x (in its own dtype) and one or two float32 numbers per row and
    group, not the float32 (..., d) arrays autodiff would save; it normalises x again and gives
    the input's gradient in one pass, per group: (g - [mean(g)] - x̂ mean(g x̂)) / std with
    g = dy * scale (the mean of g only when centred)."""
    return _normalize_forward(x, scale, bias, eps, groups, center)[0]


def _normalize_forward(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, groups: int, center: bool):
    if jax.default_backend() != "cpu" and math.prod(x.shape[:-1]) == 1:
        # One row (decoding at batch 1): XLA's GPU normalisation fusion takes two rows or more,
        # and one row's reductions became scalar ones, a kernel each; a second row of zeros,
        # dropped after, makes the statistics and the normalisation one fusion.
        y, (_, _, _, mean, rstd) = _normalize_forward(
            jnp.pad(x.reshape(1, -1), ((0, 1), (0, 0))), scale, bias, eps, groups, center
        )
        stats = (*x.shape[:-1], groups, 1)
        mean = None if mean is None else mean[:1].reshape(stats)
        return y[:1].reshape(x.shape), (x, scale, bias, mean, rstd[:1].reshape(stats))
    grouped, mean, rstd = _statistics(x, eps, groups, center)
    normalized = (grouped if mean is None else grouped - mean) * rstd
    y = normalized.reshape(x.shape) * scale
    y = y if bias is None else y + bias
    if jax.default_backend() != "cpu":
        # Off a CPU the statistics are kept as computed: XLA would otherwise compute the mean
        # again inside the backward pass's fusions, and a fusion holding that row reduction cannot
        # also take the parameters' column sums, so it wrote the float32 (..., d) products of the
        # cotangent and x̂ for a second kernel to sum (147 MB a norm at batch 32 over 1,500 frames).
        mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    return y.astype(x.dtype), (x, scale, bias, mean, rstd)


def _normalize_backward(eps: float, groups: int, center: bool, saved, grad: jax.Array):
    x, scale, bias, mean, rstd = saved
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, -1)
    normalized = (grouped if mean is None else grouped - mean) * rstd  # (..., G, d/G)
    grad = grad.astype(jnp.float32)
    rows = tuple(range(grad.ndim - 1))
    grad_scale = jnp.sum(grad * normalized.reshape(x.shape), axis=rows).astype(scale.dtype)
    grad_bias = None if bias is None else jnp.sum(grad, axis=rows).astype(bias.dtype)
    g = (grad * scale).reshape(normalized.shape)
    mean_gx = (g * normalized).mean(-1, keepdims=True)
    if center:
        g = g - g.mean(-1, keepdims=True)
    grad_x = (g - normalized * mean_gx) * rstd
    return grad_x.reshape(x.shape).astype(x.dtype), grad_scale, grad_bias


normalize.defvjp(_normalize_forward, _normalize_backward)


@jax.custom_vjp
def float32_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """x (B, T, d), table (V, d), both in a 16-bit compute dtype -> logits (B, T, V) accumulated
    and returned in float32. The backward pass rounds the logits' float32 cotangent to the compute
    dtype before its two matmuls (accumulated in float32), as torch autocast's 16-bit logits do:
    16-bit matmuls at full rate, not float32 ones over the whole vocabulary."""
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


def _float32_logits_forward(x: jax.Array, table: jax.Array):
    return float32_logits(x, table), (x, table)


def _float32_logits_backward(saved, grad: jax.Array):
    x, table = saved
    grad = grad.astype(x.dtype)  # (B, T, V)
    grad_x = jnp.einsum("btv,vd->btd", grad, table, preferred_element_type=jnp.float32)
    grad_table = jnp.einsum("btv,btd->vd", grad, x, preferred_element_type=jnp.float32)
    return grad_x.astype(x.dtype), grad_table.astype(table.dtype)


float32_logits.defvjp(_float32_logits_forward, _float32_logits_backward)


LOGITS = ("batch", "length", "vocab_act")  # the logical axes of the output logits


def mask_padding_rows(logits: jax.Array, n_vocab: int) -> jax.Array:
    """logits (..., rows) with the rows from `n_vocab` on (table padding) at -inf."""
    if logits.shape[-1] == n_vocab:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < n_vocab, logits, -jnp.inf)


def vocab_logits(x: jax.Array, table: jax.Array, n_vocab: int) -> jax.Array:
    """x (B, T, d), table (rows, d) -> logits (B, T, rows) accumulated and returned in float32,
    the rows from `n_vocab` on (table padding) at -inf."""
    logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
    return mask_padding_rows(constrain(logits, LOGITS), n_vocab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_nll(x: jax.Array, table: jax.Array, labels: jax.Array, n_vocab: int) -> jax.Array:
    """x (B, T, d), table (rows, d), both in the compute dtype, labels (B, T) int (negative:
    ignored) -> each label's negative log-likelihood under softmax(`vocab_logits`) (B, T)
    float32, 0 where ignored.

    What the log-softmax of the logits gives, but its backward keeps no (B, T, rows) array from
    the forward pass: it saves x, the table and each position's log-sum-exp, computes the logits
    again, and writes their cotangent (softmax - one-hot) in the compute dtype straight away for
    its two matmuls (accumulated in float32), as `float32_logits` rounds it. (Jitted with its
    forward pass, XLA merges the two logits products into one and keeps its float32 result for
    the backward pass: the step's peak is where the forward pass ends and the backward begins,
    with the logits alive there either way.)"""
    return _token_nll_forward(x, table, labels, n_vocab)[0]


def _token_nll_forward(x: jax.Array, table: jax.Array, labels: jax.Array, n_vocab: int):
    logits = vocab_logits(x, table, n_vocab)  # (B, T, rows) float32
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    keep = labels >= 0
    picked = jnp.take_along_axis(logits, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(keep, lse - picked, 0.0), (x, table, labels, lse)


def _token_nll_backward(n_vocab: int, saved, grad: jax.Array):
    x, table, labels, lse = saved
    probs = jnp.exp(vocab_logits(x, table, n_vocab) - lse[..., None])  # (B, T, rows); padding rows 0
    one_hot = jnp.arange(table.shape[0]) == labels[..., None]  # an ignored (negative) label: none
    scale = jnp.where(labels >= 0, grad, 0.0)[..., None]
    grad_logits = constrain(((probs - one_hot) * scale).astype(x.dtype), LOGITS)
    grad_x = jnp.einsum("btv,vd->btd", grad_logits, table, preferred_element_type=jnp.float32)
    grad_table = jnp.einsum("btv,btd->vd", grad_logits, x, preferred_element_type=jnp.float32)
    return grad_x.astype(x.dtype), grad_table.astype(table.dtype), None


token_nll.defvjp(_token_nll_forward, _token_nll_backward)


class Embedding(nnx.Module):
    """Token table `(rows, d)`, normal(0, 0.02) init (std 1 would make tied logits huge). `rows`
    (default `n_vocab`) may exceed the vocabulary (`ModelConfig.padded_vocab`, so the table shards
    evenly): the extra rows start at zero, no token reads them, and `attend` masks their logits."""

    def __init__(self, n_vocab: int, n_state: int, rows: int | None = None, *, rngs: nnx.Rngs):
        rows = n_vocab if rows is None else rows
        self.n_vocab = n_vocab
        table = jax.nn.initializers.normal(EMBEDDING_STD)(rngs.params(), (n_vocab, n_state), jnp.float32)
        table = jnp.pad(table, ((0, rows - n_vocab), (0, 0)))
        self.embedding = nnx.Param(table, axes=("vocab", "embed"))
        self.output = nnx.data(None)  # a decoding copy's table in the compute dtype (`prepare_output`)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, T) int -> (B, T, d)"""
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output logits: x (B, T, d) in the compute dtype -> (B, T, rows), accumulated and
        returned in float32 (contract 5) whatever the precision; the padding rows' logits are -inf."""
        table = (self.embedding if self.output is None else self.output)[...].astype(x.dtype)
        matmul = functools.partial(jnp.einsum, "btd,vd->btv") if x.dtype == jnp.float32 else float32_logits
        return mask_padding_rows(matmul(x, table), self.n_vocab)  # (B, T, rows) float32

    def prepare_output(self, dtype: jnp.dtype) -> None:
        """In place, on a decoding copy: `attend` reads the table cast once to the compute `dtype`
        (the lookup keeps the stored table: tokens are embedded before the cast)."""
        if self.embedding.dtype != dtype:
            self.output = nnx.Variable(self.embedding[...].astype(dtype))

    def nll(self, x: jax.Array, labels: jax.Array) -> jax.Array:
        """x (B, T, d) in the compute dtype, labels (B, T) (negative: ignored) -> each label's
        negative log-likelihood under the tied logits (B, T) float32, 0 where ignored: the loss
        without a (B, T, rows) array kept for the backward pass (`token_nll`)."""
        return token_nll(x, self.embedding[...].astype(x.dtype), labels, self.n_vocab)


class MLP(nnx.Module):
    """`fc1 (d -> 4d) -> [norm (4d) if mlp_norm] -> GELU (exact) -> Dropout -> fc2 (4d -> d)`."""

    def __init__(self, n_state: int, n_mlp: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.fc1 = Linear(n_state, n_mlp, axes=("embed", "mlp"), rngs=rngs)
        self.norm = make_norm(config, n_mlp) if config.mlp_norm else None
        self.fc2 = Linear(n_mlp, n_state, axes=("mlp", "embed"), rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, d) -> (B, T, d)"""
        h = self.fc1(cpu_fusion_fence(x))  # (B, T, 4d)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(self.dropout(gelu(h)))


NORMS = {
    "layernorm": lambda n_state, config: LayerNorm(n_state),
    "rmsnorm": lambda n_state, config: RMSNorm(n_state),
    "group_rms": lambda n_state, config: GroupRMSNorm(n_state, config.norm_groups),
}


def make_norm(config: ModelConfig, n_state: int) -> nnx.Module:
    """The norm every sub-layer of the model uses (`config.norm`)."""
    return NORMS[config.norm](n_state, config)


def _normal_cdf(x32: jax.Array) -> jax.Array:
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, torch's form. `jax.nn.gelu(approximate=False)` takes
    erfc instead, whose two branches (a polynomial, and an exponential with a division) XLA
    evaluates for every element: about 1.4x the time on a CPU for the same float32 result."""
    return 0.5 * (1 + jax.lax.erf(x32 * np.float32(np.sqrt(0.5))))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, x Phi(x), as torch; `jax.nn.gelu` defaults to the tanh approximation.

    Computed in float32 and rounded to x's dtype, as torch computes it in 16-bit runs; its
    backward pass keeps the input alone (autodiff kept more arrays of the MLP's hidden width)
    and multiplies by the derivative Phi(x) + x phi(x), in float32 too."""
    x32 = x.astype(jnp.float32)
    return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _gelu_forward(x: jax.Array):
    return gelu(x), x


def _gelu_backward(x: jax.Array, grad: jax.Array):
    x32 = x.astype(jnp.float32)
    density = jnp.exp(-0.5 * x32 * x32) / np.sqrt(2 * np.pi)  # phi(x)
    return ((grad.astype(jnp.float32) * (_normal_cdf(x32) + x32 * density)).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)
