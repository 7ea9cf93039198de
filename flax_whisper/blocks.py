"""The pre-norm residual block (model contract section 5), mirroring `torch_ref/blocks.py`, with optional
gradient checkpointing through `nnx.remat`, and the layer stack.

A side's `n` blocks are one module whose every variable has a leading layer axis (`stack`), run
in order by `nnx.scan` (`run_stack`): the program holds one block however deep the model, so
compile time does not grow with depth. torch_ref keeps an `nn.ModuleList`; the converter maps
the stacked arrays to the per-layer names `blocks.N.*` and back. State that attention writes in
training (augmented memory) is an output of the rematerialised forward, so recomputation cannot
write it twice; under the scan each layer writes its own slice. The residual stream's layout is
pinned at every block boundary (`constrain`: a no-op outside `sharding_rules`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from flax_whisper.attention import MultiHeadAttention
from flax_whisper.layers import MLP, constrain, make_norm
from flax_whisper.registry import build_attention
from whisper_config import ModelConfig

BlockCache = dict[str, dict]
ACTIVATION = ("batch", "length", "embed_act")  # the logical axes of the residual stream between blocks
# What the backward pass keeps of a checkpointed block (`ModelConfig.remat_policy`).
REMAT_POLICIES = {"full": None, "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class ResidualAttentionBlock(nnx.Module):
    """`x += attn(attn_ln(x))`; decoder: `x += cross_attn(cross_attn_ln(x), xa)`; `x += mlp(mlp_ln(x))`."""

    def __init__(
        self,
        n_state: int,
        n_head: int,
        attention: str,
        config: ModelConfig,
        cross_attention: bool = False,
        rotary: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.attn = build_attention(attention, n_state, n_head, config, rotary, rngs=rngs)
        self.attn_ln = make_norm(config, n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, config, rngs=rngs) if cross_attention else None
        self.cross_attn_ln = make_norm(config, n_state) if cross_attention else None
        self.mlp = MLP(n_state, 4 * n_state, config, rngs=rngs)
        self.mlp_ln = make_norm(config, n_state)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.remat_policy = config.remat_policy

    def __call__(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset=0,
        valid=None,
    ) -> tuple[jax.Array, BlockCache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache; valid (B, T) or None
        marks the real positions (for the memory write-back)."""
        if not self.gradient_checkpointing:
            return self._forward(x, xa, causal=causal, cache=cache, offset=offset, valid=valid)

        def run(block, x, xa, cache):
            return block._forward(x, xa, causal=causal, cache=cache, offset=offset, valid=valid)

        return nnx.remat(run, policy=REMAT_POLICIES[self.remat_policy])(self, x, xa, cache)

    def _forward(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset=0,
        valid=None,
        keep_scores: bool = False,
    ):
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache; with `keep_scores`, also
        cross-attention's scores (B, H, T, S) (`MultiHeadAttention.cross_scores`)."""
        attn_cache = None if cache is None else cache["attn"]
        y, attn_cache = self.attn(self.attn_ln(x), causal=causal, cache=attn_cache, offset=offset, valid=valid)
        x = x + y
        cross_scores = None
        if self.cross_attn is not None:
            cross_cache = None if cache is None else cache["cross_attn"]
            h = self.cross_attn_ln(x)
            y, _ = self.cross_attn(h, xa, cache=cross_cache)
            cross_scores = self.cross_attn.cross_scores(h, xa) if keep_scores else None
            x = x + y
        x = x + self.mlp(self.mlp_ln(x))
        if cache is not None:
            cache = {**cache, "attn": attn_cache}
        return (x, cache, cross_scores) if keep_scores else (x, cache)


def stack(n: int, make: Callable[[nnx.Rngs], ResidualAttentionBlock], rngs: nnx.Rngs) -> ResidualAttentionBlock:
    """`n` blocks made by `make` as one module whose variables have a leading axis of size `n`
    (each layer initialised from its own split of `rngs`), its logical name "layers"."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> ResidualAttentionBlock:
        return make(rngs)

    blocks = create(rngs)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Variable) and "axes" in variable.get_metadata():
            variable.set_metadata(axes=("layers", *variable.get_metadata()["axes"]))
    return blocks


def run_stack(
    blocks: ResidualAttentionBlock,
    x: jax.Array,
    xa: jax.Array | None = None,
    *,
    causal: bool = False,
    cache: BlockCache | None = None,
    offset=0,
    valid=None,
    unroll: bool = False,
) -> tuple[jax.Array, BlockCache | None]:
    """The stacked blocks in order: x (B, T, d) -> (B, T, d); the cache, when given, holds every
    layer's cache stacked on a leading axis and comes back updated. `unroll` lays the layers out
    one after another in the program instead of looping over them.

    `blocks` may also be a sequence of single blocks (`layers`), with `cache` the tuple of their
    caches: what decoding with `decode_unroll` runs, whose steps then read each layer's weights
    and caches where they lie, where a stack slices them out (a copy) at every step."""
    if isinstance(blocks, Sequence):
        caches = []
        for block, layer_cache in zip(blocks, cache, strict=True):
            x, layer_cache = block(x, xa, causal=causal, cache=layer_cache, offset=offset, valid=valid)
            x = constrain(x, ACTIVATION)
            caches.append(layer_cache)
        return x, tuple(caches)
    if cache is None:

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=unroll)
        def layer(x: jax.Array, block: ResidualAttentionBlock) -> jax.Array:
            return constrain(block(x, xa, causal=causal, offset=offset, valid=valid)[0], ACTIVATION)

        return layer(x, blocks), None

    # Only the self-attention caches come out of the scan: the cross-attention keys and values,
    # which decoding never changes, go in alone, so a step does not copy them.
    read_only = {k: v for k, v in cache.items() if k != "attn"}

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), unroll=unroll)
    def layer_with_cache(x: jax.Array, block: ResidualAttentionBlock, attn_cache, rest):
        x, layer_cache = block(x, xa, causal=causal, cache={"attn": attn_cache, **rest}, offset=offset, valid=valid)
        return constrain(x, ACTIVATION), layer_cache["attn"]

    x, attn = layer_with_cache(x, blocks, cache["attn"], read_only)
    return x, {**cache, "attn": attn}


def run_stack_with_cross_scores(
    blocks: ResidualAttentionBlock, x: jax.Array, xa: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The decoder's stacked blocks (causal, no cache): x (B, T, d), xa (B, S, d) -> (B, T, d)
    and every layer's cross-attention scores (L, B, H, T, S), for word alignment."""

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def layer_scores(x: jax.Array, block: ResidualAttentionBlock):
        x, _, cross_scores = block._forward(x, xa, causal=True, keep_scores=True)
        return x, cross_scores

    return layer_scores(x, blocks)


def layers(blocks: ResidualAttentionBlock) -> list[ResidualAttentionBlock]:
    """Every layer of a stack, each a block of its own (copies of its slices), in order."""
    graph, state = nnx.split(blocks)
    count = len(jax.tree.leaves(state)[0])  # every variable carries the leading layer axis
    return [nnx.merge(graph, jax.tree.map(operator.itemgetter(index), state)) for index in range(count)]


def layer(blocks: ResidualAttentionBlock, index: int) -> ResidualAttentionBlock:
    """Layer `index` of a stack as a block of its own (a copy of its variables), e.g. to inspect it."""
    graph, state = nnx.split(blocks)
    return nnx.merge(graph, jax.tree.map(lambda x: x[index], state))
