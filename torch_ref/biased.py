"""Biased attention (contract 4.2): multi-head attention with a learned per-head content bias.

`logit[h, i, j] = ((q[h, i] + u[h]) . k[h, j]) * s`, with `u (H, dh)` zero-initialised and added
after rotary: Transformer-XL's global content bias (Dai et al. 2019). Keys that align with `u` get
attention whatever the query, a learned feature priority. The seed added an `(H, dh)` bias to
`(H, H)`-shaped scores (contract 7.1); this is the working form of that idea.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.attention import MultiHeadAttention
from whisper_config import ModelConfig


class BiasedAttention(MultiHeadAttention):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False):
        super().__init__(n_state, n_head, config, rotary)
        self.content_bias = nn.Parameter(torch.zeros(n_head, n_state // n_head))
