"""How attention is computed, kept apart from what each mechanism attends to (mirrors `torch_ref/kernel.py`).

A mechanism describes *what* is attended with a `Mask`: causal or not, a band of `window`
positions, and a `prefix` of keys every query sees (memory slots, which carry no position). The
query at index `i` sits at position `offset + i`; key `j` after the prefix at position `j`.
`attend` chooses *how* (`ModelConfig.attention_implementation`):

- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel on
  NVIDIA GPUs, for bfloat16/float16 inputs and masks it can express without materialising them
  (causal, a causal left window, valid key lengths in a KV cache; memory slots before causal
  keys, and a symmetric band, as causal masks over queries moved behind zero rows);
- `splash`: Pallas' flash kernel for TPUs (splash attention) for any mask known when tracing
  (queries from position 0), built as a NumPy array whose empty tiles the kernel skips; run on
  each device's rows and heads (`shard_map`) under the training loop's sharding rules; elsewhere
  Pallas interprets it (tests);
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, XLA's fused dot-softmax-dot; a
  band (hybrid's local branch) in blocks of the band instead (`_banded`), so its memory grows
  with `T * window`, not `T * T`;
- `chunked`: the same math in query blocks, one head of one batch row at a time (`lax.map`), so
  the score matrix of a block stays in cache; XLA:CPU runs long attention several times faster
  so, since it never writes the whole `(B, H, T, S)` matrix to memory;
- `einsum`: the plain materialised softmax, the only path with dropout on the weights;
- `auto` (default): `cudnn` on a GPU when it applies, except for one query (a decoding step),
  else `xla`; on a TPU `splash` for more than one query from position 0, else `xla`; on a CPU
  `xla` for a self-attention band whose three key blocks are fewer keys than the sequence
  (`banded_applies`: `_banded`), else `chunked` for long inputs and `einsum` for short ones
  (XLA:CPU runs them faster than the generic fused op); `einsum` whenever attention dropout is
  active.

Queries are `(B, T, H, dh)`; keys and values are kept in the layout `kv_layout()` gives:
heads-major `(B, H, S, dh)` on CPUs, where XLA's dot wants each head's keys contiguous (a
decoding step over a `(B, S, H, dh)` cache spent most of its time transposing it), and `(B, S,
H, dh)`, the fused GPU kernels' layout, elsewhere. Self-attention's KV caches are kept in
`cache_layout()`: heads-major on CPUs too, and elsewhere `bhdv`, heads-major with each head's
values transposed to `(B, H, dh, S)`: a decoding step's one query mixes the values along their
rows then, and XLA's GPU compiler makes its softmax and mix one or two kernels (with the values
`(B, S, H, dh)`: five or six, one writing every value times its weight). Cross-attention's cache,
projected once and only read, is kept in `cross_kv_layout()`: on CPUs `bhds`, each head's keys
transposed to `(B, H, dh, S)` (values stay `(B, H, S, dh)`), the operand XLA:CPU's dot takes as it
is (with the keys `(B, H, S, dh)`, every decoding step copied each layer's cross-attention keys
into that order again: a tenth of a `tiny` model's step at batch 1); elsewhere `bhdv`, as the
self-attention caches.

Logits, softmax and the log-sum-exp are float32 whatever the input dtype (model contract section 4). A
learned temperature (a traced scale) is folded into the queries, since the fused kernels take
a static scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMPLEMENTATIONS = ("auto", "cudnn", "splash", "xla", "chunked", "einsum")
# Key/value layouts: sequence-major, heads-major, heads-major with the keys transposed (keys
# (B, H, dh, S), values (B, H, S, dh): a cross-attention cache on a CPU), and heads-major with the
# values transposed (keys (B, H, S, dh), values (B, H, dh, S): decoding caches elsewhere).
BSHD, BHSD, BHDS, BHDV = "bshd", "bhsd", "bhds", "bhdv"
# `chunked` processes at most this many queries of one head at a time; `auto` picks it on a CPU
# once a batch row's score matrix (H x T x S floats) outgrows the cache (below it the plain
# einsum is faster: a decoder's 448 x 448 self-attention over 6 heads is, 448 x 1500 is not).
CHUNK = 512
CHUNKED_MIN_SCORES = 2**21
# `splash` pads queries and keys to multiples of its blocks (Pallas' TPU kernel tiles them so).
SPLASH_BLOCK = 128
# Whether Pallas interprets `splash` rather than compiling it for a TPU: None decides by
# `jax.default_backend()` (interpreted off a TPU, as in the tests).
SPLASH_INTERPRET: bool | None = None


@dataclasses.dataclass(frozen=True)
class Mask:
    """What a query may attend to (static: it decides the program, not the data).

    causal: key position `<=` query position. window: `|query - key| <= window` (with causal:
    `0 <= query - key <= window`). prefix: the first `prefix` keys are seen by every query.
    """

    causal: bool = False
    window: int | None = None
    prefix: int = 0

    @property
    def masks_anything(self) -> bool:
        return self.causal or self.window is not None


def kv_layout() -> str:
    """The layout keys, values and KV caches are kept in on this machine (see the module docstring)."""
    return BHSD if jax.default_backend() == "cpu" else BSHD


def cache_layout() -> str:
    """The layout of self-attention's KV caches on this machine: `kv_layout()` where that is
    heads-major, else heads-major with the values transposed (see the module docstring)."""
    return BHDV if kv_layout() == BSHD else kv_layout()


def cross_kv_layout() -> str:
    """The layout of cross-attention's keys and values on this machine: heads-major with each
    head's keys transposed where `kv_layout()` is heads-major, else the caches' (see the module
    docstring)."""
    return BHDS if kv_layout() == BHSD else cache_layout()


def seq_axis(layout: str, values: bool = False) -> int:
    """The sequence axis of keys (or `values`) in `layout`, counted from the end: a leading layer
    axis of a stacked cache does not move it."""
    if layout == BSHD:
        return -3
    return -1 if (layout == BHDS and not values) or (layout == BHDV and values) else -2


def to_layout(x: jax.Array, layout: str, keys: bool = False) -> jax.Array:
    """Keys (`keys=True`) or values (B, S, H, dh) -> the given layout."""
    if (layout == BHDS and keys) or (layout == BHDV and not keys):
        return jnp.transpose(x, (0, 2, 3, 1))
    return x if layout == BSHD else jnp.swapaxes(x, 1, 2)


def allowed(mask: Mask, n_queries: int, n_keys: int, offset=0, first_query=0, xp=jnp) -> jax.Array:
    """`(T, S)` bool: may query `first_query + i` (at position `offset + first_query + i`) see key `j`?
    (`xp=np` for a NumPy array, a static mask, from static positions.)"""
    q_pos = offset + first_query + xp.arange(n_queries)[:, None]  # (T, 1)
    k_pos = xp.arange(n_keys)[None, :] - mask.prefix  # (1, S); the prefix sits at negative positions
    ok = xp.ones((n_queries, n_keys), bool)
    if mask.causal:
        ok &= k_pos <= q_pos
    if mask.window is not None:
        ok &= (q_pos - k_pos <= mask.window) & (k_pos - q_pos <= (0 if mask.causal else mask.window))
    return ok | (k_pos < 0)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    *,
    scale: float | jax.Array,
    offset=0,
    layout: str = BSHD,
    implementation: str = "auto",
    dropout: nnx.Dropout | None = None,
    return_lse: bool = False,
):
    """Scaled dot-product attention over heads.

    q (B, T, H, dh), k and v (B, S, H, dh) or, with `layout="bhsd"`, (B, H, S, dh) (with
    `layout="bhds"`, k (B, H, dh, S) and v (B, H, S, dh); with `layout="bhdv"`, k (B, H, S, dh)
    and v (B, H, dh, S)) -> (B, T, H, dh) in q's dtype; with
    `return_lse`, also the float32 log-sum-exp of each query's scores (B, T, H), from which the
    weight of any key follows as `exp(score - lse)`. `offset` (an int, or traced in a decoding
    loop) places the queries after that many cached positions.
    """
    if not isinstance(scale, float | int):  # a learned temperature: fold it into the queries
        q = (q.astype(jnp.float32) * scale).astype(q.dtype)
        scale = 1.0
    n_keys = k.shape[seq_axis(layout)]
    how = choose(implementation, q, n_keys, mask, offset, dropout)
    if how == "einsum":
        return _einsum(q, k, v, mask, float(scale), offset, layout, dropout, return_lse)
    if layout == BHDS:  # the other paths read each head's keys row by row
        k, layout = jnp.swapaxes(k, -1, -2), BHSD
    if layout == BHDV:  # and its values; XLA takes the transpose into the kernel that reads them
        v, layout = jnp.swapaxes(v, -1, -2), BHSD
    if how == "chunked":
        return _chunked(q, k, v, mask, float(scale), offset, layout, return_lse)
    if layout == BHSD:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if how == "splash":
        if return_lse:  # the kernel's log-sum-exp has no gradient: the materialised softmax gives both
            return _einsum(q, k, v, mask, float(scale), offset, BSHD, None, return_lse)
        return _splash(q, k, v, mask, float(scale))
    if how == "xla" and banded_applies(mask, q.shape[1], n_keys, offset):
        return _banded(q, k, v, mask, float(scale), return_lse)
    if how == "cudnn" and symmetric_band_applies(mask, q.shape[1], n_keys, offset):
        return _band_as_causal_window(q, k, v, mask, float(scale), how, return_lse)
    return _fused(q, k, v, mask, float(scale), offset, how, return_lse)


def _static_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def drops_weights(dropout: nnx.Dropout | None) -> bool:
    """Whether `dropout` acts on the attention weights (training with a nonzero rate)."""
    return dropout is not None and dropout.rate > 0 and not dropout.deterministic


def cudnn_expressible(q: jax.Array, mask: Mask, offset, n_keys: int | None = None) -> bool:
    """Can cuDNN's flash kernel compute this without a materialised mask? (`n_keys`: default as
    many as queries.)"""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if not mask.masks_anything:
        return True  # a prefix of memory slots is only more keys when nothing is masked
    if mask.window is not None and mask.prefix:
        return False
    if mask.window is not None and not mask.causal:  # cuDNN takes left windows only (with a causal mask)
        return symmetric_band_applies(mask, q.shape[1], q.shape[1] if n_keys is None else n_keys, offset)
    if _static_zero(offset):  # training, or a prompt written at the start of a cache
        return True  # memory slots before causal keys too (`_fused` puts queries in front)
    return q.shape[1] == 1 and mask.window is None and not mask.prefix  # one cached step: key lengths


def choose(implementation: str, q: jax.Array, n_keys: int, mask: Mask, offset, dropout) -> str:
    """The path `attend` takes (see the module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if drops_weights(dropout):
        return "einsum"  # the fused kernels have no dropout on the weights
    if implementation == "cudnn":
        if not cudnn_expressible(q, mask, offset, n_keys):
            raise ValueError(
                f"attention_implementation='cudnn' needs bfloat16/float16 inputs (got {q.dtype}) and a mask of "
                f"causal, causal-window or key-length form, memory slots before causal keys, or a band over more than "
                f"twice its window (got {mask}, offset {offset!r}); use 'auto' to fall back"
            )
        return "cudnn"
    if implementation == "splash" and not _static_zero(offset):
        raise ValueError(
            f"attention_implementation='splash' needs queries from position 0, a mask known when tracing (got offset "
            f"{offset!r}); use 'auto' to fall back"
        )
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu" and _static_zero(offset) and q.shape[1] > 1:
        return "splash"  # Pallas' flash kernel, tiles of the mask that see nothing skipped
    if backend == "gpu" and cudnn_expressible(q, mask, offset, n_keys):
        # One query (a decoding step): a call of cuDNN's flash kernel costs tens of microseconds
        # whatever its size, and a decoding step makes two per layer; XLA's fused dot-softmax-dot
        # over one query row is a few small kernels.
        return "xla" if q.shape[1] == 1 else "cudnn"
    if backend == "cpu":  # XLA:CPU runs its own einsums faster than the generic fused op
        if banded_applies(mask, q.shape[1], n_keys, offset):
            return "xla"  # a band in blocks of the band (`_banded`): a fraction of the scores
        return "chunked" if q.shape[2] * q.shape[1] * n_keys >= CHUNKED_MIN_SCORES else "einsum"
    return "xla"


def _fused(q, k, v, mask: Mask, scale: float, offset, how: str, return_lse: bool):
    """`jax.nn.dot_product_attention`, with the mask in the cheapest form the case allows."""
    t, s = q.shape[1], k.shape[1]
    kwargs: dict = {}
    if not mask.masks_anything:
        pass
    elif _static_zero(offset) and mask.prefix and mask.causal and mask.window is None:
        # Memory slots before causal keys: query i sees keys 0 .. prefix + i, the plain causal
        # mask for query rows moved `prefix` rows later.
        return _causal_behind_zero_rows(q, k, v, mask.prefix, None, scale, how, return_lse)
    elif _static_zero(offset) and not mask.prefix and (mask.causal or how == "xla"):
        # Queries at positions 0 .. T - 1 against keys 0 .. S - 1 (S > T in a fresh cache: the
        # causal mask already hides the unwritten slots).
        kwargs["is_causal"] = mask.causal
        if mask.window is not None:
            kwargs["local_window_size"] = (mask.window, 0 if mask.causal else mask.window)
    elif how == "cudnn":  # one decoding step over a cache: the keys written so far
        kwargs["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(offset + 1, jnp.int32), (q.shape[0],))
    else:
        kwargs["mask"] = allowed(mask, t, s, offset)[None, None]
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=how, return_residual=return_lse, **kwargs)
    if return_lse:
        y, lse = out
        return y, lse.astype(jnp.float32)
    return out


def _splash(q, k, v, mask: Mask, scale: float):
    """Pallas' TPU flash kernel (splash attention), q (B, T, H, dh), k and v (B, S, H, dh) at
    positions from 0 -> (B, T, H, dh). The mask is built once, as a NumPy array, when tracing: the
    kernel skips each tile of it that sees nothing (a band's or a causal mask's far corner) and
    masks the rest. Queries and keys are padded to whole tiles: padded keys are seen by no query,
    padded queries see the first key and are dropped. The scale is folded into the queries (the
    kernel takes none); scores, softmax and their sums in float32. Off a TPU Pallas interprets the
    kernel (slowly: for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    from flax_whisper.layers import placed

    t, s = q.shape[1], k.shape[1]
    tp, sp = (-(-n // SPLASH_BLOCK) * SPLASH_BLOCK for n in (t, s))
    seen = np.zeros((tp, sp), bool)
    seen[:t, :s] = allowed(mask, t, s, xp=np)
    seen[t:, 0] = True

    def local(qh, kh, vh):  # (b, h, tp, dh), (b, h, sp, dh): one device's rows and heads
        kernel = splash.make_splash_mha(
            masks.MultiHeadMask([masks.NumpyMask(seen)] * qh.shape[1]),
            head_shards=1,
            q_seq_shards=1,
            block_sizes=splash.BlockSizes(*(SPLASH_BLOCK,) * 8),
            interpret=jax.default_backend() != "tpu" if SPLASH_INTERPRET is None else SPLASH_INTERPRET,
        )
        return jax.vmap(kernel)(qh, kh, vh)

    def heads_major(x, rows):  # (B, n, H, dh) -> (B, H, rows, dh), zero rows appended
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0), (0, 0))), 1, 2)

    scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    args = heads_major(scaled, tp), heads_major(k, sp), heads_major(v, sp)
    sharding = placed(("batch", "heads", None, None), args[0].shape)
    if sharding is None:
        y = local(*args)  # (B, H, tp, dh)
    else:  # XLA does not partition a Pallas kernel: each device runs it on its own rows and heads
        spec = sharding.spec
        y = jax.shard_map(local, mesh=sharding.mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(*args)
    return jnp.swapaxes(y, 1, 2)[:, :t]


def _causal_behind_zero_rows(q, k, v, front: int, window: int | None, scale: float, how: str, return_lse: bool):
    """Causal attention (within a left `window` of keys, if given) of the queries moved `front`
    rows later, behind zero rows: query i sits at row front + i and sees keys up to front + i
    (and from front + i - window). q (B, T, H, dh), k and v (B, S, H, dh) -> (B, T, H, dh) [and
    the float32 lse (B, T, H)]. A mask the fused kernels take without materialising it; the zero
    rows' outputs are dropped, so no gradient flows through them."""
    moved = jnp.pad(q, ((0, 0), (front, 0), (0, 0), (0, 0)))
    window_size = None if window is None else (window, 0)
    out = jax.nn.dot_product_attention(
        moved, k, v, scale=scale, is_causal=True, local_window_size=window_size, implementation=how,
        return_residual=return_lse,
    )  # fmt: skip
    if return_lse:
        y, lse = out
        return y[:, front:], lse[:, front:].astype(jnp.float32)
    return out[:, front:]


def symmetric_band_applies(mask: Mask, n_queries: int, n_keys: int, offset) -> bool:
    """A symmetric band self-attention from position 0 (an encoder's `hybrid` band) long enough
    for `_band_as_causal_window`."""
    if mask.window is None or mask.causal or mask.prefix or not _static_zero(offset):
        return False
    return n_queries == n_keys > 2 * mask.window


def _band_as_causal_window(q, k, v, mask: Mask, scale: float, how: str, return_lse: bool):
    """A symmetric band (`|i - j| <= w`) through a kernel that takes only causal left windows
    (cuDNN's), q, k, v (B, T, H, dh) at positions 0 .. T - 1 -> (B, T, H, dh) [and the float32 lse
    (B, T, H)].

    Behind w zero rows, query i sits at row i + w, and a causal window of 2w keys to its left
    shows it keys i - w .. i + w: the band. The zero rows' outputs are dropped (no gradient flows
    through them), and so that the call keeps as many queries as keys, the last w queries attend
    apart, in a materialised softmax over the last 2w keys (`_einsum`, a `(w, 2w)` score matrix).
    """
    t, w = q.shape[1], mask.window
    head = _causal_behind_zero_rows(q[:, : t - w], k, v, w, 2 * w, scale, how, return_lse)  # queries 0 .. T - w - 1
    # The last w queries (positions T - w ..) against keys T - 2w ..: positions shifted by T - 2w.
    tail = _einsum(q[:, t - w :], k[:, t - 2 * w :], v[:, t - 2 * w :], mask, scale, w, BSHD, None, return_lse)
    if not return_lse:
        return jnp.concatenate([head, tail], axis=1)
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(head, tail, strict=True))


