"""Shared fixtures: tiny configs and weight-identical model pairs.

Parity tests run in float32 with JAX matmuls at "highest" precision (CPU is exact anyway; GPUs
default to TF32 and TPUs to bf16 passes).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from whisper_io import huge_pages

# Tests compile many tiny programs, and two settings of XLA's CPU backend make that much faster:
# LLVM's optimisation level 0 (fast-math stays off either way), and XLA's elemental code generator
# in place of its newer fusion emitters (`--xla_cpu_use_fusion_emitters=false`: XLA's compile
# time about 2.3x shorter, the main suite 720 s -> 469 s on 2 cores). Element-wise results can
# differ from a default compilation in their last bits (measured: tanh up to 7 ulp, GELU 3,
# rsqrt and log1p 1; exp, log, erf, softmax and logsumexp bit for bit), far inside every
# tolerance; a test comparing two JAX programs compiles both alike. Set before jax is imported,
# and inherited by the CLI subprocesses the tests start. A user's own XLA_FLAGS win.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
)
# Most of the suite's time is XLA compiling, and many tests compile the same programs (a shared
# checkpoint transcribed by several tests, the CLIs' subprocesses, one tiny model's steps). The
# session keeps JAX's persistent compilation cache in a temporary directory of its own, made
# here by the first process (pytest itself, before its xdist workers start and inherit it) and
# removed by it at the end (`pytest_sessionfinish`): a program compiled by one test or process
# is read back by the next rather than compiled again (a cache hit is the executable the compile
# made; JAX keys it by the program, the devices and the compiler's flags). Nothing is read from
# or written to ~/.cache, where the CLIs keep theirs by default (tests of the cache give their
# own directory). `counting_compiles` counts a cache hit as a compilation. A directory given
# in FLAX_WHISPER_TEST_XLA_CACHE is used instead and kept.
if "FLAX_WHISPER_TEST_XLA_CACHE" not in os.environ:
    os.environ["FLAX_WHISPER_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="flax-whisper-tests-xla-")
    os.environ["FLAX_WHISPER_TEST_XLA_CACHE_MADE_BY"] = str(os.getpid())
os.environ["FLAX_WHISPER_COMPILE_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[
    "FLAX_WHISPER_TEST_XLA_CACHE"
]
# Programs that compile faster than this are not worth a file (JAX's default is 1 s).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
# The CLIs start themselves again once with glibc's huge-page tunable where it helps
# (`whisper_io.huge_pages`); the tests' CLI subprocesses inherit it from here and start once.
if not huge_pages.chosen(os.environ):
    os.environ["GLIBC_TUNABLES"] = huge_pages.with_tunable(os.environ)["GLIBC_TUNABLES"]
# Under pytest-xdist each worker gets its share of the cores for torch's (and NumPy's BLAS's)
# OpenMP threads: with a thread per core in every worker, OpenMP's spinning threads oversubscribe
# the machine and the torch side of the suite runs about 1.5x slower on 2 cores.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from whisper_config import PRESETS, ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus) -> None:
    """The session's compilation cache (top of this file) goes with the process that made it."""
    if os.environ.get("FLAX_WHISPER_TEST_XLA_CACHE_MADE_BY") == str(os.getpid()):
        shutil.rmtree(os.environ["FLAX_WHISPER_TEST_XLA_CACHE"], ignore_errors=True)


TINY = dict(
    n_mels=8,
    n_audio_ctx=16,
    n_audio_state=32,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=96,
    n_text_ctx=12,
    n_text_state=32,
    n_text_head=4,
    n_text_layer=2,
    decoder_start_token_id=1,
)


# Every configuration variant the parity tests cover: the five presets, the position options no
# preset uses, and each attention mechanism and norm (with the switches that go with them).
VARIANTS = {
    **{name: (name, {}) for name in PRESETS},
    "rotary_learned_sinusoidal_normalized": ("rotary_learned_sinusoidal", dict(normalize_positions=True)),
    "encoder_learned_sinusoidal_normalized": (
        "whisper",
        dict(encoder_positions="learned_sinusoidal", normalize_positions=True, decoder_positions="none"),
    ),
    "biased_temperature": (
        "rotary_sinusoidal",
        dict(encoder_attention="biased", decoder_attention="biased", learned_temperature=True),
    ),
    "dynamic_conv": (
        "whisper",
        dict(encoder_attention="dynamic_conv", decoder_attention="dynamic_conv", conv_kernel_size=5),
    ),
    "hybrid_rotary": ("all_rotary", dict(encoder_attention="hybrid", decoder_attention="hybrid", window_size=2)),
    "rmsnorm_mlp_norm": ("whisper", dict(norm="rmsnorm", mlp_norm=True)),
    "group_rms": (
        "whisper",
        dict(norm="group_rms", norm_groups=4, mlp_norm=True, decoder_attention="hybrid", window_size=1),
    ),
    "memory": (
        "rotary_rotary_sinusoidal",
        dict(encoder_attention="memory", decoder_attention="memory", memory_size=3, memory_update=True),
    ),
}


