"""ModelConfig: presets, JSON round trip, OpenAI dims, validation messages."""

import dataclasses
import subprocess
import sys

import pytest

from whisper_config import PRESETS, SIZES, ConfigError, ModelConfig


def test_defaults_are_openai_tiny_whisper():
    config = ModelConfig()
    assert config.openai_dims() == SIZES["tiny"]
    assert config.is_openai_compatible()
    assert config.is_multilingual and config.start_token_id == 50258
    assert ModelConfig.from_preset("whisper", size="base.en").start_token_id == 50257


def test_json_round_trip(tmp_path):
    config = ModelConfig.from_preset("whisper", size="small", dropout=0.1, decoder_start_token_id=7)
    assert ModelConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_the_presets():
    # Contract 1 and 4.6: (encoder positions, encoder rotary, decoder positions, decoder rotary, attention)
    expected = {
        "whisper": ("sinusoidal", False, "learned", False, "mha"),
        "all_rotary": ("none", True, "none", True, "mha"),
        "rotary_sinusoidal": ("none", True, "sinusoidal", False, "mha"),
        "rotary_rotary_sinusoidal": ("none", True, "sinusoidal", True, "mha"),
        "rotary_learned_sinusoidal": ("none", True, "learned_sinusoidal", True, "mha"),
        "integrated": ("learned_sinusoidal", True, "learned_sinusoidal", True, "integrated"),
    }
    assert set(PRESETS) == set(expected)
    for name, scheme in expected.items():
        config = ModelConfig.from_preset(name, size="tiny")
        got = (config.encoder_positions, config.encoder_rotary, config.decoder_positions, config.decoder_rotary)
        assert (*got, config.encoder_attention) == scheme, name
        assert config.decoder_attention == config.encoder_attention
        assert config.is_openai_compatible() == (name == "whisper")
    config = ModelConfig.from_preset("rotary_learned_sinusoidal", normalize_positions=True, encoder_rotary=False)
    assert config.normalize_positions and not config.encoder_rotary


def test_preset_overrides_field_by_field():
    config = ModelConfig.from_preset("whisper", size="base", n_text_layer=2)
    assert config.n_text_layer == 2 and config.n_audio_layer == SIZES["base"]["n_audio_layer"]
    assert PRESETS["whisper"]["decoder_positions"] == config.decoder_positions


def test_from_openai_dims():
    dims = dict(SIZES["large-v3"])
    config = ModelConfig.from_openai_dims(dims)
    assert config.openai_dims() == dims and config.n_mels == 128
    with pytest.raises(ConfigError, match="n_text_layer"):
        ModelConfig.from_openai_dims({k: v for k, v in dims.items() if k != "n_text_layer"})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().n_mels = 128


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_audio_head=5), "n_audio_head=5 does not divide n_audio_state=384"),
        (dict(n_text_head=7), "n_text_head=7 does not divide n_text_state=384"),
        (dict(n_mels=0), "n_mels must be a positive integer"),
        (dict(n_vocab=2.5), r"n_vocab must be an integer, got 2.5 \(float\)"),
        (dict(n_text_layer=8.7), r"n_text_layer must be an integer, got 8.7"),
        (dict(n_audio_layer=True), r"n_audio_layer must be an integer, got True \(bool\)"),
        (dict(rotary_base=float("nan")), "rotary_base must be a finite number, got nan"),
        (dict(memory_momentum=float("inf")), "memory_momentum must be a finite number, got inf"),
        (dict(dropout=float("nan")), "dropout must be a finite number"),
        (dict(encoder_rotary="no"), "encoder_rotary must be true or false, got 'no'"),
        (dict(decoder_start_token_id=1.0), r"decoder_start_token_id must be an integer \(or null\), got 1.0"),
        (dict(n_text_layer=1_000_000), r"n_text_layer=1000000 is more than the 1024 layers per side"),
        (dict(n_text_state=2**17, n_audio_state=2**17), r"a model of about 2.53e\+12 parameters, more than the 1e\+11"),
        (dict(n_text_state=768), "must equal n_text_state"),
        (dict(encoder_attention="flash"), "encoder_attention='flash' is not one of"),
        (dict(memory_momentum=1.5), r"memory_momentum must be in \[0, 1\]"),
        (dict(memory_size=0), "memory_size must be an integer >= 1"),
        (dict(memory_update=True), "neither encoder_attention nor decoder_attention is memory or integrated"),
        (dict(window_size=0), "window_size must be an integer >= 1, got 0"),
        (dict(alignment_heads=(0, 99)), r"alignment_heads=\[0, 99\] must be flat head indices in \[0, "),
        (dict(alignment_heads=(0.5,)), "alignment_heads must be a list of integers"),
        (dict(conv_kernel_size=4), "conv_kernel_size=4 must be odd"),
        (dict(conv_kernel_size=0), "conv_kernel_size must be an integer >= 1, got 0"),
        (dict(conv_kernel_size=-3), "conv_kernel_size must be an integer >= 1"),
        (dict(norm="group_rms", norm_groups=5), "norm_groups=5 does not divide the width 384"),
        (dict(norm_groups=0), "norm_groups must be an integer >= 1"),
        (dict(encoder_attention="dynamic_conv", encoder_rotary=True), "encoder_rotary=True has no effect"),
        (dict(decoder_positions="rotary"), "decoder_positions='rotary' is not one of"),
        (dict(encoder_rotary=1), "encoder_rotary must be true or false"),
        (dict(n_text_state=384, n_text_head=128, decoder_rotary=True), "decoder_rotary needs an even head width"),
        (dict(rotary_base=1.0), "rotary_base must be a number > 1"),
        (dict(normalize_positions=True), "neither encoder_positions nor decoder_positions is learned_sinusoidal"),
        (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be true or false"),
        (dict(unroll_layers="yes"), "unroll_layers must be true, false or 'auto', got 'yes'"),
        (dict(unroll_layers=1), "unroll_layers must be true or false or a string"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(decoder_start_token_id=51865), "decoder_start_token_id=51865 must be a token id"),
    ],
)
def test_validation_messages(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_unknown_fields_and_presets_are_named():
    with pytest.raises(ConfigError, match=r"unknown config field.*n_layers"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="unknown preset 'wisper'"):
        ModelConfig.from_preset("wisper")
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        ModelConfig.from_preset("whisper", size="huge")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{n_mels: 80")


def test_non_openai_vocab_needs_a_start_token():
    with pytest.raises(ConfigError, match="set decoder_start_token_id"):
        _ = ModelConfig(n_vocab=100).start_token_id


def test_config_imports_no_framework():
    code = "import sys, whisper_config; print(any(m in sys.modules for m in ('torch', 'jax', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
