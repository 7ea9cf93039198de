"""The benchmarks' model FLOPs and the peak their utilisation is taken of (`bench/steps.py`,
`bench/timing.py`)."""

import sys
from pathlib import Path

import jax
import pytest
from conftest import TINY, tiny_config

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import timing
from steps import encoder_flops, step_flops

from train import TrainConfig


def encoder_products(config, batch: int, frames: int) -> int:
    """The FLOPs of the encoder's products, counted by hand: the two convolutions (width 3, the
    second with stride 2), then per layer the four projections, the scores and the mixing of
    values, and the 4x-wide MLP; a multiply-add is two FLOPs."""
    d, s = config.n_audio_state, frames // 2
    convolutions = 2 * batch * 3 * (frames * config.n_mels * d + s * d * d)
    projections = 2 * batch * s * 4 * d * d
    attention = 2 * 2 * batch * s * s * d
    mlp = 2 * 2 * batch * s * d * 4 * d
    return convolutions + config.n_audio_layer * (projections + attention + mlp)


@pytest.mark.parametrize("attention", ["auto", "chunked"])
def test_the_encoder_count_holds_every_product_of_every_layer(attention):
    """XLA's count covers at least the hand-counted products and little more (its element-wise
    operations: norms, GELU, softmax), however the model would run: a chunked attention or a
    scanned stack counted as it runs would show one block of one head, or one layer."""
    # 128 positions of width 32: attention is most of the products, as in a real encoder
    config = tiny_config(n_audio_ctx=128, n_audio_layer=3, attention_implementation=attention, unroll_layers=False)
    products = encoder_products(config, batch=2, frames=2 * config.n_audio_ctx)
    counted = encoder_flops(config, batch=2, frames=2 * config.n_audio_ctx)
    assert products <= counted <= 1.2 * products, (counted, products)


def test_the_step_count_does_not_depend_on_how_the_layers_run():
    """Scanned, rematerialised or chunked, the model is the same: so is its count, about three
    times the forward's products (a forward and a backward of twice its work)."""
    base = dict(warmup_steps=0, model={**TINY, "unroll_layers": True})
    plain = step_flops(TrainConfig(**base), batch=2, frames=32, tokens=8)
    other = {**TINY, "unroll_layers": False, "gradient_checkpointing": True, "attention_implementation": "chunked"}
    assert step_flops(TrainConfig(**{**base, "model": other}), batch=2, frames=32, tokens=8) == plain
    forward = encoder_products(tiny_config(), batch=2, frames=32)
    assert plain > 3 * forward  # the decoder, vocabulary logits and optimiser come on top


def test_the_peak_is_the_one_given_a_known_devices_or_measured_here(monkeypatch):
    assert timing.peak_flops("bfloat16", 2.5) == (2.5e12, "--peak-tflops")
    rate, source = timing.peak_flops("float32")  # this CPU: XLA's own product, measured
    assert "measured" in source and "2048 x 2048" in source
    assert rate > 1e9, "a CPU's float32 product runs faster than a GFLOP/s"

    class H100:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "devices", lambda *_: [H100()])
    assert timing.peak_flops("bfloat16") == (989e12, "H100 dense bfloat16 peak")


def test_the_measured_rate_is_the_fastest_call(monkeypatch):
    """A busy moment of a shared machine only slows a call: the rate is that of the fastest."""
    clock = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0])  # calls of 4, 2 and 3 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.matmul_rate("float32", 8, repeats=3) == 2 * 8**3 / 2.0


def test_the_header_names_the_processor_and_its_widest_vector_instructions():
    """`timing.processor` reads /proc/cpuinfo's text: the model of the first processor, the number
    of processors listed, and AVX-512 (with its bfloat16 and AMX extensions when flagged) before
    AVX2, whose flags a line holds among many others."""

    def cpuinfo(flags: str, processors: int = 2) -> str:
        one = (
            "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14\n"
        )
        return "\n".join(one.format(i) + f"flags\t\t: fpu sse2 {flags} xsave\n" for i in range(processors))

    assert timing.processor(cpuinfo("avx avx2 fma")) == (
        "cpu: AMD EPYC 9B14 (family 25, model 17), 2 cores, AVX2 (no AVX-512)"
    )
    assert timing.processor(cpuinfo("avx2 avx512f avx512_bf16 avx512vl", 4)).endswith("4 cores, AVX-512 with BF16")
    assert timing.processor(cpuinfo("avx2 avx512f amx_bf16 avx512_bf16")).endswith("AVX-512 with BF16 and AMX")
    assert timing.processor(cpuinfo("avx2 avx512f")).endswith("AVX-512")
    assert timing.processor(cpuinfo("sse4_2 avx")).endswith("no AVX2")
    assert timing.processor().startswith("cpu: ")  # this machine's, whatever it is
