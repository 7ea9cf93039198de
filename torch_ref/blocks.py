"""The pre-norm residual block (model contract section 5), with optional gradient checkpointing.

`torch.utils.checkpoint` re-runs a block's forward during backward. A block whose attention writes
state in training (augmented memory's `memory_state`) must not write it twice nor recompute from
the already-written value: the recomputation is replayed from the state the forward first saw
(state tensors are rebound, never changed in place, so the first forward's tensors stay valid),
and the state the forward wrote is put back afterwards. The update happens exactly once.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from torch_ref.attention import MultiHeadAttention
from torch_ref.layers import MLP, make_norm
from torch_ref.registry import build_attention
from whisper_config import ModelConfig

BlockCache = dict[str, dict]
# Buffers that attention writes in training mode (see the module docstring).
STATE_BUFFERS = ("memory_state",)


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
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset: int = 0,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, BlockCache | None]:
        """x (B, T, d), xa (B, S, d) or None -> (B, T, d), updated cache; valid (B, T) or None
        marks the real positions (for the memory write-back)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._forward,
                x,
                xa,
                causal=causal,
                cache=cache,
                offset=offset,
                valid=valid,
                use_reentrant=False,
                context_fn=self._replay_from_first_state,
            )
        return self._forward(x, xa, causal=causal, cache=cache, offset=offset, valid=valid)

    def _replay_from_first_state(self):
        """(forward, recompute) contexts: remember the state buffers before the forward; during
        the recompute, run from them, then restore what the forward wrote."""
        first: dict[str, Tensor] = {}

        @contextlib.contextmanager
        def forward():
            first.update(self._state_buffers())
            yield

        @contextlib.contextmanager
        def recompute():
            written = self._state_buffers()
            self._load_state_buffers(first)
            try:
                yield
            finally:
                self._load_state_buffers(written)

        return forward(), recompute()

    def _state_buffers(self) -> dict[str, Tensor]:
        return {name: buf for name, buf in self.named_buffers() if name.endswith(STATE_BUFFERS)}

    def _load_state_buffers(self, buffers: dict[str, Tensor]) -> None:
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(owner), leaf, value)

    def _forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        *,
        causal: bool = False,
        cache: BlockCache | None = None,
        offset: int = 0,
        valid: Tensor | None = None,
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
