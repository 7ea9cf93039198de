"""Encoder forward and greedy decoding: flax_whisper against openai-whisper and Hugging Face, one run.

    python bench/inference.py [--size tiny.en] [--batch 4] [--new-tokens 64] [--precision float32]
        [--repeats 5] [--rounds 3] [--no-hf] [--no-openai] [--decode-scan] [--check-every 1,8,16] [--attention xla]
        [--profile DIR] [--peak-tflops T]

On the same random weights (an OpenAI-format model converted to flax_whisper through `convert`)
and the same 30 s windows of real speech (the test suite's espeak-ng recording, repeated):

- encoder forward: `flax_whisper` (jit) vs `openai-whisper`'s PyTorch encoder (`torch.no_grad`);
- greedy decoding of `--new-tokens` tokens after the forced prompt, the encoder included:
  `flax_whisper.greedy_decode` (one jitted program) vs `whisper.decoding.decode` (temperature 0,
  no timestamps) and, with `transformers` installed, `WhisperForConditionalGeneration.generate`
  (greedy, SDPA, KV cache) on a model of the same dimensions with its own random weights.

Prints median times, tokens per second (tokens actually generated, end of text included) and
the ratios against flax_whisper (for decoding, of tokens per second), all measured in this run,
and each encoder's model FLOPs utilisation (XLA's cost analysis of the encoder; the peak as in
`bench/train_step.py`: `--peak-tflops`, a known GPU's, or XLA's large product measured here).
With random weights end of text is rarely chosen, so every framework decodes about
`--new-tokens` tokens per window; to compare like with like, each rate counts the tokens that
framework generated. On a GPU, add
`--precision bfloat16` (flax and transformers: bfloat16; openai-whisper: its own float16 mode,
`fp16=True`, since it has no bfloat16 one). `--check-every` also times flax decoding that checks
for every row's end every N steps (the default is the device's: 8 on a GPU, where each check
waits for the device, 1 elsewhere); `--attention` times it with other attention implementations
(`attention_implementation`: the default `auto` is cuDNN on a GPU in bfloat16). `--rounds`
times every competitor again, in turn, and reports the median of the rounds with the range of
each ratio over them: on a shared CPU, runs minutes apart differ by more than the gaps measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
from peers import hf_config
from steps import encoder_flops
from timing import Results, Rounds, comma_list, peak_flops, processor, profile

from whisper_io.huge_pages import describe, restart_with_huge_pages

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech_16k.wav"


def windows(batch: int, n_mels: int) -> np.ndarray:
    """`batch` 30 s log-mel windows of real speech (B, n_mels, 3000)."""
    import soundfile

    from flax_whisper.audio import N_SAMPLES, log_mel_spectrogram

    speech = soundfile.read(SPEECH, dtype="float32")[0]
    audio = np.tile(speech, N_SAMPLES // len(speech) + 1)[:N_SAMPLES]
    rows = [np.roll(audio, 16000 * i) for i in range(batch)]  # different content per row
    return np.asarray(log_mel_spectrogram(np.stack(rows), n_mels))


def arguments() -> argparse.ArgumentParser:
    """The command line, checked as it is read: a misspelt size or attention implementation stops
    the run before any competitor is timed."""
    from flax_whisper.kernel import IMPLEMENTATIONS
    from whisper_config import SIZES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny.en", choices=tuple(SIZES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, help=Rounds.HELP)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    parser.add_argument("--no-openai", action="store_true", help="skip openai-whisper")
    parser.add_argument(
        "--decode-scan", action="store_true", help="also time decoding under the layer scan (decode_unroll=False)"
    )
    parser.add_argument(
        "--check-every",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        help="comma-separated step counts: also time flax decoding checking for the end every N steps",
    )
    parser.add_argument(
        "--attention",
        type=comma_list(IMPLEMENTATIONS),
        default=[],
        help=f"comma-separated attention implementations ({', '.join(IMPLEMENTATIONS)}): also time flax "
        "decoding with each",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a jax.profiler trace of one flax decoding call and print its longest operations",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak, for the encoder's MFU (default: known GPUs' dense peak, else XLA's large "
        "product measured here)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)

    import torch
    import whisper

    from convert.core import new_flax_model
    from convert.openai import from_openai_names
    from flax_whisper import greedy_decode, pure_jit
    from whisper_config import ModelConfig
    from whisper_io import decoding_options, tokenizer_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.precision == "bfloat16"
    config = ModelConfig.from_preset("whisper", args.size)
    torch.manual_seed(0)
    openai_model = whisper.model.Whisper(whisper.model.ModelDimensions(**config.openai_dims())).to(device).eval()
    tensors = from_openai_names({k: v.float().cpu().numpy() for k, v in openai_model.state_dict().items()})
    flax_model = new_flax_model(config, tensors)
    flax_model.eval()
    mel = windows(args.batch, config.n_mels)
    tokenizer = tokenizer_for(config)
    prompt, options = decoding_options(tokenizer, config, language="en", max_new_tokens=args.new_tokens)
    prompts = np.tile(prompt, (args.batch, 1))
    compute = jnp.bfloat16 if bf16 else jnp.float32
    mel_jax = jnp.asarray(mel, compute)
    mel_torch = torch.tensor(mel, device=device)  # a copy: `mel` is read-only

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    print(f"{args.size}: batch {args.batch} x 30 s, {args.new_tokens} new tokens, {args.precision}")
    print(f"jax {jax.devices()[0].platform}, torch {device}, {torch.get_num_threads()} torch threads")
    print(processor())
    print(describe())

    encode = pure_jit(lambda m, x: m.encoder(x))  # nnx.jit would copy every weight back out per call
    results = Results()
    rounds = Rounds(args.rounds, args.repeats, jax.devices()[0].platform)
    results["encoder: flax_whisper (jit)"] = rounds.time(
        "encoder: flax_whisper (jit)", lambda: jax.block_until_ready(encode(flax_model, mel_jax))
    )

    # openai-whisper's own half precision is float16 (`fp16=True`: the mel is halved and each layer
    # casts its weights to the input's dtype); it has no bfloat16 mode, and autocast to bfloat16
    # makes its decoder refuse the encoder's output.
    mel_openai = mel_torch.half() if bf16 else mel_torch

    def openai_encoder():
        with torch.no_grad():
            openai_model.encoder(mel_openai)
        sync()

    if not args.no_openai:
        results["encoder: openai-whisper"] = rounds.time("encoder: openai-whisper", openai_encoder)

    generated = {}

    def flax_decode(model, name: str, every: int | None = None):
        def run():
            tokens = np.asarray(greedy_decode(model, mel_jax, prompts, options, check_every=every))
            generated[name] = int(np.sum(tokens[:, len(prompt) :] != -1))

        results[name] = rounds.time(name, run)

    flax_decode(flax_model, "decode: flax_whisper (jit)")
    if args.profile:
        profile(args.profile, lambda: np.asarray(greedy_decode(flax_model, mel_jax, prompts, options)))
    for every in args.check_every:
        flax_decode(flax_model, f"decode: flax_whisper, check every {every}", every)
    for implementation in args.attention:
        other = new_flax_model(dataclasses.replace(config, attention_implementation=implementation), tensors)
        other.eval()
        try:
            flax_decode(other, f"decode: flax_whisper, {implementation} attention")
        except ValueError as refused:  # e.g. `cudnn` for a prompt written at a traced offset
            print(f"decode: flax_whisper, {implementation} attention: not timed, {refused}")
    if args.decode_scan:
        scanned = new_flax_model(dataclasses.replace(config, decode_unroll=False), tensors)
        scanned.eval()
        flax_decode(scanned, "decode: flax_whisper, layer scan")

    openai_options = whisper.DecodingOptions(
        language="en", without_timestamps=True, fp16=bf16, temperature=0.0, sample_len=args.new_tokens
    )

    def openai_decode():
        with torch.no_grad():
            out = whisper.decoding.decode(openai_model, mel_openai, openai_options)
        sync()
        # Its tokens stop before the end of text; a row cut at sample_len ends with one that
        # openai-whisper appends (GreedyDecoder.finalize) but never generated.
        generated["decode: openai-whisper"] = sum(min(len(r.tokens) + 1, args.new_tokens) for r in out)

    if not args.no_openai:
        results["decode: openai-whisper"] = rounds.time("decode: openai-whisper", openai_decode)

    if not args.no_hf:
        try:
            from transformers import WhisperForConditionalGeneration
        except ImportError:
            print("transformers is not installed: skipping Hugging Face")
        else:
            from transformers.utils import logging as hf_logging

            # `generate` prints notices on every call about settings chosen on purpose:
            # max_new_tokens beside the generation config's default max_length, no attention
            # mask for a batch (none is padded), and generation arguments beside a generation
            # config (Whisper's `generate` passes them itself). Errors are still shown.
            hf_logging.set_verbosity_error()
            hf_model = WhisperForConditionalGeneration(hf_config(config)).to(device).eval()
            hf_prompt = torch.tensor(prompts, device=device)
            hf_features = mel_torch.to(torch.bfloat16) if bf16 else mel_torch
            if bf16:
                hf_model = hf_model.to(torch.bfloat16)

            def hf_encoder():
                with torch.no_grad():
                    hf_model.model.encoder(hf_features)
                sync()

            def hf_decode():
                with torch.no_grad():
                    out = hf_model.generate(
                        input_features=hf_features,
                        decoder_input_ids=hf_prompt,
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        num_beams=1,
                    )
                sync()
                # Whisper's `generate` returns the new tokens alone (transformers 5), or after the
                # prompt (older versions, or `return_dict_in_generate`): count what follows it, each
                # row up to its end of text (the rest of a row that ended early is padding).
                given = out.shape[1] >= len(prompt) and torch.equal(out[:, : len(prompt)], hf_prompt)
                ended = out[:, len(prompt) * given :] == options.eot
                lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, ended.shape[1])
                generated["decode: transformers generate"] = int(lengths.sum())

            results["encoder: transformers"] = rounds.time("encoder: transformers", hf_encoder)
            results["decode: transformers generate"] = rounds.time("decode: transformers generate", hf_decode)

    rounds.rest(results)
    flops = encoder_flops(config, args.batch, mel.shape[2])  # the same model in every framework
    peak, source = peak_flops(args.precision, args.peak_tflops)
    for kind in ("encoder", "decode"):
        reference = f"{kind}: flax_whisper (jit)"
        for name, seconds in results.items():
            if not name.startswith(kind):
                continue
            rate = f"{generated[name] / seconds:8.1f} tokens/s" if name in generated else " " * 17
            # Decoding compares rates: each framework's own count of tokens over its own time.
            tokens = generated[reference] / generated[name] if name in generated and reference in generated else 1.0
            speedup = f"flax is {tokens * seconds / results[reference]:5.2f}x as fast"
            spread = rounds.ratios(name, reference, tokens)
            mfu = f"  {flops / seconds / peak:5.1%} MFU" if kind == "encoder" else ""
            print(
                f"{name:38s} {seconds * 1e3:9.1f} ms  {rate}  {speedup}"
                + (f" (rounds: {spread})" if spread else "")
                + mfu
            )
    print(f"encoder: {flops / 1e9:.1f} GFLOP a call (XLA cost analysis); MFU over {peak / 1e12:.3f} TFLOP/s, {source}")


if __name__ == "__main__":
    restart_with_huge_pages()  # as `python -m train` runs: the same memory for every competitor
    main()