def tiny_config(preset: str = "whisper", **overrides) -> ModelConfig:
    return ModelConfig.from_preset(preset, **{**TINY, **overrides})


def variant_config(name: str) -> ModelConfig:
    """The tiny config of the variant `name` of VARIANTS."""
    preset, overrides = VARIANTS[name]
    return tiny_config(preset, **overrides)


def greedy_cover(held: dict[str, set]) -> set[str]:
    """Names (chosen greedily, most new items first) whose sets together hold every item of every
    set in `held`."""
    chosen, covered = set(), set()
    while left := {name: items - covered for name, items in held.items() if items - covered}:
        best = max(sorted(left), key=lambda name: len(left[name]))
        chosen.add(best)
        covered |= held[best]
    return chosen


def variant_settings(name: str, fields: tuple[str, ...] | None = None) -> set[tuple[str, str]]:
    """The (setting, value) pairs of a variant's tiny config, of every setting or of `fields`."""
    settings = variant_config(name).to_dict()
    return {(key, repr(value)) for key, value in settings.items() if fields is None or key in fields}


# The variants that between them give every setting every value any variant gives it (9 of 14: each
# mechanism on each side, each position kind and switch, each norm). The heaviest per-variant
# parity tests run these in the main suite and the rest, combinations of the same parts, under slow.
SETTING_COVER = greedy_cover({name: variant_settings(name) for name in VARIANTS})


def variant_params(in_main: set[str]) -> list:
    """Every variant as a parameter for the `variant` fixture (indirect), `slow` unless in_main."""
    return [pytest.param(name, marks=[] if name in in_main else pytest.mark.slow) for name in sorted(VARIANTS)]


def make_pair(config: ModelConfig, seed: int = 0):
    """(torch_ref.Whisper, flax_whisper.Whisper) in eval mode with the same weights.

    Every weight is perturbed after the default init so that norm scales, biases and zero-init
    tensors hold distinct values: a wrong mapping cannot hide behind ones and zeros.
    """
    from convert import new_flax_model
    from convert.core import torch_to_numpy
    from torch_ref import Whisper as TorchWhisper

    torch.manual_seed(seed)
    torch_model = TorchWhisper(config)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch_model.eval()
    flax_model = new_flax_model(config, torch_to_numpy(torch_model))
    flax_model.eval()
    return torch_model, flax_model


def openai_dims(**overrides):
    """Tiny dimensions with OpenAI Whisper's real multilingual vocabulary and 80 mel bins."""
    from whisper.model import ModelDimensions

    dims = dict(n_mels=80, n_audio_ctx=20, n_audio_state=64, n_audio_head=4, n_audio_layer=2, n_vocab=51865)
    dims.update(n_text_ctx=16, n_text_state=64, n_text_head=4, n_text_layer=2)
    return ModelDimensions(**{**dims, **overrides})


OPENAI_DIMS = openai_dims()


def random_openai_model(noise: float, dims=OPENAI_DIMS, seed: int = 0):
    """OpenAI's own `whisper.model.Whisper` (eval mode) with random weights around OpenAI's init:
    norm scales near 1, everything else `noise`-sized."""
    import whisper

    torch.manual_seed(seed)
    model = whisper.model.Whisper(dims)
    with torch.no_grad():
        # OpenAI leaves decoder.positional_embedding uninitialised (torch.empty): fill every tensor,
        # the stored encoder sinusoids included (contract 6: checkpoints carry their own table).
        for name, tensor in model.state_dict().items():
            scaled = noise * torch.randn_like(tensor)
            tensor.copy_((1.0 if name.endswith("ln.weight") or "_ln." in name else 0.0) + scaled)
            if name == "encoder.positional_embedding":
                tensor.copy_(whisper.model.sinusoids(*tensor.shape) + 1e-3 * scaled)
    return model.eval()


