"""How attention is computed, kept apart from what each mechanism attends to (mirrors `flax_whisper/kernel.py`).

A mechanism describes *what* is attended with a `Mask`: causal or not, a band of `window`
positions, and a `prefix` of keys every query sees (memory slots, which carry no position). The
query at index `i` sits at position `offset + i`; key `j` after the prefix at position `j`.
`attend` chooses *how*: `torch.nn.functional.scaled_dot_product_attention` (torch picks its
fused kernel: flash or memory-efficient on GPUs, the flash CPU kernel on CPUs) for every
`ModelConfig.attention_implementation` but `einsum`, the plain materialised softmax, which is
also taken whenever dropout acts on the weights or the log-sum-exp is needed (augmented
memory's write-back): SDPA returns neither.

Logits and softmax are float32 whatever the input dtype (model contract section 4). A learned temperature
(a tensor) is folded into the queries, as in flax.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLEMENTATIONS = ("auto", "cudnn", "splash", "xla", "chunked", "einsum")


@dataclasses.dataclass(frozen=True)
class Mask:
    """What a query may attend to. causal: key position `<=` query position. window:
    `|query - key| <= window` (with causal: `0 <= query - key <= window`). prefix: the first
    `prefix` keys are seen by every query."""

    causal: bool = False
    window: int | None = None
    prefix: int = 0

    @property
    def masks_anything(self) -> bool:
        return self.causal or self.window is not None


def allowed(mask: Mask, n_queries: int, n_keys: int, offset: int = 0, device=None) -> Tensor:
    """`(T, S)` bool: may query `i` (at position `offset + i`) see key `j`?"""
    q_pos = offset + torch.arange(n_queries, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :] - mask.prefix  # (1, S); the prefix sits at negative positions
    ok = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    if mask.causal:
        ok &= k_pos <= q_pos
    if mask.window is not None:
        ok &= (q_pos - k_pos <= mask.window) & (k_pos - q_pos <= (0 if mask.causal else mask.window))
    return ok | (k_pos < 0)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    *,
    scale: float | Tensor,
    offset: int = 0,
    implementation: str = "auto",
    dropout: nn.Dropout | None = None,
    return_lse: bool = False,
):
    """Scaled dot-product attention over heads.

    q (B, T, H, dh), k and v (B, S, H, dh) -> (B, T, H, dh) in q's dtype; with `return_lse`,
    also the float32 log-sum-exp of each query's scores (B, T, H).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if isinstance(scale, Tensor):  # a learned temperature: fold it into the queries
        q = (q.float() * scale).to(q.dtype)
        scale = 1.0
    dropping = dropout is not None and dropout.training and dropout.p > 0
    if implementation == "einsum" or return_lse or dropping:
        return _einsum(q, k, v, mask, float(scale), offset, dropout, return_lse)
    t, s = q.shape[1], k.shape[1]
    causal_only = mask.causal and mask.window is None and not mask.prefix and offset == 0
    attn_mask = None
    if mask.masks_anything and not causal_only:  # a prefix alone is only more keys
        attn_mask = allowed(mask, t, s, offset, q.device)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, is_causal=causal_only, scale=scale
    )  # (B, H, T, dh); is_causal aligns the queries with the first keys, as a fresh cache has them
    return y.transpose(1, 2)


def scores(q: Tensor, k: Tensor, scale: float | Tensor) -> Tensor:
    """q (B, T, H, dh), k (B, S, H, dh) -> float32 scores (B, H, T, S)."""
    return torch.einsum("bthd,bshd->bhts", q, k).float() * scale


def _einsum(q, k, v, mask: Mask, scale: float, offset: int, dropout, return_lse: bool):
    """The materialised softmax: scores (B, H, T, S) in float32, dropout on the weights."""
    logits = scores(q, k, scale)
    if mask.masks_anything:
        logits = logits.masked_fill(~allowed(mask, q.shape[1], k.shape[1], offset, q.device), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    if dropout is not None:
        weights = dropout(weights)
    y = torch.einsum("bhts,bshd->bthd", weights.to(v.dtype), v)
    if return_lse:
        return y, torch.logsumexp(logits, dim=-1).transpose(1, 2)  # (B, T, H)
    return y
