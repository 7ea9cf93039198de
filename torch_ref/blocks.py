"""The pre-norm residual block (SPEC section 5)."""

from __future__ import annotations

from torch import Tensor, nn

from torch_ref.attention import MultiHeadAttention
from torch_ref.layers import MLP, make_norm
from torch_ref.registry import build_attention
from whisper_config import ModelConfig

BlockCache = dict[str, dict]


class ResidualAttentionBlock(nn.Module):
    """`x += attn(attn_ln(x))`; decoder: `x += cross_attn(cross_attn_ln(x), xa)`; `x += mlp(mlp_ln(x))`."""

    def __init__(
        self,
        n_state: int,
        n_head: int,
        attention: str,
        config: ModelConfig,
        cross_attention: bool = False,
        rotary: bool = False,
    ):
        super().__init__()
        self.attn = build_attention(attention, n_state, n_head, config, rotary)
        self.attn_ln = make_norm(config, n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, config) if cross_attention else None
        self.cross_attn_ln = make_norm(config, n_state) if cross_attention else None
        self.mlp = MLP(n_state, 4 * n_state, config)
        self.mlp_ln = make_norm(config, n_state)

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset: int = 0,
    ) -> tuple[Tensor, BlockCache | None]:
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
