"""Hugging Face `transformers` Whisper directories, against `transformers` itself as the oracle.

`WhisperForConditionalGeneration` with random weights at odd dimensions (English-only and
multilingual vocabularies) is saved with `save_pretrained`; `python -m convert` must read it into
both frameworks with its logits, write directories `from_pretrained` loads with no missing or
unexpected keys, and round-trip it bit for bit.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, convert_cli, flax_forward
from safetensors.numpy import load_file

from convert import load_checkpoint, load_flax_model, load_torch_model
from convert.hf import CONFIG_FIELDS

transformers = pytest.importorskip("transformers")

# Odd widths and depths: 3 heads of 12, 2 encoder and 3 decoder layers, 24 audio positions.
DIMS = dict(
    num_mel_bins=80,
    d_model=36,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=3,
    decoder_attention_heads=3,
    encoder_ffn_dim=144,
    decoder_ffn_dim=144,
    max_source_positions=24,
    max_target_positions=20,
)
VOCABS = {  # as the real checkpoints set their special tokens
    "english": dict(vocab_size=51864, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
                    decoder_start_token_id=50257),
    "multilingual": dict(vocab_size=51865, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
                         decoder_start_token_id=50258),
}  # fmt: skip


def hf_model(vocab: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(**DIMS, **VOCABS[vocab])
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF's 0.02-std init decodes one token forever: make the tokens vary
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=sorted(VOCABS))
def hf_dir(request, tmp_path_factory):
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(f"hf-{request.param}") / "model"
    model.save_pretrained(path)
    return request.param, model, path


def random_input(vocab: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((2, DIMS["num_mel_bins"], 2 * DIMS["max_source_positions"])).astype(np.float32)
    tokens = rng.integers(0, VOCABS[vocab]["vocab_size"], (2, DIMS["max_target_positions"]))
    return mel, tokens


def hf_logits(model, mel, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(tokens)).logits.numpy()


def test_hf_directories_give_transformers_logits_in_both_frameworks(hf_dir, tmp_path):
    vocab, model, path = hf_dir
    convert_cli(path, tmp_path / "flax")  # hf is detected; flax is the default target
    convert_cli(path, tmp_path / "torch", "--to", "torch")
    mel, tokens = random_input(vocab)
    reference = hf_logits(model, mel, tokens)
    flax_model = load_flax_model(tmp_path / "flax")
    flax_model.eval()
    with torch.no_grad():
        ours_t = load_torch_model(tmp_path / "torch").eval()(torch.from_numpy(mel), torch.from_numpy(tokens))
    assert_close(flax_forward(flax_model, mel, tokens), reference, 1e-4, "flax_whisper vs transformers")
    assert_close(ours_t.numpy(), reference, 1e-4, "torch_ref vs transformers")
    # The directory loads directly too, everywhere a checkpoint is accepted.
    direct = load_flax_model(path)
    direct.eval()
    assert_close(flax_forward(direct, mel, tokens), reference, 1e-4, "flax_whisper from the HF directory")


def test_our_export_loads_in_transformers_with_every_key_and_its_logits(hf_dir, tmp_path):
    vocab, model, path = hf_dir
    convert_cli(path, tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "hf", "--to", "hf")
    loaded, info = transformers.WhisperForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    mel, tokens = random_input(vocab, seed=1)
    assert_close(hf_logits(loaded.eval(), mel, tokens), hf_logits(model, mel, tokens), 1e-6, "exported vs original")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "bos_token_id", "decoder_start_token_id"):
        assert config[key] == model.config.to_dict()[key], key
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    feature_extractor = transformers.WhisperFeatureExtractor.from_pretrained(tmp_path / "hf")
    assert feature_extractor.feature_size == 80 and feature_extractor.nb_max_frames == 48


def test_hf_to_flax_to_hf_is_bit_exact_per_tensor(hf_dir, tmp_path):
    _, _, path = hf_dir
    convert_cli(path, tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "hf", "--to", "hf")
    original, again = load_file(path / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert value.dtype == again[key].dtype and np.array_equal(value, again[key]), key


# The vocabulary plays no part here: the multilingual case is `slow`.
@pytest.mark.parametrize("hf_dir", ["english", pytest.param("multilingual", marks=pytest.mark.slow)], indirect=True)
def test_half_precision_is_kept_unless_asked(hf_dir, tmp_path):
    """float16 HF weights stay float16 through flax and back; --dtype changes it; a model loaded
    for computing is float32."""
    _, model, _ = hf_dir
    copy.deepcopy(model).half().save_pretrained(tmp_path / "half")
    convert_cli(tmp_path / "half", tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "hf", "--to", "hf")
    half, again = load_file(tmp_path / "half" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert all(again[k].dtype == np.float16 and np.array_equal(again[k], v) for k, v in half.items())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    convert_cli(tmp_path / "half", tmp_path / "bf16", "--to", "torch", "--dtype", "bfloat16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype.name for v in stored.values()} == {"bfloat16"}
    flax_model = load_flax_model(tmp_path / "bf16")
    assert flax_model.decoder.token_embedding.embedding.dtype == np.float32
    assert next(load_torch_model(tmp_path / "flax").parameters()).dtype == torch.float32


def test_large_weights_are_written_in_shards_and_read_back(hf_dir, tmp_path):
    from convert.hf import save_hf

    vocab, model, path = hf_dir
    ckpt = load_checkpoint(path)
    save_hf(tmp_path / "sharded", ckpt.config, ckpt.tensors, shard_bytes=2_000_000)
    names = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded, info = transformers.WhisperForConditionalGeneration.from_pretrained(
        tmp_path / "sharded", output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    mel, tokens = random_input(vocab, seed=2)
    assert_close(hf_logits(loaded.eval(), mel, tokens), hf_logits(model, mel, tokens), 1e-6, "sharded export")
    again = load_checkpoint(tmp_path / "sharded")
    assert all(np.array_equal(again.tensors[k], v) for k, v in ckpt.tensors.items())


# The multilingual case is `slow`; tests/test_hf.py's logits tests keep that vocabulary in the main suite.
@pytest.mark.parametrize("hf_dir", ["english", pytest.param("multilingual", marks=pytest.mark.slow)], indirect=True)
def test_generate_on_real_speech_gives_our_greedy_tokens(hf_dir, tmp_path):
    """`transformers`' `generate()` on an exported directory decodes the ids our greedy decoding
    gives for the same log-mel of real speech."""
    from flax_whisper import greedy_decode
    from flax_whisper.audio import log_mel_spectrogram
    from whisper_io import decoding_options, load_audio, tokenizer_for

    vocab, _, path = hf_dir
    convert_cli(path, tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "hf", "--to", "hf")
    exported = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    audio = load_audio(str(Path(__file__).parent / "data" / "speech_16k.wav"))
    frames = 2 * DIMS["max_source_positions"]
    starts = (0, 16000, 32000)  # three windows of the recording
    mel = np.stack([np.asarray(log_mel_spectrogram(audio[s : s + frames * 160], 80)) for s in starts])
    flax_model = load_flax_model(tmp_path / "flax")
    flax_model.eval()
    language = "en" if vocab == "multilingual" else None
    prompt, options = decoding_options(tokenizer_for(flax_model.config), flax_model.config, language, "transcribe", 8)
    ours = np.asarray(greedy_decode(flax_model, mel, [prompt] * len(mel), options))
    kwargs = dict(language="en", task="transcribe") if language else {}
    with torch.no_grad():
        theirs = exported.generate(torch.from_numpy(mel), max_new_tokens=8, do_sample=False, num_beams=1, **kwargs)
    theirs = theirs.numpy()  # the generated ids, after the forced prompt
    ours = ours[:, len(prompt) :]
    assert theirs.shape[0] == ours.shape[0] and theirs.shape[1] >= 1
    for row, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        a, b = list(a), list(b)
        a = a[: a.index(options.eot) + 1] if options.eot in a else a
        b = b[: b.index(options.eot) + 1] if options.eot in b else b
        assert a == b, f"window {row}: transformers {a} vs ours {b}"


# ----------------------------------------------------------------------------- bad input


def broken_copy(path, tmp_path, name="broken"):
    import shutil

    copy = tmp_path / name
    shutil.copytree(path, copy)
    return copy


def one_line_error(done, *fragments):
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def sharded_copy(hf_dir, tmp_path):
    from convert.hf import save_hf

    _, _, path = hf_dir
    ckpt = load_checkpoint(path)
    save_hf(tmp_path / "sharded", ckpt.config, ckpt.tensors, shard_bytes=2_000_000)
    return tmp_path / "sharded"


@pytest.mark.parametrize("damage", ["truncated", "corrupted header"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(hf_dir, tmp_path, damage):
    broken = broken_copy(hf_dir[2], tmp_path)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    done = convert_cli(broken, tmp_path / "out", ok=False)
    one_line_error(done, str(weights))
    assert not (tmp_path / "out").exists()


def test_a_shard_missing_from_the_directory_is_named(hf_dir, tmp_path):
    sharded = sharded_copy(hf_dir, tmp_path)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    done = convert_cli(sharded, tmp_path / "out", ok=False)
    one_line_error(done, "model.safetensors.index.json", "model-00002-of-00003.safetensors")


def test_an_index_naming_a_tensor_twice_is_refused(hf_dir, tmp_path):
    sharded = sharded_copy(hf_dir, tmp_path)
    index = sharded / "model.safetensors.index.json"
    text = index.read_text()
    entry = '"model.decoder.layer_norm.bias": "model-00001-of-00003.safetensors",'
    text = text.replace('"weight_map": {', '"weight_map": {' + entry, 1)
    index.write_text(text)
    done = convert_cli(sharded, tmp_path / "out", ok=False)
    one_line_error(done, str(index), "model.decoder.layer_norm.bias", "more than once")


def test_a_config_of_another_model_type_is_named(hf_dir, tmp_path):
    broken = broken_copy(hf_dir[2], tmp_path)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "wav2vec2"}))
    done = convert_cli(broken, tmp_path / "out", ok=False)
    one_line_error(done, str(broken / "config.json"), "'wav2vec2'")


def test_an_untied_output_projection_is_refused(hf_dir, tmp_path):
    from convert.tensors import write_safetensors

    broken = broken_copy(hf_dir[2], tmp_path)
    tensors = load_file(broken / "model.safetensors")
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"] + 1
    write_safetensors(broken / "model.safetensors", tensors)
    one_line_error(convert_cli(broken, tmp_path / "out", ok=False), "proj_out.weight", "ties")
    tensors["proj_out.weight"] = tensors["model.decoder.embed_tokens.weight"]  # tied, and saved anyway: fine
    write_safetensors(broken / "model.safetensors", tensors)
    convert_cli(broken, tmp_path / "out")


def test_without_generation_config_the_defaults_come_from_the_vocabulary(hf_dir, tmp_path):
    broken = broken_copy(hf_dir[2], tmp_path)
    (broken / "generation_config.json").unlink()
    done = convert_cli(broken, tmp_path / "out")
    assert "notice:" in done.stderr and str(broken) in done.stderr and "derived from the vocabulary" in done.stderr


def test_models_hf_cannot_hold_are_refused_naming_the_fields(tmp_path):
    from flax import nnx

    from convert.core import flax_to_torch
    from flax_whisper import Whisper
    from whisper_config import ModelConfig

    config = ModelConfig.from_preset("all_rotary", **{**DIMS_OURS, "norm": "rmsnorm"})
    tensors = flax_to_torch(Whisper(config, rngs=nnx.Rngs(0)))
    from convert import save_checkpoint

    save_checkpoint(tmp_path / "rotary", "torch", config, tensors)
    done = convert_cli(tmp_path / "rotary", tmp_path / "out", "--to", "hf", ok=False)
    one_line_error(done, "encoder_rotary=True", "norm='rmsnorm'")
    assert not (tmp_path / "out").exists()


DIMS_OURS = dict(n_mels=8, n_audio_ctx=8, n_audio_state=16, n_audio_head=2, n_audio_layer=1, n_vocab=300,
                 n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1, decoder_start_token_id=257)  # fmt: skip


def test_a_failed_write_leaves_no_directory_that_loads(hf_dir, tmp_path, monkeypatch):
    """A conversion that fails half-way (a full disk, say) leaves nothing at DST."""
    from convert import hf, save_checkpoint

    ckpt = load_checkpoint(hf_dir[2])
    calls = []

    def failing(path, tensors, keys=None, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, tensors, keys, metadata)

    real = hf.write_safetensors
    monkeypatch.setattr(hf, "write_safetensors", failing)
    from whisper_io.outputs import OutputError

    monkeypatch.setattr(hf, "SHARD_BYTES", 2_000_000)  # shards, so the second file fails
    with pytest.raises(OutputError, match="No space left"):
        save_checkpoint(tmp_path / "out", "hf", ckpt.config, ckpt.tensors)
    assert len(calls) == 2 and not (tmp_path / "out").exists()
    assert not any(tmp_path.iterdir())  # no partial directory left beside it either


# ----------------------------------------------------------------------------- OpenAI -> HF

ORACLE_WHEEL = "transformers-4.46.3-py3-none-any.whl"  # the last wheels that ship the mapping script


def transformers_openai_mapping(tmp_path, monkeypatch):
    """`transformers`' own OpenAI-to-HF conversion (`convert_openai_to_hf.py`), read from the
    transformers 4.46.3 wheel that `.ci/run` downloads to `.cache/oracles` (v5 no longer ships it).
    Only its tensor mapping is used: the tokenizer helper it imports and the hub lookup of a
    generation config are stubbed."""
    import importlib.util
    import os
    import zipfile

    folder = Path(os.environ.get("FLAX_WHISPER_ORACLES", Path(__file__).parent.parent / ".cache" / "oracles"))
    wheel = folder / ORACLE_WHEEL
    if not wheel.is_file():
        pytest.skip(f"needs {wheel}: pip download transformers==4.46.3 --no-deps -d {folder}")
    with zipfile.ZipFile(wheel) as archive:
        script = tmp_path / "convert_openai_to_hf.py"
        script.write_bytes(archive.read("transformers/models/whisper/convert_openai_to_hf.py"))
    from transformers.models.whisper import tokenization_whisper

    monkeypatch.setattr(tokenization_whisper, "bytes_to_unicode", lambda: {}, raising=False)
    spec = importlib.util.spec_from_file_location("hf_convert_openai_to_hf", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "_get_generation_config", lambda *args: transformers.GenerationConfig())
    return module


def test_openai_to_hf_equals_transformers_own_mapping(tmp_path, monkeypatch):
    """An OpenAI `.pt` (float16, as OpenAI ships them) converted with `--to hf` holds exactly the
    tensors and dimensions `transformers`' own conversion script gives for the same file."""
    from conftest import random_openai_model

    mapping = transformers_openai_mapping(tmp_path, monkeypatch)
    model = random_openai_model(noise=0.1)
    half = {k: v.half() for k, v in model.state_dict().items()}
    import dataclasses

    torch.save({"dims": dataclasses.asdict(model.dims), "model_state_dict": half}, tmp_path / "model.pt")
    convert_cli(tmp_path / "model.pt", tmp_path / "hf", "--to", "hf")
    theirs, _, _ = mapping.convert_openai_whisper_to_tfms(str(tmp_path / "model.pt"), str(tmp_path / "theirs"))
    their_state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(their_state) - set(ours) == {"proj_out.weight"} and set(ours) <= set(their_state)
    assert np.array_equal(their_state["proj_out.weight"], their_state["model.decoder.embed_tokens.weight"])  # tied
    for key, value in ours.items():
        assert value.dtype == np.float16, key  # the source's precision kept
        assert np.array_equal(value.astype(np.float32), their_state[key]), key  # theirs widens to float32
    # The dimensions agree; the special-token ids are OpenAI's (the script's "hacky" ids put end of
    # text at 50256 for 51865-token vocabularies, where OpenAI's tokenizer has it at 50257).
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    dimensions = [key for key, _ in CONFIG_FIELDS] + ["d_model", "encoder_ffn_dim"]
    for key in [*dimensions, "decoder_ffn_dim", "activation_function", "scale_embedding", "tie_word_embeddings"]:
        assert config[key] == getattr(theirs.config, key), key
    assert (config["eos_token_id"], config["decoder_start_token_id"]) == (50257, 50258)


