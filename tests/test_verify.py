"""`python -m convert verify`: passes on agreeing models, and fails on a real numerics bug."""

import jax
import pytest
from conftest import convert_cli, tiny_config

import flax_whisper.layers
from convert.__main__ import main
from convert.verify import compare
from whisper_config import PRESETS


def test_verify_fresh_model_from_config_file(tmp_path):
    tiny_config().save(tmp_path / "config.json")
    done = convert_cli("verify", "--config", tmp_path / "config.json", "--tokens", "7")
    for line in ("round trip torch->flax->torch", "encoder output", "logits", "loss", "parity ok"):
        assert line in done.stdout
    assert "mel (2, 8, 32), tokens (2, 7)" in done.stdout
    # Each step is announced on stderr as it starts, in order, with the time since the start.
    steps = ["torch_ref: loading", "torch_ref: encoder", "flax_whisper: loading", "round trip", "flax_whisper: compil"]
    lines = [line for line in done.stderr.splitlines() if line.startswith("[") and " s] " in line]
    assert [next(i for i, line in enumerate(lines) if step in line) for step in steps] == list(range(len(steps)))


def test_verify_checkpoint(tmp_path, capsys):
    from convert import save_checkpoint
    from convert.core import torch_to_numpy
    from torch_ref import Whisper

    config = tiny_config()
    save_checkpoint(tmp_path / "ckpt", "torch", config, torch_to_numpy(Whisper(config)))
    assert main(["verify", str(tmp_path / "ckpt"), "--batch", "3", "--frames", "9"]) == 0
    assert "mel (3, 8, 9)" in capsys.readouterr().out


def test_verify_catches_approximate_gelu(tmp_path, monkeypatch, capsys):
    """The classic port bug: jax.nn.gelu defaults to the tanh approximation."""
    tiny_config().save(tmp_path / "config.json")
    monkeypatch.setattr(flax_whisper.layers, "gelu", lambda x: jax.nn.gelu(x, approximate=True))
    assert main(["verify", "--config", str(tmp_path / "config.json")]) == 1
    out = capsys.readouterr().out
    assert "parity FAILED: encoder output" in out


def test_verify_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["verify"])
    with pytest.raises(SystemExit):
        main(["verify", "ckpt", "--preset", "whisper"])
    assert "give either a checkpoint or one of --preset / --config" in capsys.readouterr().err


def test_compare_tolerance():
    assert compare("x", [1.0, 2.0], [1.0, 2.0 + 1e-5], atol=0.0, rtol=1e-5).ok
    bad = compare("x", [1.0, 2.0], [1.0, 2.1], atol=1e-4, rtol=1e-4)
    assert not bad.ok and abs(bad.max_abs - 0.1) < 1e-9 and abs(bad.max_rel - 0.1 / 2.1) < 1e-9


# The plainest and the fullest preset in the main suite, the others `slow` (the parity itself is
# tested on every variant in tests/test_model_parity.py).
MAIN_PRESETS = ("whisper", "integrated")


@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=[] if p in MAIN_PRESETS else pytest.mark.slow) for p in sorted(PRESETS)]
)
def test_verify_every_preset(preset, tmp_path, capsys):
    tiny_config(preset).save(tmp_path / "config.json")
    assert main(["verify", "--config", str(tmp_path / "config.json"), "--frames", "20"]) == 0
    assert capsys.readouterr().out.endswith("parity ok\n")
