"""Primitive layers of the PyTorch reference (model contract section 2).

Each mirrors OpenAI Whisper's dtype-casting layers: weights are cast to the input's dtype, norm
statistics are taken in float32. `flax_whisper/layers.py` holds the same classes under the same
names; the converter maps `weight`/`kernel`, `weight`/`scale` and `weight`/`embedding` between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from whisper_config import ModelConfig

EMBEDDING_STD = 0.02


class Linear(nn.Linear):
    """`y = x W^T + b`, weight `(out, in)`; Xavier-uniform weight, zero bias."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv1d(nn.Conv1d):
    """NCW convolution, weight `(out, in, k)`; Kaiming-uniform (ReLU gain) weight, zero bias."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class LayerNorm(nn.LayerNorm):
    """LayerNorm with eps 1e-5 and float32 statistics; the result has the input's dtype."""

    def __init__(self, n_state: int, eps: float = 1e-5):
        super().__init__(n_state, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`, eps 1e-6, float32 statistics."""

    def __init__(self, n_state: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_state))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


class GroupRMSNorm(nn.Module):
    """The seeds' "GroupNorm (RMS)", per position: RMS-normalise each of `groups` channel groups,
    then `* weight + bias` per channel. Never across time (the seed's version made outputs depend
    on sequence length)."""

    def __init__(self, n_state: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(n_state))
        self.bias = nn.Parameter(torch.zeros(n_state))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d)"""
        x32 = x.float().unflatten(-1, (self.groups, -1))  # (..., G, d/G)
        y = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (y * self.weight + self.bias).to(x.dtype)


class Embedding(nn.Embedding):
    """Token table `(n_vocab, d)`, normal(0, 0.02) init (std 1 would make tied logits huge)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=EMBEDDING_STD)


class MLP(nn.Module):
    """`fc1 (d -> 4d) -> [norm (4d) if mlp_norm] -> GELU (exact) -> Dropout -> fc2 (4d -> d)`.

    OpenAI names `fc1`/`fc2` `mlp.0` and `mlp.2` (an `nn.Sequential`); the converter maps those
    names. The optional norm is the seed notebook's.
    """

    def __init__(self, n_state: int, n_mlp: int, config: ModelConfig):
        super().__init__()
        self.fc1 = Linear(n_state, n_mlp)
        self.norm = make_norm(config, n_mlp) if config.mlp_norm else None
        self.fc2 = Linear(n_mlp, n_state)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d) -> (B, T, d)"""
        h = self.fc1(x)  # (B, T, 4d)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(self.dropout(gelu(h)))


NORMS = {
    "layernorm": lambda n_state, config: LayerNorm(n_state),
    "rmsnorm": lambda n_state, config: RMSNorm(n_state),
    "group_rms": lambda n_state, config: GroupRMSNorm(n_state, config.norm_groups),
}


def make_norm(config: ModelConfig, n_state: int) -> nn.Module:
    """The norm every sub-layer of the model uses (`config.norm`)."""
    return NORMS[config.norm](n_state, config)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, as OpenAI Whisper."""
    return F.gelu(x)
