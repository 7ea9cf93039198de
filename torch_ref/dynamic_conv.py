"""Dynamic convolution (contract 4.4; Wu et al. 2019, "Pay Less Attention with Lightweight and
Dynamic Convolutions"): each position predicts its own convolution kernel over the values.

`v = value(x)`; `w = softmax_K(kernel_proj(x))` of shape (B, T, H, K), dropout on `w`;
`y[t, c] = sum_k w[t, h(c), k] * v[t + k - p, c]` with zeros outside `[0, T)`, `h(c) = c // dh`,
`p = K // 2` in the encoder (centred), `p = K - 1` in the decoder (past only); output `out(y)`.
The seed computed q/k/v and dropped them, applying a static grouped convolution (contract 7.3).

Incremental decoding caches the last `K - 1` rows of `v`: `{"v": (B, K - 1, d)}`, zeros at the
start, which is exactly the zero padding before position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ref.layers import Linear
from whisper_config import ModelConfig

Cache = dict[str, Tensor]


class DynamicConvAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int, config: ModelConfig, rotary: bool = False):
        super().__init__()
        # No queries or keys: config validation rejects rotary with this mechanism.
        self.n_head = n_head
        self.kernel_size = config.conv_kernel_size
        self.value = Linear(n_state, n_state)
        self.kernel_proj = Linear(n_state, n_head * self.kernel_size)
        self.out = Linear(n_state, n_state)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self, x: Tensor, *, causal: bool = False, cache: Cache | None = None, offset: int = 0, valid=None
    ) -> tuple[Tensor, Cache | None]:
        """x (B, T, d) -> (B, T, d), updated cache (causal only)."""
        b, t, d = x.shape
        h, k = self.n_head, self.kernel_size
        v = self.value(x)  # (B, T, d)
        w = F.softmax(self.kernel_proj(x).float().view(b, t, h, k), dim=-1).to(v.dtype)  # (B, T, H, K)
        w = self.attention_dropout(w)
        if causal:
            past = torch.zeros(b, k - 1, d, dtype=v.dtype, device=v.device) if cache is None else cache["v"]
            padded = torch.cat([past.to(v.dtype), v], dim=1)  # (B, K - 1 + T, d)
            if cache is not None:
                cache = {"v": padded[:, t:]}  # the last K - 1 rows
        else:
            padded = F.pad(v, (0, 0, k // 2, k - 1 - k // 2))  # (B, T + K - 1, d)
        # y[t] = sum_j w[t, :, j] v[t + j - p], head by head: the K shifted views of the values,
        # weighted and summed, in float32 and rounded once, as a product accumulates.
        heads = (b, t, h, d // h)
        y = sum(w[..., j, None].float() * padded[:, j : j + t].reshape(heads).float() for j in range(k))
        return self.out(y.to(v.dtype).reshape(b, t, d)), cache

    def init_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Cache:
        """The values of the `K - 1` positions before the first token: zeros, (B, K - 1, d)."""
        return {"v": torch.zeros(batch, self.kernel_size - 1, self.out.out_features, dtype=dtype, device=device)}

    def cache_capacity(self, cache: Cache) -> None:
        """A fixed window of past values: it never fills up."""
        return None
