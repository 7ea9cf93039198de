"""Augmented memory (SPEC 4.3): persistent memory slots with biased retrieval.

Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory", with the seed's
integration idea 2 (biased retrieval) and its `memory_update` write-back:

- parameter `memory (m, d)`, init normal(0, d ** -0.5); state `memory_state (m, d)`, zeros, a
  persistent buffer (not trained, carried by the converter);
- `M = memory + memory_state`; keys `[key(M); key(x)]`, values `[value(M); value(x)]`. Slots carry
  no position (no rotary) and are never masked; the `x` part is causal in the decoder. The content
  bias `u` of 4.2 is added to every query, so it scores slots and tokens alike;
- write-back, only in training mode with `memory_update`: `w = memory_update(y)` for the module's
  output `y (B, T, d)`, `a[b, t, s]` the head-mean weight on slot `s` (before dropout),
  `delta[s] = sum_bt a w / (sum_bt a + 1e-6)`, `memory_state <- (1 - mu) memory_state + mu delta`
  with `delta` detached. The buffer is rebound, never written in place, so a gradient-checkpointed
  block can replay its forward from the state it first saw (see `blocks.py`).

The seed's version only ran when sequence length equalled memory size, assigned a tensor to a
Parameter and zero-initialised the slots, which kept them identical forever (SPEC 7.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_ref.attention import Cache, attention_weights, mix_values, position_mask
from torch_ref.biased import BiasedAttention
from torch_ref.layers import Linear
from whisper_config import ModelConfig


class AugmentedMemory(BiasedAttention):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False):
        super().__init__(n_state, n_head, config, rotary)
        self.memory = nn.Parameter(torch.randn(config.memory_size, n_state) * n_state**-0.5)
        self.register_buffer("memory_state", torch.zeros(config.memory_size, n_state))
        self.memory_update = Linear(n_state, n_state) if config.memory_update else None
        self.momentum = config.memory_momentum

    def forward(
        self, x: Tensor, *, causal: bool = False, cache: Cache | None = None, offset: int = 0
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache; in training, also writes `memory_state`."""
        b, t, _ = x.shape
        m = self.memory.shape[0]
        q, k, v, cache = self.project_self(x, cache, offset)  # k, v (B, S, d)
        slots = (self.memory + self.memory_state).to(x.dtype)  # (m, d)
        keys = torch.cat([self.key(slots).expand(b, m, -1), k], dim=1)  # (B, m + S, d)
        values = torch.cat([self.value(slots).expand(b, m, -1), v], dim=1)  # (B, m + S, d)
        mask = position_mask(offset, t, k.shape[1], causal, None, x.device)  # (T, S) or None
        if mask is not None:
            mask = torch.cat([torch.ones(t, m, dtype=torch.bool, device=x.device), mask], dim=1)
        weights = attention_weights(q, keys, self.n_head, self.attention_scale(), mask, self.content_bias)
        y = self.out(mix_values(weights, values, self.attention_dropout))
        if self.training and self.memory_update is not None:
            self.memory_state = self.written_state(weights[..., :m].mean(1), y)
        return y, cache

    def written_state(self, slot_weights: Tensor, y: Tensor) -> Tensor:
        """slot_weights (B, T, m) head-mean, y (B, T, d) -> the next `memory_state` (m, d)."""
        w = self.memory_update(y).float()  # (B, T, d)
        delta = torch.einsum("bts,btd->sd", slot_weights, w) / (slot_weights.sum((0, 1))[:, None] + 1e-6)
        return (1 - self.momentum) * self.memory_state + self.momentum * delta.detach()