def favour_timestamps(model, favoured: list[int], begin: int, seed: int = 1) -> None:
    """Make a random OpenAI `model` sample timestamps as well as text: each timestamp's embedding
    row (ids from `begin`) becomes 0.8 times the row of one of the `favoured` tokens plus noise,
    so that the timestamps' summed probability often beats the best text token's."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        table = model.decoder.token_embedding.weight
        count = table.shape[0] - begin
        chosen = torch.from_numpy(rng.choice(favoured, count))
        noise = torch.from_numpy(rng.standard_normal((count, table.shape[1])).astype(np.float32))
        table[begin:] = 0.8 * table[chosen] + 0.3 * noise * table.std()


def save_openai_model(model, path):
    """Write `model` as an OpenAI `.pt` checkpoint ({"dims", "model_state_dict"}); returns `path`."""
    import dataclasses

    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path


@nnx.jit
def flax_forward(model, mel, tokens):
    """Jitted `model(mel, tokens)`: one compile per shape rather than one per primitive."""
    return model(mel, tokens)


def use_kv_layout(monkeypatch, layout: str) -> None:
    """Keep keys, values and KV caches in `layout` (`kernel.BSHD`: GPUs' and TPUs' `(B, S, H,
    dh)`) on this CPU, for the rest of the test: every flax_whisper module reads `kv_layout()`
    when tracing, so programs traced afterwards use it."""
    import sys

    from flax_whisper import kernel

    original = kernel.kv_layout
    for name, module in list(sys.modules.items()):
        if name.startswith("flax_whisper") and getattr(module, "kv_layout", None) is original:
            monkeypatch.setattr(module, "kv_layout", lambda: layout)
    assert kernel.kv_layout() == layout


def random_batch(config: ModelConfig, batch: int, frames: int, n_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((batch, config.n_mels, frames)).astype(np.float32)
    tokens = rng.integers(0, config.n_vocab, (batch, n_tokens))
    return mel, tokens


def assert_close(ours, reference, atol: float, what: str = "") -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    diff = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64))))
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.0e}"


@pytest.fixture(scope="session")
def config() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def pair(config):
    return make_pair(config)


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant(request) -> ModelConfig:
    """A tiny config of each position variant."""
    return variant_config(request.param)


@pytest.fixture(scope="session")
def variant_pair(variant):
    return make_pair(variant, seed=11)


def product_operand_dtypes(compiled_text: str) -> list[tuple[str, str]]:
    """The element types of the two operands of each product (`dot`) in a compiled program's text,
    as XLA writes them ("bf16", "f32")."""
    types, found = {}, []
    for line in compiled_text.splitlines():
        defined = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if defined:
            types[defined.group(1)] = defined.group(2)
        product = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if product:
            found.append((types[product.group(1)], types[product.group(2)]))
    return found


SAMPLE_LEN = 8  # OpenAI's `sample_len` in the decoding oracle: tokens sampled after the prompt


def openai_greedy(model, mel, language, sample_len: int = SAMPLE_LEN):
    """OpenAI's own greedy decoding (temperature 0, no timestamps) of mel (B, n_mels, frames)."""
    import whisper

    options = whisper.DecodingOptions(
        language=language, without_timestamps=True, fp16=False, temperature=0.0, sample_len=sample_len
    )
    return whisper.decoding.decode(model, torch.from_numpy(np.asarray(mel)), options)


@pytest.fixture(scope="session")
def decoding_checkpoint(tmp_path_factory):
    """(OpenAI model, its `.pt` path, mel (4, 80, 40)): a random model whose greedy outputs depend on
    the audio and stop at varied lengths.

    Weights of unit scale make the encoder matter (with small ones every row decodes the same
    token). End of text then gets the embedding row, scaled by 1.05, of the sampled token whose
    first appearance varies most between rows, so that rows end where it would have come.
    """
    from whisper_config import ModelConfig
    from whisper_io import tokenizer_for

    model = random_openai_model(noise=1.0, seed=0)
    mel = np.random.default_rng(0).standard_normal((4, 80, 2 * model.dims.n_audio_ctx)).astype(np.float32)
    rows = [result.tokens for result in openai_greedy(model, mel, "en")]

    def spread(token: int) -> int:
        return len({row.index(token) if token in row else SAMPLE_LEN for row in rows})

    frequent = max(sorted({t for row in rows for t in row}), key=spread)
    eot = tokenizer_for(ModelConfig.from_openai_dims(vars(model.dims))).eot
    with torch.no_grad():
        embedding = model.decoder.token_embedding.weight
        embedding[eot] = 1.05 * embedding[frequent]
    path = save_openai_model(model, tmp_path_factory.mktemp("decode") / "random.pt")
    return model, path, mel


