"""Weights that would give silent garbage, and files that used to give tracebacks: each is one
line naming the file and the tensor or field, with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import openai_dims, tiny_config

from convert import ConversionError, load_checkpoint, save_checkpoint
from convert.__main__ import main as convert_main
from convert.core import torch_to_numpy
from torch_ref import Whisper as TorchWhisper

CONFIG = tiny_config(n_audio_layer=1, n_text_layer=1)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def tensors(**changes) -> dict[str, np.ndarray]:
    values = torch_to_numpy(TorchWhisper(CONFIG))
    values.update(changes)
    return values


def write_torch_dir(path, values) -> None:
    """A torch checkpoint directory written without our checks (as another tool might)."""
    from safetensors.numpy import save_file

    path.mkdir()
    CONFIG.save(path / "config.json")
    save_file(values, path / "model.safetensors")


def test_non_finite_weights_are_named_and_refused_unless_allowed(tmp_path, capsys):
    weight = tensors()["decoder.ln.weight"].copy()
    weight[[1, 5]] = [np.nan, np.inf]
    write_torch_dir(tmp_path / "nan", tensors(**{"decoder.ln.weight": weight}))

    assert convert_main([str(tmp_path / "nan"), str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "1 tensor(s) hold NaN or infinity: decoder.ln.weight (2 of 32 values)" in line
    assert "pass --allow-nonfinite to convert it anyway" in line and not (tmp_path / "out").exists()

    assert convert_main([str(tmp_path / "nan"), str(tmp_path / "out"), "--allow-nonfinite"]) == 0
    assert np.isnan(load_checkpoint(tmp_path / "out", allow_nonfinite=True).tensors["decoder.ln.weight"][1])

    assert convert_main(["verify", str(tmp_path / "nan")]) == 2
    line = one_line_error(capsys)
    assert "decoder.ln.weight" in line and "parity cannot be checked on non-finite weights" in line
    assert "parity FAILED" not in capsys.readouterr().out

    from transcribe.__main__ import main as transcribe_main

    assert transcribe_main([str(tmp_path / "x.wav"), "--checkpoint", str(tmp_path / "nan")]) == 2
    assert "hold NaN or infinity: decoder.ln.weight" in one_line_error(capsys)


@pytest.mark.parametrize(
    "value, dtype",
    [
        (np.ones((32,), np.int32), "int32"),
        (np.ones((32,), bool), "bool"),
        (np.ones((32,), np.int64), "int64"),
    ],
)
def test_tensors_that_are_not_floating_point_are_refused(tmp_path, capsys, value, dtype):
    write_torch_dir(tmp_path / "ints", tensors(**{"decoder.ln.bias": value}))
    assert convert_main([str(tmp_path / "ints"), str(tmp_path / "out")]) == 2
    assert f"tensors that are not floating point: decoder.ln.bias ({dtype})" in one_line_error(capsys)


def test_a_safetensors_header_that_lies_about_the_dtype_is_refused(tmp_path, capsys):
    write_torch_dir(tmp_path / "lie", tensors())
    path = tmp_path / "lie" / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].replace(b'"F32"', b'"I32"', 1)  # the same width: the bytes still parse
    path.write_bytes(data[:8] + header + data[8 + length :])
    name = next(k for k, v in json.loads(header).items() if k != "__metadata__" and v["dtype"] == "I32")
    assert convert_main([str(tmp_path / "lie"), str(tmp_path / "out")]) == 2
    assert f"tensors that are not floating point: {name} (int32)" in one_line_error(capsys)


def openai_payload(**changes):
    import whisper

    model = whisper.model.Whisper(openai_dims())
    payload = {"dims": dataclasses.asdict(model.dims), "model_state_dict": model.state_dict()}
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    "payload, message",
    [
        (lambda: openai_payload(model_state_dict=[torch.zeros(2)]), "'model_state_dict' is a list, not a mapping"),
        (
            lambda: openai_payload(model_state_dict={0: torch.zeros(2)}),
            "'model_state_dict' has keys that are not names: 0",
        ),
        (lambda: openai_payload(dims=[80, 20]), "'dims' is a list, not a mapping of dimensions"),
        (
            lambda: openai_payload(dims={**openai_payload()["dims"], "n_text_layer": 1.5}),
            "n_text_layer must be an integer",
        ),
        (
            lambda: openai_payload(
                model_state_dict={
                    **openai_payload()["model_state_dict"],
                    "decoder.ln.bias": torch.zeros(64, dtype=torch.complex64),
                }
            ),
            "tensors that are not floating point: decoder.ln.bias (complex64)",
        ),
    ],
)
def test_openai_files_of_the_wrong_shape_are_one_line_errors(tmp_path, capsys, payload, message):
    torch.save(payload(), tmp_path / "model.pt")
    assert convert_main([str(tmp_path / "model.pt"), str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys)


def test_files_that_are_not_checkpoints_say_why_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {"empty.pt": "empty.pt: empty file, not a PyTorch checkpoint"}
    for seed in range(5):  # random bytes make torch's unpickler raise many different errors
        (tmp_path / f"random{seed}.pt").write_bytes(np.random.default_rng(seed).bytes(300))
        cases[f"random{seed}.pt"] = "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02garbage")
    cases["archive.pt"] = "archive.pt: not a readable PyTorch checkpoint ("
    for name, message in cases.items():
        assert convert_main([str(tmp_path / name), str(tmp_path / "out")]) == 2
        line = one_line_error(capsys)
        assert message in line and "weights_only=False" not in line


def test_config_json_that_is_not_utf8_or_absurd_is_refused_before_anything_is_built(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", "torch", CONFIG, tensors())
    (tmp_path / "ckpt" / "config.json").write_bytes('{"norm": "layernorm\u00e9"}'.encode("latin-1"))
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "config.json: not UTF-8 text" in one_line_error(capsys)

    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "n_text_layer": 1_000_000}))
    started = time.monotonic()
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert time.monotonic() - started < 10
    assert "n_text_layer=1000000 is more than the 1024 layers per side" in one_line_error(capsys)


def test_a_damaged_flax_checkpoint_is_summarised_in_one_line(tmp_path, capsys):
    save_checkpoint(tmp_path / "flax", "flax", CONFIG, tensors())
    for path in (tmp_path / "flax" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    assert convert_main([str(tmp_path / "flax"), str(tmp_path / "out")]) == 2
    assert "state: not a readable orbax checkpoint" in one_line_error(capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "0"], "argument --frames: must be at least 1, got 0"),
        (["--batch", "-2"], "argument --batch: must be at least 1, got -2"),
        (["--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
        (["--atol", "-1"], "argument --atol: must be a finite number >= 0, got -1"),
        (["--rtol", "nan"], "argument --rtol: must be a finite number >= 0, got nan"),
    ],
)
def test_verify_arguments_out_of_range(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        convert_main(["verify", "--preset", "whisper", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_verify_with_a_missing_or_malformed_config_file(tmp_path, capsys):
    assert convert_main(["verify", "--config", str(tmp_path / "nope.json")]) == 2
    assert f"{tmp_path / 'nope.json'}: no such file" in one_line_error(capsys)
    for content, message in [("null", "config JSON must be an object"), ("[1, 2]", "config JSON must be an object")]:
        (tmp_path / "config.json").write_text(content)
        assert convert_main(["verify", "--config", str(tmp_path / "config.json")]) == 2
        assert f"{tmp_path / 'config.json'}: {message}" in one_line_error(capsys)


def test_loading_refuses_non_float_tensors_in_the_api_too(tmp_path):
    write_torch_dir(tmp_path / "ints", tensors(**{"decoder.ln.bias": np.ones((32,), np.int32)}))
    with pytest.raises(ConversionError, match="not floating point"):
        load_checkpoint(tmp_path / "ints")
