"""Parity verification: one set of weights in both frameworks, the same input, the differences.

`verify(config, tensors)` loads the weights into `torch_ref` and `flax_whisper` (one at a time, so
a large model fits in memory), checks that the torch -> flax -> torch round trip is bit-exact,
runs both models in eval mode and float32 (JAX matmuls at "highest" precision) on the same random
log-mel and tokens, and compares the encoder output, the logits and the next-token loss. A
comparison passes when `max|flax - torch| <= atol + rtol * max|torch|`.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping

import jax
import numpy as np

from convert.core import flax_to_torch_lazily, new_flax_model, new_torch_model
from convert.tensors import shapes_of
from whisper_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    ok: bool


def compare(name: str, ours, reference, atol: float, rtol: float) -> Comparison:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"{name}: shapes differ, {ours.shape} vs {reference.shape}")
    max_abs = float(np.max(np.abs(ours - reference)))
    scale = float(np.max(np.abs(reference)))
    max_rel = max_abs / scale if scale else max_abs
    return Comparison(name, max_abs, max_rel, max_abs <= atol + rtol * scale)


def random_inputs(config: ModelConfig, batch: int, frames: int, n_tokens: int, seed: int):
    """Standard-normal log-mel (B, n_mels, frames) and uniform token ids (B, T), both NumPy."""
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((batch, config.n_mels, frames)).astype(np.float32)
    tokens = rng.integers(0, config.n_vocab, (batch, n_tokens)).astype(np.int64)
    return mel, tokens


def verify(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    batch: int = 2,
    frames: int | None = None,
    n_tokens: int | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    log: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
) -> list[Comparison]:
    """Run both frameworks on the same weights and input; return (and log) the comparisons.
    `progress`, when given, is told each step as it starts (a large-v3 takes minutes)."""
    progress = progress or (lambda step: None)
    import torch

    import torch_ref

    frames = 2 * config.n_audio_ctx if frames is None else frames
    n_tokens = min(32, config.n_text_ctx) if n_tokens is None else n_tokens
    mel, tokens = random_inputs(config, batch, frames, n_tokens, seed)
    n_weights = sum(int(np.prod(shape)) for shape in shapes_of(tensors).values())
    log(f"input: mel {mel.shape}, tokens {tokens.shape}, seed {seed}; {n_weights:,} weights in {len(tensors)} tensors")

    # One framework's model in memory at a time (a large-v3 is 6 GB in float32): torch first,
    # its outputs kept, then flax. `tensors` may be read lazily from the checkpoint file.
    progress("torch_ref: loading the weights")
    torch_model = new_torch_model(config, tensors).eval()
    progress("torch_ref: encoder and decoder forward")
    with torch.no_grad():
        mel_t, tokens_t = torch.from_numpy(mel), torch.from_numpy(tokens)
        enc_t = torch_model.encoder(mel_t)
        logits_t, _ = torch_model.decoder(tokens_t, enc_t)
        loss_t = torch_ref.cross_entropy(logits_t[:, :-1], tokens_t[:, 1:])
    del torch_model
    _release_freed_memory()

    progress("flax_whisper: loading the weights")
    flax_model = new_flax_model(config, tensors)
    flax_model.eval()
    progress(f"round trip torch->flax->torch of {len(tensors)} tensors")
    # The round trip, tensor by tensor: flax's arrays back to torch layout equal the float32 weights.
    back = flax_to_torch_lazily(flax_model)
    worst, identical = 0.0, True
    for key in tensors:
        original, again = np.asarray(tensors[key], np.float32), back[key]
        worst = max(worst, float(np.max(np.abs(again - original), initial=0.0)))
        identical = identical and np.array_equal(again, original)
    results = [Comparison("round trip torch->flax->torch", worst, worst, identical)]
    progress("flax_whisper: compiling and running the encoder and decoder forward")
    with jax.default_matmul_precision("highest"):
        enc_f, logits_f, loss_f = _flax_outputs(flax_model, jax.numpy.asarray(mel), jax.numpy.asarray(tokens))
    results += [
        compare("encoder output", enc_f, enc_t.numpy(), atol, rtol),
        compare("logits", logits_f, logits_t.numpy(), atol, rtol),
        compare("loss", loss_f, loss_t.numpy(), atol, rtol),
    ]
    log(f"{'quantity':<32} {'max abs diff':>13} {'max rel diff':>13}  result")
    for r in results:
        log(f"{r.name:<32} {r.max_abs:>13.3e} {r.max_rel:>13.3e}  {'ok' if r.ok else 'FAIL'}")
    return results


def _flax_outputs(model, mel, tokens):
    """Encoder output, logits and next-token loss in one jitted call (one compile, not one per op),
    through `flax_whisper.pure_jit`: it returns only the outputs, never a copy of the model's state
    (which `nnx.jit` hands back), so a large model is not held twice."""
    import flax_whisper

    @flax_whisper.pure_jit
    def run(model, mel, tokens):
        enc = model.encoder(mel)
        logits, _ = model.decoder(tokens, enc)
        return enc, logits, flax_whisper.cross_entropy(logits[:, :-1], tokens[:, 1:])

    return run(model, mel, tokens)


def _release_freed_memory() -> None:
    """Collect, and hand freed heap memory back to the OS: glibc keeps the torch model's freed
    tensors in its heap otherwise (gigabytes at large-v3 size), on top of the flax model."""
    import contextlib
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
