"""One training step (forward, cross-entropy, backward, clipping, AdamW): flax_whisper against
Hugging Face `transformers` and torch_ref, in one run, with ratios.

    python bench/train_step.py                      # this machine's CPU: tiny, batch 4, 30 s, 64 tokens
    python bench/train_step.py --size small --batch 32 --tokens 448 --precision bfloat16 \
        --mechanisms mha,biased,memory,dynamic_conv,hybrid,integrated      # the GPU configuration

For each mechanism in `--mechanisms` (self-attention of both sides; the `whisper` preset
otherwise), `flax_whisper`'s jitted step; for `mha`, also `WhisperForConditionalGeneration`
(SDPA attention, eager and `torch.compile`, the same dimensions, its own random weights) and
`torch_ref` (eager and `torch.compile`) on the same batch and AdamW settings. Prints the median
step time, samples/s, the speedup of flax_whisper over each, the model FLOPs (XLA's cost
analysis of the step lowered with its layers unrolled: the analysis counts a loop's body once;
the torch rows run the same model), each row's model FLOPs utilisation, and the step's memory
(XLA's memory analysis of the compiled program; torch on GPUs: `max_memory_allocated`). The
utilisation is of `--peak-tflops`, else of a known GPU's dense peak, else (a CPU) of the rate
XLA's product of two 2048 x 2048 matrices reaches on this machine, measured in the same run:
what is left above it is time spent outside the model's products. float32 on GPUs: XLA multiplies in TF32
by default while torch keeps full float32, so compare bfloat16 rows for like with like.
`--rounds` (default 3 on a CPU) times every competitor again, in turn, and reports the median of
the rounds with the range of each speedup over them: on a shared CPU, runs minutes apart differ
by more than the gaps measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Both frameworks share one accelerator: JAX must not preallocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np
from flax import nnx
from peers import hf_config
from steps import LAYOUTS, layout_name, step_flops
from timing import Results, Rounds, comma_list, peak_flops, processor, profile

from convert.core import flax_to_torch
from flax_whisper import Whisper, kernel
from train.config import TrainConfig
from train.step import Graphs, make_optimizer, new_state, train_step
from whisper_config import PRESETS, SIZES
from whisper_config.config import ATTENTION_KINDS
from whisper_io.huge_pages import describe, restart_with_huge_pages

BANDS = ("cudnn", "xla")


def time_flax(
    args, rounds: Rounds, name: str, config: TrainConfig, model: Whisper, mel: np.ndarray, labels: np.ndarray
) -> dict:
    tx = make_optimizer(config)
    step_fn = jax.jit(functools.partial(train_step, graphs=Graphs.of(model), tx=tx, config=config), donate_argnums=0)
    batch = {"mel": jax.device_put(mel), "labels": jax.device_put(labels)}
    holder = {"state": new_state(model, tx)}
    compiled = step_fn.lower(holder["state"], batch).compile()
    memory = compiled.memory_analysis()

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    seconds = rounds.time(name, step, warmup=2)
    if args.profile:  # the first mechanism only: a trace of three more steps
        profile(args.profile, step, calls=3)
        args.profile = None
    result = {"seconds": seconds, "flops": step_flops(config, mel.shape[0], mel.shape[2], labels.shape[1])}
    if memory is not None:
        used = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
        result["memory"] = used - memory.alias_size_in_bytes
    return result


def time_torch(
    args, rounds: Rounds, config: TrainConfig, model_config, initial, mel: np.ndarray, labels: np.ndarray
) -> dict:
    try:
        import torch
    except ImportError:
        print("torch is not installed: timing flax_whisper only")
        return {}
    from convert.core import new_torch_model
    from train.torch_train import torch_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")
    mel_t, labels_t = torch.from_numpy(mel).to(device), torch.from_numpy(labels).long().to(device)

    def timed(name: str, module, loss_fn, warmup: int = 2) -> dict:
        optimizer, scheduler = torch_optimizer(module, config)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(mel_t, labels_t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.clip_norm)
            optimizer.step()
            scheduler.step()
            if device == "cuda":
                torch.cuda.synchronize()

        result = {"seconds": rounds.time(name, step, warmup)}
        if device == "cuda":
            result["memory"] = torch.cuda.max_memory_allocated()
        return result

    def compiled(make, name: str, results: dict) -> None:
        if args.no_compile:
            return
        try:
            module, row = make(), f"{name} (torch.compile)"
            results[row] = timed(row, module, torch.compile(module.loss_fn), warmup=3)
        except Exception as e:  # torch.compile needs a working C++ toolchain; report, do not fail
            print(f"torch.compile of {name} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    results = Results()
    if not args.no_hf:
        try:
            from transformers import WhisperForConditionalGeneration
        except ImportError:
            print("transformers is not installed: skipping Hugging Face")
        else:
            hf = hf_config(model_config, decoder_start_token_id=model_config.start_token_id)

            def make_hf():
                model = WhisperForConditionalGeneration(hf).to(device).train()
                model.loss_fn = lambda mel, labels: model(input_features=mel, labels=labels).loss
                return model

            model = make_hf()
            results["transformers (eager, sdpa)"] = timed("transformers (eager, sdpa)", model, model.loss_fn)
            del model
            compiled(make_hf, "transformers", results)

    def make_ref():
        model = new_torch_model(model_config, initial).to(device).train()
        model.loss_fn = model.loss
        return model

    if not args.no_torch_ref:
        ref = make_ref()
        results["torch_ref (eager)"] = timed("torch_ref (eager)", ref, ref.loss_fn)
        del ref
        compiled(make_ref, "torch_ref", results)
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"torch device: {device}, {torch.get_num_threads()} threads")
    return results


def arguments() -> argparse.ArgumentParser:
    """The command line, checked as it is read: a misspelt size or mechanism stops the run before
    any competitor is timed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--preset", default="whisper", choices=tuple(PRESETS))
    parser.add_argument(
        "--mechanisms",
        default="mha",
        type=comma_list(ATTENTION_KINDS),
        help=f"comma-separated self-attention mechanisms: {', '.join(ATTENTION_KINDS)}",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, help="mel frames (default: the model's 2 * n_audio_ctx)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, help=Rounds.HELP)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak, for MFU (default: known GPUs' dense peak, else XLA's large product measured here)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a jax.profiler trace of the first mechanism's step and print its longest operations",
    )
    parser.add_argument(
        "--layers",
        default="auto",
        choices=(*LAYOUTS, "both"),
        help="flax: the default layout (auto: up to 12 layers a side unrolled), layers under nnx.scan "
        "(unroll_layers=False), unrolled (True), or a row of scan and unrolled",
    )
    parser.add_argument(
        "--remat", action="store_true", help="flax: gradient checkpointing of every block (remat_policy full)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    parser.add_argument("--no-torch-ref", action="store_true", help="skip torch_ref (Hugging Face stays)")
    parser.add_argument("--no-torch", action="store_true", help="time flax_whisper only")
    parser.add_argument(
        "--band",
        default=["cudnn"],
        type=comma_list(BANDS),
        help="GPUs: the hybrid encoder's symmetric band through cuDNN behind zero rows (the default, "
        "kernel.symmetric_band_applies) or XLA's blocks (_banded); 'cudnn,xla' times both, a row each",
    )
    return parser


@contextlib.contextmanager
def band_through(band: str):
    """While tracing: the hybrid encoder's band through cuDNN (as `attend` chooses) or, for "xla",
    through XLA's blocks, as before cuDNN took it (`kernel.symmetric_band_applies` answers no)."""
    if band == "cudnn":
        yield
        return
    chosen = kernel.symmetric_band_applies
    kernel.symmetric_band_applies = lambda *args: False
    try:
        yield
    finally:
        kernel.symmetric_band_applies = chosen


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)

    base = dict(preset=args.preset, size=args.size, precision=args.precision, time_masks=0, freq_masks=0)
    config = TrainConfig(**base, warmup_steps=0)
    model_config = config.model_config()
    frames = args.frames or 2 * model_config.n_audio_ctx
    tokens = min(args.tokens, model_config.n_text_ctx)
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((args.batch, model_config.n_mels, frames)).astype(np.float32)
    labels = rng.integers(0, model_config.n_vocab, (args.batch, tokens)).astype(np.int32)
    print(f"{args.preset}/{args.size}: batch {args.batch}, {frames} frames, {tokens} tokens, {args.precision}")
    print(f"jax devices: {jax.devices()}")
    print(processor())
    print(describe())

    model = Whisper(model_config, rngs=nnx.Rngs(0))
    results = Results()
    rounds = Rounds(args.rounds, args.steps, jax.devices()[0].platform)
    if not args.no_torch:  # torch first, then its cached memory is released: both share one accelerator
        peers = time_torch(args, rounds, config, model_config, flax_to_torch(model), mel, labels)
        flops = step_flops(config, args.batch, frames, tokens) if peers else 0.0  # the same model's
        results.update({name: {**row, "flops": flops} for name, row in peers.items()})
    flax_rows = []
    layouts = [LAYOUTS["scan"], LAYOUTS["unrolled"]] if args.layers == "both" else [LAYOUTS[args.layers]]
    for mechanism, unroll, band in itertools.product(args.mechanisms, layouts, args.band):
        if band != "cudnn" and mechanism not in ("hybrid", "integrated"):
            continue  # no band to move
        overrides = {"encoder_attention": mechanism, "decoder_attention": mechanism, "unroll_layers": unroll}
        if mechanism in ("memory", "integrated"):
            overrides["memory_update"] = True
        if args.remat:
            overrides["gradient_checkpointing"] = True
        mechanism_config = TrainConfig(**base, warmup_steps=0, model=overrides)
        how = ", ".join(
            ["jit", layout_name(mechanism_config.model_config())]
            + ["remat"] * args.remat
            + ["xla band"] * (band == "xla")
        )
        name = f"flax_whisper {mechanism} ({how})"
        mechanism_model = Whisper(mechanism_config.model_config(), rngs=nnx.Rngs(0))
        try:
            with band_through(band):  # traced and compiled here; later rounds run the compiled step
                results[name] = time_flax(args, rounds, name, mechanism_config, mechanism_model, mel, labels)
        except jax.errors.JaxRuntimeError as error:  # report it and go on to the next mechanism
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            print(f"  {name}: out of memory ({str(error).splitlines()[0][:160]})", flush=True)
        else:
            flax_rows.append(name)
        del mechanism_model  # its buffers go before the next mechanism's
    if not flax_rows:
        return

    rounds.rest(results)
    peak, source = peak_flops(args.precision, args.peak_tflops)
    reference = results[flax_rows[0]]["seconds"]
    width = max(34, *map(len, results))
    header = f"{'ms/step':>9s} {'samples/s':>10s} {'flax speedup':>12s} {'memory':>9s} {'MFU':>6s}"
    print(f"{'':{width}s} {header}" + ("  speedup, round by round" if rounds.rounds > 1 else ""))
    for name, row in results.items():
        seconds = row["seconds"]
        memory = f"{row['memory'] / 2**30:7.2f} GB" if "memory" in row else f"{'n/a':>9s}"
        mfu = f"{row['flops'] / seconds / peak:6.1%}" if row.get("flops") else f"{'n/a':>6s}"
        print(
            f"{name:{width}s} {seconds * 1e3:9.1f} {args.batch / seconds:10.2f}",
            f"{seconds / reference:11.2f}x {memory} {mfu}  {rounds.ratios(name, flax_rows[0])}",
        )
    flops = results[flax_rows[0]]["flops"]
    print(f"model FLOPs per step ({flax_rows[0]}; XLA cost analysis, layers unrolled): {flops:.3e}")
    print(f"MFU: a row's model FLOPs per second over {peak / 1e12:.3f} TFLOP/s, {source}")


if __name__ == "__main__":
    restart_with_huge_pages()  # as `python -m train` runs: the same memory for every competitor
    main()