def band_block(mask: Mask) -> int:
    """Queries per block of `_banded`: at least the window, and at least 64 for the matmuls' sake."""
    return max(mask.window or 0, 64)


def banded_applies(mask: Mask, n_queries: int, n_keys: int, offset) -> bool:
    """Self-attention over a band (training, an encoder) where blocks of the band are fewer keys
    than the whole sequence: `_banded` then never materialises the `(B, H, T, T)` scores."""
    if mask.window is None or mask.prefix or not _static_zero(offset) or n_queries != n_keys:
        return False
    return 3 * band_block(mask) < n_keys


def _banded(q, k, v, mask: Mask, scale: float, return_lse: bool):
    """Attention within a band of `mask.window` positions (causal or not), q, k, v (B, T, H, dh),
    queries and keys at positions 0 .. T - 1 -> (B, T, H, dh) [and the float32 lse (B, T, H)].

    Queries go in blocks of `c = band_block(mask)`; block `i` sees keys `i c - c .. i c + 2c - 1`
    (three key blocks, which hold every key within `window <= c` of its queries), so the scores
    are `(B, T / c, H, c, 3c)` rather than `(B, H, T, T)`. The same float32 logits and softmax as
    `_einsum`; autodiff gives the backward.
    """
    b, t, h, dh = q.shape
    c = band_block(mask)
    n = -(-t // c)
    qb = jnp.pad(q, ((0, 0), (0, n * c - t), (0, 0), (0, 0))).reshape(b, n, c, h, dh)

    def key_blocks(x):  # (B, T, H, dh) -> (B, n, 3c, H, dh)
        padded = jnp.pad(x, ((0, 0), (c, n * c - t + c), (0, 0), (0, 0))).reshape(b, n + 2, c, h, dh)
        return jnp.concatenate([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], axis=2)

    kb, vb = key_blocks(k), key_blocks(v)
    logits = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    query = jnp.arange(n)[:, None, None] * c + jnp.arange(c)[None, :, None]  # (n, c, 1)
    key = jnp.arange(n)[:, None, None] * c - c + jnp.arange(3 * c)[None, None, :]  # (n, 1, 3c)
    ok = (jnp.abs(query - key) <= mask.window) & (key >= 0) & (key < t)
    if mask.causal:
        ok &= key <= query
    ok |= query >= t  # padding rows see their whole block, so none is empty
    logits = jnp.where(ok[None, :, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, n, H, c)
    weights = jnp.exp(logits - lse[..., None])
    y = rounded_product("bnhqk,bnkhd->bnqhd", weights.astype(v.dtype), vb).reshape(b, n * c, h, dh)[:, :t]
    if return_lse:
        return y, jnp.swapaxes(lse, 2, 3).reshape(b, n * c, h)[:, :t]
    return y


def rounded_product(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(subscripts, a, b)` of two arrays of one dtype. On a CPU accumulated in float32
    and rounded once to that dtype: `einsum`'s accuracy, and for bfloat16 operands on a CPU with
    bfloat16 dot-product instructions about twice its rate (as `layers._product`)."""
    if jax.default_backend() != "cpu":
        return jnp.einsum(subscripts, a, b)
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(b.dtype)


def scores(q, k, scale: float | jax.Array, layout: str) -> jax.Array:
    """q (..., T, H, dh), k (..., S, H, dh), (..., H, S, dh) or (..., H, dh, S) -> float32 scores
    (..., H, T, S)."""
    keys = {BHSD: "...hsd", BHDS: "...hds", BHDV: "...hsd"}.get(layout, "...shd")
    return jnp.einsum(f"...thd,{keys}->...hts", q, k, preferred_element_type=jnp.float32) * scale


def _mix(weights, v, layout: str) -> jax.Array:
    """weights (..., H, T, S), v (..., S, H, dh), (..., H, S, dh) or (..., H, dh, S) -> (..., T, H,
    dh) in v's dtype."""
    values = {BHSD: "...hsd", BHDS: "...hsd", BHDV: "...hds"}.get(layout, "...shd")
    return rounded_product(f"...hts,{values}->...thd", weights.astype(v.dtype), v)


def _einsum(q, k, v, mask: Mask, scale: float, offset, layout: str, dropout, return_lse: bool):
    """The materialised softmax: scores (B, H, T, S) in float32, dropout on the weights."""
    logits = scores(q, k, scale, layout)
    if mask.masks_anything:
        logits = jnp.where(allowed(mask, q.shape[1], logits.shape[-1], offset), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        weights = dropout(weights)
    y = _mix(weights, v, layout)
    if return_lse:
        return y, jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), 1, 2)  # (B, T, H)
    return y


def _chunked(q, k, v, mask: Mask, scale: float, offset, layout: str, return_lse: bool):
    """One head of one batch row at a time, in blocks of at most `CHUNK` queries, forward and
    backward (flash attention's recomputation: the backward pass rebuilds each block's weights
    from the saved log-sum-exp), so no `(H, T, S)` score matrix is ever written to memory: a
    block's `(c, S)` scores stay in cache. The same float32 math as `_einsum`, without dropout; in
    bfloat16 each block's weights are rounded as they are made and normalised by their rounded
    sum, as a flash kernel mixes them."""
    b, t, h, dh = q.shape
    n = -(-t // CHUNK)
    chunk = -(-t // n)  # n blocks of equal size, the last padded by less than n queries
    rows = jnp.swapaxes(jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0))), 1, 2)  # (B, H, n c, dh)
    if layout != BHSD:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    s = k.shape[2]
    y, lse = _flash(
        rows.reshape(b * h, n, chunk, dh),
        k.reshape(b * h, s, dh),
        v.reshape(b * h, s, dh),
        jnp.asarray(offset, jnp.int32),
        _FlashSpec(mask, scale, t, chunk),
    )
    y = jnp.swapaxes(y.reshape(b, h, n * chunk, dh), 1, 2)[:, :t]
    lse = jnp.swapaxes(lse.reshape(b, h, n * chunk), 1, 2)[:, :t]
    return (y, lse) if return_lse else y


@dataclasses.dataclass(frozen=True)
class _FlashSpec:
    """The static part of a chunked attention: what is masked, the scale, the true query count."""

    mask: Mask
    scale: float
    queries: int
    chunk: int

    def seen(self, first, offset, n_keys: int) -> jax.Array | None:
        """Which keys the queries first .. first + c see, (c, S) boolean, or None for all."""
        if not self.mask.masks_anything:
            return None
        padding = (first + jnp.arange(self.chunk) >= self.queries)[:, None]  # rows past T see all
        return allowed(self.mask, self.chunk, n_keys, offset, first) | padding

    def logits(self, qc, kh, first, offset) -> jax.Array:
        """qc (c, dh), kh (S, dh): one head -> masked, unscaled float32 scores (c, S) of queries
        first .. first + c (the caller multiplies by `scale` in a pass it makes anyway)."""
        logits = jnp.einsum("td,sd->ts", qc, kh, preferred_element_type=jnp.float32)
        ok = self.seen(first, offset, kh.shape[0])
        return logits if ok is None else jnp.where(ok, logits, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(blocks, k, v, offset, spec: _FlashSpec):
    """blocks (R, n, c, dh), k and v (R, S, dh), one row per (batch row, head) -> y (R, n, c, dh),
    lse (R, n, c) float32."""
    return _flash_forward(blocks, k, v, offset, spec)[0]


def _flash_forward(blocks, k, v, offset, spec: _FlashSpec):
    n = blocks.shape[1]

    def row(args):
        qh, kh, vh = args  # (n, c, dh), (S, dh), (S, dh)

        def block(args):
            # One exponential per score, scaled inside it; the weights are normalised after the
            # values are mixed, on (c, dh) instead of (c, S). Every row sees a key, so its maximum
            # is finite.
            qc, first = args
            logits = spec.logits(qc, kh, first, offset)  # (c, S) unscaled
            peak = jnp.max(logits, axis=-1)  # (c,)
            # Rounded to the values' dtype as they are made, and summed as rounded: one pass that
            # writes them in that dtype (a separate float32-to-bfloat16 pass over the (c, S)
            # weights cost XLA:CPU a tenth of a bfloat16 step), normalised by exactly what is mixed.
            weights = jnp.exp((logits - peak[:, None]) * spec.scale).astype(vh.dtype)  # unnormalised, <= 1
            total = jnp.sum(weights.astype(jnp.float32), axis=-1)  # (c,)
            mixed = jnp.einsum("ts,sd->td", weights, vh, preferred_element_type=jnp.float32)
            return (mixed / total[:, None]).astype(vh.dtype), peak * spec.scale + jnp.log(total)

        return jax.lax.map(block, (qh, jnp.arange(n) * spec.chunk))

    y, lse = jax.lax.map(row, (blocks, k, v))
    return (y, lse), (blocks, k, v, offset, y, lse)


def _flash_backward(spec: _FlashSpec, residuals, cotangents):
    blocks, k, v, offset, y, lse = residuals
    dy, dlse = cotangents
    n = blocks.shape[1]

    def row(args):
        qh, kh, vh, yh, lseh, dyh, dlseh = args  # one head of one batch row: (n, c, dh) ... (S, dh)
        kt = kh.T  # (dh, S), once per row

        def product(a, b):  # float32 a @ b of operands in the compute dtype, as a GPU's flash kernel takes them
            return jnp.matmul(a.astype(vh.dtype), b.astype(vh.dtype), preferred_element_type=jnp.float32)

        # What each query's score gradients subtract, sum_s P dP less the lse's cotangent (n, c),
        # for the whole row at once: inside a block, the row sum joined the dP product's YNNPACK
        # fusion, which then ran at about half the rate of the bare product.
        shift = jnp.sum(dyh.astype(jnp.float32) * yh.astype(jnp.float32), axis=-1) - dlseh

        # Each block's weights are rebuilt with the keys along the rows, (S, c): every product
        # is then A B or A B^T, which XLA:CPU's dot reads in place, where the (c, S) layout needs
        # two A^T B products per block and a transposed copy of a (c, S) matrix for each.
        def block(carry, args):
            dk, dv = carry  # (S, dh) float32
            qc, lsec, dyc, shiftc, first = args
            logits = jnp.einsum("sd,td->st", kh, qc, preferred_element_type=jnp.float32) * spec.scale
            ok = spec.seen(first, offset, kh.shape[0])
            if ok is not None:
                logits = jnp.where(ok.T, logits, -jnp.inf)
            weights = jnp.exp(logits - lsec[None, :]).astype(vh.dtype)  # (S, c), rounded as the forward's
            dv = dv + product(weights, dyc)
            dweights = jnp.einsum("sd,td->st", vh, dyc, preferred_element_type=jnp.float32)
            # The gradient of the unscaled scores: `scale` multiplies dq and dk, (c, dh) and
            # (S, dh), rather than this (S, c) product (where XLA:CPU materialises it).
            dscores = weights.astype(jnp.float32) * (dweights - shiftc[None, :])
            dk = dk + product(dscores, qc)
            return (dk, dv), product(kt, dscores)  # dq^T (dh, c), unscaled

        zeros = jnp.zeros(kh.shape, jnp.float32)
        firsts = jnp.arange(n) * spec.chunk
        (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), (qh, lseh, dyh, shift, firsts))
        dq = jnp.swapaxes(dq, 1, 2) * spec.scale  # (n, c, dh)
        return dq.astype(qh.dtype), (dk * spec.scale).astype(kh.dtype), dv.astype(vh.dtype)

    dq, dk, dv = jax.lax.map(row, (blocks, k, v, y, lse, dy, dlse))
    return dq, dk, dv, None


_flash.defvjp(_flash_forward, _flash_backward)