# Python code that makes `import torch` fail, to prefix `python -c` programs that must prove the
# JAX path needs no torch (a meta-path hook rather than sys.modules["torch"] = None, which trips
# libraries that probe sys.modules for torch).
BLOCK_TORCH = """\
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


def convert_cli(*args, ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m convert ARGS` as its `main` in this process (a subprocess would spend seconds
    importing and compiling again what this one has): exit status, stdout and stderr. With `ok`,
    the status must be 0. `tests/test_convert.py` runs the command itself in a subprocess."""
    from convert.__main__ import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse's errors and --help; as the interpreter reads its code
            status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    done = subprocess.CompletedProcess(["python", "-m", "convert", *argv], status, out.getvalue(), err.getvalue())
    if ok:
        assert done.returncode == 0, done.stderr
    return done


@contextlib.contextmanager
def counting_compiles():
    """A list with one entry per XLA compilation (or persistent-cache hit) while the block runs."""
    compiles: list[float] = []

    def count(event: str, duration: float, **_) -> None:
        # XLA compiled a program, or it was read back from the session's persistent cache (see
        # the top of this file): either way jit's own cache missed.
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(count)


# Long-form transcription (tests/test_longform.py, tests/test_chunked.py): real speech over 60 s.
SPEECH_TEXT = (
    "The north wind and the sun were disputing which was the stronger, when a traveler came along "
    "wrapped in a warm cloak. They agreed that the one who first succeeded in making the traveler "
    "take his cloak off should be considered stronger than the other. Then the north wind blew as "
    "hard as he could, but the more he blew the more closely did the traveler fold his cloak "
    "around him; and at last the north wind gave up the attempt. Then the sun shined out warmly, "
    "and immediately the traveler took off his cloak. And so the north wind was obliged to "
    "confess that the sun was the stronger of the two. Seven, three, nine. The quick brown fox "
    "jumps over the lazy dog. A journey of a thousand miles begins with a single step. She sells "
    "sea shells by the sea shore, and the shells she sells are surely sea shells. Peter Piper "
    "picked a peck of pickled peppers. How much wood would a woodchuck chuck if a woodchuck could "
    "chuck wood? The rain in Spain stays mainly in the plain."
)


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> Path:
    """About 80 s of real synthetic speech (espeak-ng, en-us, 16 kHz mono)."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("needs espeak-ng and sox (apt-get install espeak-ng sox; .ci/run installs them)")
    folder = tmp_path_factory.mktemp("speech")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-g", "8", "-w", str(folder / "raw.wav"), SPEECH_TEXT], check=True
    )
    # -D: no dither, which sox otherwise adds at random when it writes 16-bit samples
    sox = ["sox", str(folder / "raw.wav"), "-D", "-r", "16000", "-c", "1", "-b", "16", str(folder / "long.wav")]
    subprocess.run(sox, check=True)
    return folder / "long.wav"


def longform_openai_model(query_scale: float = 1.0):
    """An OpenAI model of 30 s windows (1500 positions), one layer each side. Each timestamp's
    embedding row is 0.8 times that of one of three text tokens the model samples often on
    speech, plus noise, so timestamps often win OpenAI's timestamp-vs-text rule; end of text gets
    1.05 times the row of a token that comes at varied places, so windows end early. The
    cross-attention queries are scaled by `query_scale`."""
    from whisper.tokenizer import get_tokenizer

    model = random_openai_model(1.0, openai_dims(n_audio_ctx=1500, n_text_ctx=448, n_audio_layer=1, n_text_layer=1))
    tokenizer = get_tokenizer(True, num_languages=99)
    favour_timestamps(model, [7320, 29736, 11527], tokenizer.timestamp_begin)
    with torch.no_grad():
        table = model.decoder.token_embedding.weight
        table[tokenizer.eot] = 1.05 * table[3797]
        query = model.decoder.blocks[0].cross_attn.query
        query.weight.mul_(query_scale)
        query.bias.mul_(query_scale)
    return model
