"""A third implementation, the oracle: the model contract (`docs/model.md`) in float64 NumPy.

Written from the contract alone, sharing no code with `torch_ref` or `flax_whisper`: explicit
loops where they are clearest (convolution taps, masks, rotary pairs, the dynamic kernel, the
memory write-back), plain arrays elsewhere. Weights are a dict of arrays under the contract's
parameter names (torch layout: linear weights `(out, in)`, conv weights `(out, in, k)`), the form
every checkpoint of this project can be read into. Nothing here is fast; everything is float64.

`Oracle(config, weights)` gives `encoder(mel)`, `decoder(tokens, xa)`, `logits(mel, tokens)`,
`loss(mel, labels)`, `attention(prefix, x, ...)` for any self-attention module by its parameter
prefix, and `train_step_memory(mel, labels)`, the memory write-back of one training-mode forward.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = -100


# ----------------------------------------------------------------------------- primitives


def linear(w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """y = x W^T + b (no bias when the contract's layer has none)."""
    y = x @ w[f"{prefix}.weight"].T
    bias = w.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def conv1d(w: dict, prefix: str, x: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """x (B, C_in, W) -> (B, C_out, W'): a loop over the kernel's taps."""
    weight, bias = w[f"{prefix}.weight"], w[f"{prefix}.bias"]  # (out, in, k), (out,)
    _, _, width = x.shape
    taps = weight.shape[2]
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
    out_width = (width + 2 * padding - taps) // stride + 1
    y = np.zeros((x.shape[0], weight.shape[0], out_width))
    for tap in range(taps):
        columns = padded[:, :, tap : tap + stride * (out_width - 1) + 1 : stride]  # (B, in, W')
        y += np.einsum("oi,biw->bow", weight[:, :, tap], columns)
    return y + bias[None, :, None]


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU."""
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - top)
    return e / e.sum(axis=axis, keepdims=True)


def norm(config, w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """The model's norm (`config.norm`) over the last axis."""
    if config.norm == "layernorm":
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]
    if config.norm == "rmsnorm":
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w[f"{prefix}.weight"]
    groups = config.norm_groups  # group_rms: RMS over each group of channels of one position
    shaped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    normed = shaped / np.sqrt((shaped**2).mean(-1, keepdims=True) + 1e-6)
    return normed.reshape(x.shape) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def mlp(config, w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    h = linear(w, f"{prefix}.fc1", x)
    if config.mlp_norm:
        h = norm(config, w, f"{prefix}.norm", h)
    return linear(w, f"{prefix}.fc2", gelu(h))


# ----------------------------------------------------------------------------- positions


def sinusoids(length: int, channels: int) -> np.ndarray:
    """OpenAI's table: channel i < C/2 is sin(t / 10000^(i / (C/2 - 1))), channel C/2 + i its cos."""
    half = channels // 2
    table = np.zeros((length, channels))
    for i in range(half):
        frequency = math.exp(-math.log(10000.0) * i / (half - 1))
        for t in range(length):
            table[t, i] = math.sin(t * frequency)
            table[t, half + i] = math.cos(t * frequency)
    return table


def position_rows(config, w: dict, side: str, start: int, length: int) -> np.ndarray | None:
    kind = config.encoder_positions if side == "encoder" else config.decoder_positions
    if kind == "none":
        return None
    rows = w[f"{side}.positional_embedding"][start : start + length]
    if kind == "learned_sinusoidal" and config.normalize_positions:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return rows


def rotate(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """x (B, T, H, dh): each pair (2i, 2i + 1) of a head turned by position * base^(-2i / dh)."""
    out = x.copy()
    dh = x.shape[-1]
    for i in range(dh // 2):
        theta = base ** (-2.0 * i / dh)
        for t, p in enumerate(positions):
            c, s = math.cos(p * theta), math.sin(p * theta)
            x0, x1 = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
            out[:, t, :, 2 * i] = x0 * c - x1 * s
            out[:, t, :, 2 * i + 1] = x0 * s + x1 * c
    return out


# ----------------------------------------------------------------------------- attention


def seen(n_queries: int, n_keys: int, causal: bool, window: int | None, offset: int = 0) -> np.ndarray:
    """(T, S) bool, by two loops: may the query at offset + i see the key at j?"""
    ok = np.zeros((n_queries, n_keys), bool)
    for i in range(n_queries):
        for j in range(n_keys):
            q = offset + i
            allowed = not causal or j <= q
            if window is not None:
                allowed = allowed and (q - j <= window) and (j - q <= (0 if causal else window))
            ok[i, j] = allowed
    return ok


def heads(x: np.ndarray, n_head: int) -> np.ndarray:
    return x.reshape(x.shape[0], x.shape[1], n_head, -1)


def attend(q, k, v, scale, allowed):
    """q (B, T, H, dh), k, v (B, S, H, dh), allowed (T, S) -> (B, T, H, dh) and weights (B, H, T, S)."""
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    logits = np.where(allowed[None, None], logits, -np.inf)
    weights = softmax(logits)
    return np.einsum("bhts,bshd->bthd", weights, v), weights


class Oracle:
    def __init__(self, config, weights: dict):
        self.config = config
        self.w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        self.written: dict[str, np.ndarray] = {}  # memory_state written by the last training forward

    # --------------------------------------------------------------- self-attention mechanisms

    def attention(self, prefix: str, x, kind: str, n_head: int, causal: bool, rotary: bool, valid=None, train=False):
        """The self-attention module at `prefix` of mechanism `kind` on x (B, T, d) -> (B, T, d).

        In training mode (`train`) a memory module with write-back records its next memory_state
        in `self.written[prefix]`, counting only positions where `valid` (B, T) is true.
        """
        if kind in ("mha", "biased"):
            return self.mha(prefix, x, n_head, causal, rotary)
        if kind == "memory":
            return self.memory(prefix, x, n_head, causal, rotary, valid, train)
        if kind == "dynamic_conv":
            return self.dynamic_conv(prefix, x, n_head, causal)
        if kind == "hybrid":
            return self.hybrid(prefix, x, n_head, causal, rotary, local="mha")
        u = self.hybrid(f"{prefix}.hybrid", x, n_head, causal, rotary, local="dynamic_conv")  # integrated
        y = self.memory(f"{prefix}.memory_attn", norm(self.config, self.w, f"{prefix}.ln_memory", x + u),
                        n_head, causal, rotary, valid, train)  # fmt: skip
        return u + y

    def scale(self, prefix: str, n_head: int) -> float:
        temperature = self.w.get(f"{prefix}.temperature")
        return float(temperature) if temperature is not None else (self.config.n_text_state // n_head) ** -0.5

    def queries_keys_values(self, prefix, x, n_head, rotary, offset=0):
        positions = np.arange(offset, offset + x.shape[1])
        q = heads(linear(self.w, f"{prefix}.query", x), n_head)
        k = heads(linear(self.w, f"{prefix}.key", x), n_head)
        v = heads(linear(self.w, f"{prefix}.value", x), n_head)
        if rotary:
            q = rotate(q, positions, self.config.rotary_base)
            k = rotate(k, positions, self.config.rotary_base)
        bias = self.w.get(f"{prefix}.content_bias")  # biased attention: u (H, dh) on every query, after rotary
        if bias is not None:
            q = q + bias
        return q, k, v

    def mha(self, prefix, x, n_head, causal, rotary, window=None, xa=None):
        if xa is not None:  # cross-attention: no rotary, nothing masked
            q = heads(linear(self.w, f"{prefix}.query", x), n_head)
            k = heads(linear(self.w, f"{prefix}.key", xa), n_head)
            v = heads(linear(self.w, f"{prefix}.value", xa), n_head)
            allowed = np.ones((x.shape[1], xa.shape[1]), bool)
        else:
            q, k, v = self.queries_keys_values(prefix, x, n_head, rotary)
            allowed = seen(x.shape[1], x.shape[1], causal, window)
        y, _ = attend(q, k, v, self.scale(prefix, n_head), allowed)
        return linear(self.w, f"{prefix}.out", y.reshape(x.shape))

    def memory(self, prefix, x, n_head, causal, rotary, valid=None, train=False):
        """Slots M = memory + memory_state as extra keys and values, seen by every query."""
        b, t, d = x.shape
        slots = self.w[f"{prefix}.memory"] + self.w[f"{prefix}.memory_state"]  # (m, d)
        m = slots.shape[0]
        q, k, v = self.queries_keys_values(prefix, x, n_head, rotary)
        slot_k = np.broadcast_to(
            heads(linear(self.w, f"{prefix}.key", slots[None]), n_head), (b, m, n_head, d // n_head)
        )
        slot_v = np.broadcast_to(
            heads(linear(self.w, f"{prefix}.value", slots[None]), n_head), (b, m, n_head, d // n_head)
        )
        allowed = np.concatenate([np.ones((t, m), bool), seen(t, t, causal, None)], axis=1)
        out, weights = attend(q, np.concatenate([slot_k, k], 1), np.concatenate([slot_v, v], 1),
                              self.scale(prefix, n_head), allowed)  # fmt: skip
        y = linear(self.w, f"{prefix}.out", out.reshape(b, t, d))
        if train and self.config.memory_update:
            self.written[prefix] = self.write_back(self.w[f"{prefix}.memory_state"], weights, y, valid)
        return y

    def write_back(self, state, weights, y, valid):
        """Contract revision 2: w = y; a = head-mean weight on each slot; padding counts nowhere."""
        m = state.shape[0]
        a = weights[..., :m].mean(axis=1)  # (B, T, m)
        count = np.ones(a.shape[:2]) if valid is None else valid.astype(np.float64)  # (B, T)
        delta = np.zeros_like(state)
        for s in range(m):
            share = (count * a[:, :, s])[..., None]  # (B, T, 1)
            delta[s] = (share * y).sum((0, 1)) / ((count * a[:, :, s]).sum() + 1e-6)
        mu = self.config.memory_momentum
        return (1 - mu) * state + mu * delta

    def dynamic_conv(self, prefix, x, n_head, causal):
        """Each position's own kernel of width K over the values, centred or past-only."""
        b, t, d = x.shape
        size = self.config.conv_kernel_size
        v = linear(self.w, f"{prefix}.value", x)
        kernels = softmax(linear(self.w, f"{prefix}.kernel_proj", x).reshape(b, t, n_head, size))  # (B, T, H, K)
        left = size - 1 if causal else size // 2
        y = np.zeros_like(v)
        dh = d // n_head
        for position in range(t):
            for tap in range(size):
                source = position + tap - left
                if 0 <= source < t:
                    for h in range(n_head):
                        channels = slice(h * dh, (h + 1) * dh)
                        y[:, position, channels] += kernels[:, position, h, tap, None] * v[:, source, channels]
        return linear(self.w, f"{prefix}.out", y)

    def hybrid(self, prefix, x, n_head, causal, rotary, local: str):
        local_in = norm(self.config, self.w, f"{prefix}.ln_local", x)
        if local == "mha":
            y_local = self.mha(f"{prefix}.local_attn", local_in, n_head, causal, rotary, window=self.config.window_size)
        else:
            y_local = self.dynamic_conv(f"{prefix}.local_attn", local_in, n_head, causal)
        y_global = self.mha(f"{prefix}.global_attn", norm(self.config, self.w, f"{prefix}.ln_global", x), n_head,
                            causal, rotary)  # fmt: skip
        return y_local + y_global

    # --------------------------------------------------------------- blocks and model

    def block(self, prefix, x, xa=None, valid=None, train=False):
        c = self.config
        decoder = xa is not None
        kind = c.decoder_attention if decoder else c.encoder_attention
        n_head = c.n_text_head if decoder else c.n_audio_head
        rotary = c.decoder_rotary if decoder else c.encoder_rotary
        x = x + self.attention(f"{prefix}.attn", norm(c, self.w, f"{prefix}.attn_ln", x), kind, n_head, decoder,
                               rotary, valid, train)  # fmt: skip
        if decoder:
            x = x + self.mha(f"{prefix}.cross_attn", norm(c, self.w, f"{prefix}.cross_attn_ln", x), n_head, False,
                             False, xa=xa)  # fmt: skip
        return x + mlp(c, self.w, f"{prefix}.mlp", norm(c, self.w, f"{prefix}.mlp_ln", x))

    def encoder(self, mel: np.ndarray, train: bool = False) -> np.ndarray:
        """mel (B, n_mels, frames) -> (B, ceil(frames / 2), d)"""
        x = gelu(conv1d(self.w, "encoder.conv1", np.asarray(mel, np.float64), 1, 1))
        x = gelu(conv1d(self.w, "encoder.conv2", x, 2, 1)).transpose(0, 2, 1)  # (B, T, d)
        rows = position_rows(self.config, self.w, "encoder", 0, x.shape[1])
        if rows is not None:
            x = x + rows
        for layer in range(self.config.n_audio_layer):
            x = self.block(f"encoder.blocks.{layer}", x, train=train)
        return norm(self.config, self.w, "encoder.ln_post", x)

    def decoder(self, tokens: np.ndarray, xa: np.ndarray, valid=None, train: bool = False) -> np.ndarray:
        """tokens (B, T), xa (B, S, d) -> logits (B, T, n_vocab); `valid` (B, T) marks real positions."""
        table = self.w["decoder.token_embedding.weight"]
        x = table[np.asarray(tokens)]
        rows = position_rows(self.config, self.w, "decoder", 0, x.shape[1])
        if rows is not None:
            x = x + rows
        for layer in range(self.config.n_text_layer):
            x = self.block(f"decoder.blocks.{layer}", x, xa, valid, train)
        return norm(self.config, self.w, "decoder.ln", x) @ table.T

    def logits(self, mel, tokens) -> np.ndarray:
        return self.decoder(tokens, self.encoder(mel))

    def teacher_forcing(self, labels: np.ndarray) -> np.ndarray:
        """The decoder's inputs: the start token, then the labels but the last (ignored ones read as start)."""
        start = self.config.start_token_id
        tokens = np.concatenate([np.full((labels.shape[0], 1), start), labels[:, :-1]], axis=1)
        return np.where(tokens == IGNORE, start, tokens)

    def loss(self, mel, labels, train: bool = False) -> float:
        """Mean cross-entropy over labels != -100; in training mode, also the memory write-back
        (into `self.written`), with the ignored positions as padding."""
        labels = np.asarray(labels)
        valid = labels != IGNORE
        xa = self.encoder(mel, train=train)
        logits = self.decoder(self.teacher_forcing(labels), xa, valid, train)
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return float(-(picked * valid).sum() / max(valid.sum(), 1))
