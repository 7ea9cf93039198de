"""The pre-norm residual block (SPEC section 5), mirroring `torch_ref/blocks.py`, with optional
gradient checkpointing through `nnx.remat`. State that attention writes in training (augmented
memory) is an output of the rematerialised forward, so recomputation cannot write it twice."""

from __future__ import annotations

import jax
from flax import nnx

from flax_whisper.attention import MultiHeadAttention
from flax_whisper.layers import MLP, make_norm
from flax_whisper.registry import build_attention
from whisper_config import ModelConfig

BlockCache = dict[str, dict]


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

    def __call__(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset=0,
    ) -> tuple[jax.Array, BlockCache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache."""
        if not self.gradient_checkpointing:
            return self._forward(x, xa, causal=causal, cache=cache, offset=offset)

        def run(block, x, xa, cache):
            return block._forward(x, xa, causal=causal, cache=cache, offset=offset)

        return nnx.remat(run)(self, x, xa, cache)

    def _forward(
        self,
        x: jax.Array,
        xa: jax.Array | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset=0,
    ) -> tuple[jax.Array, BlockCache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache."""
        attn_cache = None if cache is None else cache["attn"]
        y, attn_cache = self.attn(self.attn_ln(x), causal=causal, cache=attn_cache, offset=offset)
        x = x + y
        if self.cross_attn is not None:
            cross_cache = None if cache is None else cache["cross_attn"]
            y, _ = self.cross_attn(self.cross_attn_ln(x), xa, cache=cross_cache)
            x = x + y
        x = x + self.mlp(self.mlp_ln(x))
        if cache is not None:
            cache = {**cache, "attn": attn_cache}
        return x, cache
