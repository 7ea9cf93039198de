"""Several cooperating processes on this machine: `python -m train --processes 2` (2 x 4 CPU devices,
gloo collectives, coordinator on 127.0.0.1) against the same run in one process with 8 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import corrupt, tiny_train_config, write_clips

from train.metrics import read_metrics

pytestmark = pytest.mark.slow  # four training runs of several processes: minutes on 2 cores


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for split, count, seed in [("train", 24, 0), ("eval", 12, 1)]:
        rows = write_clips(folder, count, seed)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def train_cli(config_path: Path, devices: int, *flags: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    }
    return subprocess.run(
        [sys.executable, "-m", "train", "--config", str(config_path), *flags],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def write_config(dataset: Path, out: Path, **overrides) -> Path:
    settings = dict(mesh_fsdp=4, eval_batch_size=8, decode_eval=True, export=("torch",), export_best=False)
    config = tiny_train_config(dataset, out, **{**settings, **overrides})
    path = out / "settings.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict()))
    return path


def weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "model-torch" / "model.safetensors")


def start_checkpoint(dataset: Path, folder: Path) -> Path:
    """A float16 torch checkpoint of the tiny model with seeded random weights, to start from."""
    from flax import nnx

    from convert import save_checkpoint
    from convert.core import flax_to_torch
    from flax_whisper import Whisper

    config = tiny_train_config(dataset, folder).model_config()
    tensors = flax_to_torch(Whisper(config, rngs=nnx.Rngs(11)))
    save_checkpoint(folder / "start", "torch", config, {k: v.astype(np.float16) for k, v in tensors.items()})
    return folder / "start"


def test_two_processes_train_as_one_and_resume_exactly(dataset, tmp_path):
    # Every run starts from a checkpoint, which each process places region by region into the
    # shards its own devices hold: the same losses as one process prove the regions right.
    start = str(start_checkpoint(dataset, tmp_path / "checkpoint"))
    single = write_config(dataset, tmp_path / "single", init_from=start)
    done = train_cli(single, 8)
    assert done.returncode == 0, done.stderr[-3000:]

    double = write_config(dataset, tmp_path / "double", init_from=start)
    done = train_cli(double, 4, "--processes", "2")
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (read_metrics(tmp_path / name / "run" / "logs" / "metrics.jsonl") for name in ("single", "double"))
    losses = {name: [r["loss"] for r in log if r["kind"] == "train"] for name, log in (("one", one), ("two", two))}
    assert len(losses["one"]) == 6
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5)  # the same global batches
    evals = {name: [r for r in log if r["kind"] == "eval"] for name, log in (("one", one), ("two", two))}
    assert [r["step"] for r in evals["two"]] == [0, 3, 6]
    for a, b in zip(evals["one"], evals["two"], strict=True):  # the whole eval split, decoded across processes
        assert a["cer"] == b["cer"] and a["wer"] == b["wer"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
    # Stopped at step 3 and resumed: the parameters of the uninterrupted 2-process run, bit for bit.
    resumed = write_config(dataset, tmp_path / "resumed", init_from=start)
    done = train_cli(resumed, 4, "--processes", "2", "--stop-at-step", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    done = train_cli(resumed, 4, "--processes", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted, again = weights(tmp_path / "double" / "run"), weights(tmp_path / "resumed" / "run")
    assert uninterrupted.keys() == again.keys()
    assert all(np.array_equal(uninterrupted[k], again[k]) for k in uninterrupted)

    # The newest checkpoint unreadable: both processes resume from the one before, and it is set
    # aside once (by process 0), never lost; the run ends with the same parameters again.
    corrupt(tmp_path / "resumed" / "run" / "checkpoints" / "6" / "state")
    done = train_cli(resumed, 4, "--processes", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: checkpoint step 6 cannot be read" in done.stderr and "resuming from step 3" in done.stderr
    aside = list((tmp_path / "resumed" / "run" / "checkpoints-unreadable").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["6"]
    again = weights(tmp_path / "resumed" / "run")
    assert all(np.array_equal(uninterrupted[k], again[k]) for k in uninterrupted)


def test_a_process_that_fails_stops_the_run_with_its_reason(dataset, tmp_path):
    """A bad run (the eval batch does not split over 8 devices) ends every process, non-zero, with
    the reason, instead of leaving the others waiting on a collective."""
    config = write_config(dataset, tmp_path / "bad", eval_batch_size=6)
    done = train_cli(config, 4, "--processes", "2", timeout=200)
    assert done.returncode != 0
    assert "eval_batch_size 6 does not split over 8 devices" in done.stderr


def test_a_coordinator_that_cannot_be_reached_is_an_error_in_bounded_time(dataset, tmp_path):
    config = write_config(dataset, tmp_path / "alone")
    env_extra = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                 "JAX_INITIALIZATION_TIMEOUT": "5"}  # fmt: skip
    env = {**os.environ, **env_extra}
    done = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(config), "--distributed"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot reach the coordinator at 127.0.0.1:9 within 5 s" in done.stderr


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(dataset, tmp_path):
    """Preemption of one host: the signal is agreed at the next step, every process saves that
    step together and exits cleanly (nobody is left waiting in a collective)."""
    import signal
    import socket
    import time

    config = write_config(dataset, tmp_path / "preempted", steps=400, save_every=1000, eval_data=None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    processes = []
    for index in range(2):
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index)}  # fmt: skip
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "train", "--config", str(config), "--distributed"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))  # fmt: skip
    metrics = tmp_path / "preempted" / "run" / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # a few steps in
        if metrics.is_file() and len(read_metrics(metrics, "train")) >= 3:
            break
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)  # only the second process is told
    outputs = [p.communicate(timeout=240) for p in processes]
    if [p.returncode for p in processes] != [0, 0]:
        print("\n=====\n".join(o[1][-6000:] for o in outputs))
    assert [p.returncode for p in processes] == [0, 0]
    stopped = [int(out.split("stopping at step ")[1].split()[0]) for out, _ in outputs if "stopping at step" in out]
    assert len(stopped) == 2 and stopped[0] == stopped[1] < 400, outputs
    saved = sorted(int(p.name) for p in (tmp_path / "preempted" / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped[0]]


@pytest.mark.parametrize(
    "counts, message",
    [
        ((3, 2), "not every process joined the coordinator at 127.0.0.1:{port} within 5 s"),
        ((2, 3), "the processes disagree on JAX_NUM_PROCESSES (process 0: 2, process 1: 3)"),
    ],
    ids=["coordinator-waits-for-more", "a-process-expects-more"],
)
def test_processes_told_different_counts_stop_with_an_error_in_bounded_time(dataset, tmp_path, counts, message):
    from train.launch import free_port

    config = write_config(dataset, tmp_path / "run")
    port = free_port()
    processes = []
    for index, count in enumerate(counts):
        env = {
            **os.environ,
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(count),
            "JAX_PROCESS_ID": str(index),
            "JAX_INITIALIZATION_TIMEOUT": "5",
        }
        command = [sys.executable, "-m", "train", "--config", str(config), "--distributed"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=90) for process in processes]  # never a hang
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 2, err[-2000:]
        assert message.format(port=port) in err
