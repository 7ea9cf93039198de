"""Nothing a command was not asked to replace is ever lost: every case ends with exit status 2,
one line naming the path, and every file that existed before byte-identical after."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import tiny_config

import convert.checkpoints
from convert import save_checkpoint
from convert.__main__ import main as convert_main
from convert.core import torch_to_numpy
from torch_ref import Whisper as TorchWhisper


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes); folders as empty entries."""
    files = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        files[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return files


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding a user's files and a torch checkpoint in `models/`."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "models" / "README").write_text("keep me")
    (work / "data").mkdir()
    (work / "data" / "table.csv").write_text("a,b\n1,2\n")
    config = tiny_config(n_audio_layer=1, n_text_layer=1)
    save_checkpoint(work / "models" / "ckpt", "torch", config, torch_to_numpy(TorchWhisper(config)))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(
    "dst, message",
    [
        ("", "the destination path is empty"),
        (".", "is the current directory or holds it"),
        ("..", "is the current directory or holds it"),
        ("models", "holds the source models/ckpt"),
        ("models/ckpt", "is the source itself"),
        ("models/ckpt/inner", "is inside the source models/ckpt"),
        ("data", "exists and is not a checkpoint (a folder of something else)"),
        ("notes.txt", "exists and is not a checkpoint (a file of something else)"),
    ],
)
def test_convert_refuses_destinations_that_would_lose_data(workspace, capsys, dst, message):
    before = snapshot(workspace.parent)
    assert convert_main(["models/ckpt", dst, "--overwrite"]) == 2
    assert message in one_line_error(capsys)
    assert snapshot(workspace.parent) == before


def test_convert_to_openai_of_a_model_openai_cannot_hold_changes_nothing(workspace, capsys):
    """Validation comes before any write: the existing .pt is untouched and the fields are named."""
    config = tiny_config(n_audio_layer=1, n_text_layer=1, norm="rmsnorm", decoder_rotary=True)
    save_checkpoint("models/rms", "torch", config, torch_to_numpy(TorchWhisper(config)))
    openai_ready = tiny_config(n_audio_layer=1, n_text_layer=1, n_vocab=51865, decoder_start_token_id=None)
    save_checkpoint("models/old.pt", "openai", openai_ready, torch_to_numpy(TorchWhisper(openai_ready)))
    before = snapshot(workspace.parent)
    assert convert_main(["models/rms", "models/old.pt", "--to", "openai", "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert "norm='rmsnorm' (OpenAI: 'layernorm')" in line and "decoder_rotary=True (OpenAI: False)" in line
    assert snapshot(workspace.parent) == before


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(workspace, capsys):
    assert convert_main(["models/ckpt", "out"]) == 0
    before = snapshot(workspace.parent)
    assert convert_main(["models/ckpt", "out"]) == 2
    assert "out: exists; pass --overwrite" in one_line_error(capsys)
    assert snapshot(workspace.parent) == before
    assert convert_main(["models/ckpt", "out", "--to", "torch", "--overwrite"]) == 0
    assert convert.detect_format("out") == "torch"
    assert not [p for p in workspace.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


@pytest.mark.parametrize("fmt", ["torch", "flax", "openai"])
@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_leaves_no_partial_output_and_the_old_one_intact(workspace, capsys, monkeypatch, fmt, failure):
    """The disk fills up (or turns out read-only) half-way through writing: the partial output
    is removed, the checkpoint that was there is byte-identical, and the error is one line."""
    config = tiny_config(n_audio_layer=1, n_text_layer=1, n_vocab=51865, decoder_start_token_id=None)
    save_checkpoint("models/src", "torch", config, torch_to_numpy(TorchWhisper(config)))
    target = "out.pt" if fmt == "openai" else "out"
    assert convert_main(["models/src", target, "--to", fmt]) == 0
    before = snapshot(workspace.parent)
    writer = convert.checkpoints.WRITERS[fmt]

    def fail_half_way(path: Path, *args):
        writer(path, *args)  # everything written, then the last flush fails
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setitem(convert.checkpoints.WRITERS, fmt, fail_half_way)
    capsys.readouterr()
    assert convert_main(["models/src", target, "--to", fmt, "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert f"{target}: could not be written: {os.strerror(failure)}" in line
    assert snapshot(workspace.parent) == before


def test_an_unwritable_destination_folder_is_one_line(workspace, capsys):
    (workspace / "blocked").write_text("a file where a folder should be")
    before = snapshot(workspace.parent)
    assert convert_main(["models/ckpt", "blocked/out"]) == 2
    assert "blocked/out: cannot create its folder" in one_line_error(capsys)
    assert snapshot(workspace.parent) == before


# ----------------------------------------------------------------------------- training


def run_train(args: list[str]) -> int:
    from train.__main__ import main

    return main(["--no-progress", *args])


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("files", ["--run-dir", "data"], "data: exists and is not a run folder (no run.json)"),
        ("run", ["--run-dir", "runs/old"], "runs/old: holds a run already: pass --resume"),
        ("run", ["--run-dir", "runs/old/model"], "is inside the run folder"),
        ("run", ["--run-dir", "runs/old/checkpoints/new"], "is inside the run folder"),
        ("files", ["--run-dir", "."], "is the current directory or holds it"),
        ("files", ["--name", "x", "--run-dir", ""], "run_dir must not be empty"),
        ("files", ["--export-flax", "data"], "unrecognized arguments"),
    ],
)
def test_training_never_writes_into_another_runs_folder_or_a_folder_of_other_files(
    workspace, capsys, setup, args, message
):
    if setup == "run":  # a finished run's folder, as the run folder code lays it out
        old = workspace / "runs" / "old"
        for sub in ("checkpoints/5", "logs", "model"):
            (old / sub).mkdir(parents=True)
        (old / "run.json").write_text(json.dumps({"train": {}, "model": {}}))
        (old / "logs" / "metrics.jsonl").write_text('{"step": 5}\n')
    before = snapshot(workspace.parent)
    if message == "unrecognized arguments":
        with pytest.raises(SystemExit) as exit_info:
            run_train(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    else:
        assert run_train(args) == 2
        assert message in one_line_error(capsys)
    assert snapshot(workspace.parent) == before


def test_settings_of_earlier_versions_name_their_replacement(workspace, capsys):
    (workspace / "old.toml").write_text('export_flax = "data"\n')
    assert run_train(["--config", "old.toml"]) == 2
    assert "the setting 'export_flax' is gone: the flax export is RUN_DIR/model" in one_line_error(capsys)
