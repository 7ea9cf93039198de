"""Warm start: a whisper checkpoint into a model of another preset, reported by name."""

import numpy as np
import pytest
from conftest import convert_cli, make_pair, tiny_config

from convert import load_checkpoint, save_checkpoint
from convert.core import torch_to_numpy
from convert.warm_start import warm_start
from torch_ref.positions import sinusoids
from whisper_config import ConfigError


@pytest.fixture(scope="module")
def whisper_ckpt(tmp_path_factory):
    config = tiny_config()
    path = tmp_path_factory.mktemp("warm") / "whisper"
    save_checkpoint(path, "torch", config, torch_to_numpy(make_pair(config, seed=9)[0]))
    return load_checkpoint(path)


def test_into_all_rotary_copies_everything_but_tables(whisper_ckpt):
    started = warm_start(whisper_ckpt, whisper_ckpt.config.with_preset("all_rotary"))
    assert started.config.encoder_rotary and started.config.encoder_positions == "none"
    assert started.fresh == []
    assert started.left_out == [
        ("decoder.positional_embedding", "not in the target model"),
        ("encoder.positional_embedding", "not in the target model"),
    ]
    assert len(started.copied) == len(whisper_ckpt.tensors) - 2
    for key in started.copied:
        assert np.array_equal(started.tensors[key], whisper_ckpt.tensors[key]), key


def test_learned_table_never_overwrites_a_fixed_buffer(whisper_ckpt):
    started = warm_start(whisper_ckpt, whisper_ckpt.config.with_preset("rotary_sinusoidal"))
    why = "a trainable parameter in the source, a fixed buffer in the target"
    assert started.fresh == [("decoder.positional_embedding", why)]
    assert ("decoder.positional_embedding", why) in started.left_out
    table = started.tensors["decoder.positional_embedding"]
    assert np.array_equal(table, sinusoids(*table.shape).numpy())


def test_learned_table_carries_into_learned_sinusoidal(whisper_ckpt):
    started = warm_start(whisper_ckpt, whisper_ckpt.config.with_preset("rotary_learned_sinusoidal"))
    assert "decoder.positional_embedding" in started.copied
    assert started.fresh == [] and "fresh (0)" in started.report()


def test_unknown_preset(whisper_ckpt):
    with pytest.raises(ConfigError, match="unknown preset 'rotary'"):
        whisper_ckpt.config.with_preset("rotary")


def test_cli_warm_start_from_openai_file(tmp_path):
    config = tiny_config(n_vocab=51865, decoder_start_token_id=None)
    save_checkpoint(tmp_path / "tiny.pt", "openai", config, torch_to_numpy(make_pair(config)[0]))
    done = convert_cli(tmp_path / "tiny.pt", tmp_path / "out", "--preset", "all_rotary")
    assert "copied" in done.stdout and "encoder.positional_embedding: not in the target model" in done.stdout
    result = load_checkpoint(tmp_path / "out")
    assert result.format == "flax" and result.config == config.with_preset("all_rotary")
