"""Augmented memory (model contract 4.3, revision 2): persistent memory slots with biased retrieval.

Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory", with the seed's
integration idea 2 (biased retrieval) and its write-back:

- parameter `memory (m, d)`, init normal(0, d ** -0.5); state `memory_state (m, d)`, zeros, a
  persistent buffer (not trained, carried by the converter);
- `M = memory + memory_state`; keys `[key(M); key(x)]`, values `[value(M); value(x)]`. Slots carry
  no position (no rotary) and are never masked; the `x` part is causal in the decoder. The content
  bias `u` of 4.2 is added to every query, so it scores slots and tokens alike;
- write-back, only in training mode with `memory_update`: for the module's output `y (B, T, d)`,
  `a[b, t, s]` the head-mean weight on slot `s` (before dropout) and `v[b, t]` 1 for a real
  position, 0 for padding, `delta[s] = sum_bt v a y / (sum_bt v a + 1e-6)`,
  `memory_state <- (1 - mu) memory_state + mu delta` with `delta` detached. The buffer is
  rebound, never written in place, so a gradient-checkpointed block can replay its forward from
  the state it first saw (see `blocks.py`). (Revision 1 wrote `memory_update(y)` through a linear
  layer, which behind the detach never received a gradient; revision 2 removed it.)

The seed's version only ran when sequence length equalled memory size, assigned a tensor to a
Parameter and zero-initialised the slots, which kept them identical forever (contract 7.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_ref.attention import Cache, merge_heads
from torch_ref.biased import BiasedAttention
from torch_ref.kernel import Mask
from whisper_config import ModelConfig


class AugmentedMemory(BiasedAttention):
    """The slots are the first `m` keys and values, seen by every query (a `Mask` prefix); a
    decoding cache holds them in its first `m` rows, projected once by `init_cache`."""

    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False):
        super().__init__(n_state, n_head, config, rotary)
        self.memory = nn.Parameter(torch.randn(config.memory_size, n_state) * n_state**-0.5)
        self.register_buffer("memory_state", torch.zeros(config.memory_size, n_state))
        self.memory_update = config.memory_update
        self.momentum = config.memory_momentum

    def forward(
        self, x: Tensor, *, causal: bool = False, cache: Cache | None = None, offset: int = 0, valid=None
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache; in training, also writes `memory_state`
        from the positions `valid` (B, T) marks real (all of them when None)."""
        m = self.memory.shape[0]
        q, k, v, cache = self.project_self(x, cache, offset, prefix=m)  # k, v (B, m + S, H, dh) with a cache
        if cache is None:
            slot_k, slot_v = self.slot_keys_values(x.shape[0], x.dtype)
            k, v = torch.cat([slot_k, k], dim=1), torch.cat([slot_v, v], dim=1)  # (B, m + S, H, dh)
        write = self.training and self.memory_update
        out = self.attend(q, k, v, Mask(causal=causal, prefix=m), offset=offset, return_lse=write)
        y = self.out(merge_heads(out[0] if write else out))
        if write:
            self.memory_state = self.written_state(self.slot_weights(q, k[:, :m], out[1]), y, valid)
        return y, cache

    def slot_keys_values(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of `memory + memory_state` (no position, no rotary): (B, m, H, dh) each."""
        slots = (self.memory + self.memory_state).to(dtype)[None]  # (1, m, d)
        k, v = self.keys_values(slots)
        return k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])

    def slot_weights(self, q: Tensor, slot_k: Tensor, lse: Tensor) -> Tensor:
        """Head-mean attention weight of every query on every slot, from a small separate product:
        q (B, T, H, dh), slot_k (B, m, H, dh), lse (B, T, H) of the full softmax -> (B, T, m)."""
        logits = torch.einsum("bthd,bshd->bths", q, slot_k).float()
        return torch.exp(logits * self.attention_scale() - lse[..., None]).mean(dim=2)

    def written_state(self, slot_weights: Tensor, y: Tensor, valid: Tensor | None = None) -> Tensor:
        """slot_weights (B, T, m) head-mean, y (B, T, d) the module's output, valid (B, T) or None
        -> the next `memory_state` (m, d): a momentum step towards each slot's weighted mean output."""
        if valid is not None:
            slot_weights = slot_weights * valid[..., None]  # padding writes nothing
        total = torch.einsum("bts,btd->sd", slot_weights, y.float())  # (m, d)
        delta = total / (slot_weights.sum((0, 1))[:, None] + 1e-6)
        return (1 - self.momentum) * self.memory_state + self.momentum * delta.detach()

    def init_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Cache:
        """The slots' keys and values in the first `m` rows, then `length` empty ones: (B, m + L, H, dh)."""
        slot_k, slot_v = self.slot_keys_values(batch, dtype)
        empty = super().init_cache(batch, length, dtype, device)
        return {"k": torch.cat([slot_k, empty["k"]], dim=1), "v": torch.cat([slot_v, empty["v"]], dim=1)}

    def cache_capacity(self, cache: Cache) -> int:
        return cache["k"].shape[-3] - self.memory.shape[0]