def test_openai_and_hf_checkpoints_convert_without_torch(hf_dir, tmp_path):
    """A JAX-only machine reads OpenAI `.pt` files (the lazy zip reader) and HF directories."""
    from conftest import BLOCK_TORCH, random_openai_model, save_openai_model

    path = save_openai_model(random_openai_model(noise=0.1), tmp_path / "model.pt")
    code = BLOCK_TORCH + (
        "from convert.__main__ import main\n"
        f"assert main([{str(path)!r}, {str(tmp_path / 'from-openai')!r}]) == 0\n"
        f"assert main([{str(hf_dir[2])!r}, {str(tmp_path / 'from-hf')!r}]) == 0\n"
        "import sys; assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ours = load_checkpoint(tmp_path / "from-openai").tensors
    reference = torch.load(path, weights_only=True)["model_state_dict"]
    assert np.array_equal(ours["decoder.blocks.1.mlp.fc1.weight"], reference["decoder.blocks.1.mlp.0.weight"].numpy())


# The vocabulary plays no part here: the multilingual case is `slow`.
@pytest.mark.parametrize("hf_dir", ["english", pytest.param("multilingual", marks=pytest.mark.slow)], indirect=True)
def test_alignment_heads_travel_through_every_format_that_can_hold_them(hf_dir, tmp_path):
    """The generation config's alignment heads (word timestamps need them) survive HF -> flax ->
    torch -> HF; bad ones are named."""
    broken = broken_copy(hf_dir[2], tmp_path, "with-heads")
    generation = json.loads((broken / "generation_config.json").read_text())
    heads = [[1, 0], [2, 2], [2, 1]]
    (broken / "generation_config.json").write_text(json.dumps({**generation, "alignment_heads": heads}))
    assert load_checkpoint(broken).config.alignment_heads == (3, 8, 7)  # layer * 3 heads + head
    convert_cli(broken, tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "torch")
    convert_cli(tmp_path / "torch", tmp_path / "hf", "--to", "hf")
    again = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert again["alignment_heads"] == heads
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").alignment_heads == heads
    (broken / "generation_config.json").write_text(json.dumps({**generation, "alignment_heads": [[7, 0]]}))
    one_line_error(convert_cli(broken, tmp_path / "out", ok=False), "generation_config.json", "alignment_heads")


# Two commands per vocabulary: the multilingual one is `slow`.
@pytest.mark.parametrize("hf_dir", ["english", pytest.param("multilingual", marks=pytest.mark.slow)], indirect=True)
def test_verify_and_transcribe_take_hf_directories(hf_dir, capsys):
    from transcribe.__main__ import main as transcribe

    _, _, path = hf_dir
    done = convert_cli("verify", path, "--batch", "1")
    assert f"checkpoint {path} (hf)" in done.stdout and "parity ok" in done.stdout
    speech = Path(__file__).parent / "data" / "speech_16k.wav"
    assert transcribe([str(speech), "--checkpoint", str(path), "--max-new-tokens", "4", "--language", "en"]) == 0
    assert capsys.readouterr().out.startswith(f"{speech}: ")
