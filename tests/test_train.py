"""The training loop: it learns, resumes bit-exactly, survives SIGTERM and kills, skips bad steps
and bad rows, shards over 8 CPU devices with the same losses, and matches torch step for step."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import soundfile
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from flax_whisper import Whisper
from flax_whisper.audio import log_mel_spectrogram
from train.config import TrainConfig
from train.data import DataStats, read_records, train_batches
from train.loop import Trainer, TrainingError
from train.metrics import read_metrics
from train.run_folder import RunFolderError

SPEECH = Path(__file__).parent / "data" / "speech_16k.wav"
WORDS = ["one", "two", "red", "lamp", "door", "open", "six", "blue"]
TINY_MODEL = dict(
    n_mels=80,
    n_audio_ctx=32,  # 64 mel frames: 0.64 s of audio
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=258,
    n_text_ctx=16,
    n_text_state=32,
    n_text_head=2,
    n_text_layer=1,
    decoder_start_token_id=257,
    dropout=0.0,
)


def write_clips(folder: Path, count: int, seed: int) -> list[dict]:
    """`count` FLAC clips (0.2-0.6 s cut from the shipped speech) with short made-up transcripts."""
    speech = soundfile.read(SPEECH, dtype="float32")[0]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        length = int(rng.integers(3200, 9600))
        start = int(rng.integers(0, len(speech) - length))
        name = f"clip_{seed}_{i}.flac"
        soundfile.write(folder / name, speech[start : start + length], 16000)
        rows.append({"audio": name, "text": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))})
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for split, count, seed in [("train", 24, 0), ("eval", 8, 1)]:
        rows = write_clips(folder, count, seed)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_train_config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        model=dict(TINY_MODEL),  # every field of the demo size replaced
        train_data=str(dataset / "train.jsonl"),
        eval_data=str(dataset / "eval.jsonl"),
        audio_buckets=(32, 64),
        batch_size=8,
        eval_batch_size=8,
        steps=6,
        warmup_steps=2,
        learning_rate=3e-3,
        log_every=1,
        eval_every=3,
        save_every=3,
        decode_eval=False,
        time_masks=0,  # SpecAugment off: the torch parity run has none
        freq_masks=0,
        run_dir=str(out / "run"),
        export=(),
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def params_of(trainer: Trainer) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(jax.device_get(trainer.state.params))
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6), exported to torch; steps 4 and 5 traced."""
    out = tmp_path_factory.mktemp("reference")
    config = tiny_train_config(
        dataset, out, export=("torch", "hf"), export_best=False, decode_eval=True, profile_from=4, profile_steps=2
    )
    trainer = Trainer(config)
    result = trainer.run()
    return trainer, result, out


def test_run_logs_evaluates_checkpoints_and_exports(reference_run):
    trainer, result, out = reference_run
    assert result.step == 6 and not result.stopped_early and result.skipped_steps == 0
    train_log = read_metrics(out / "run" / "logs" / "metrics.jsonl", "train")
    assert [r["step"] for r in train_log] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] >= 0 for r in train_log)
    assert train_log[1]["learning_rate"] > train_log[0]["learning_rate"]  # warmup
    evals = read_metrics(out / "run" / "logs" / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [0, 3, 6] and all(0 <= r["token_accuracy"] <= 1 for r in evals)
    assert {"cer", "wer"} <= evals[-1].keys()
    assert any((out / "run" / "logs" / "tensorboard").iterdir())
    curves = (out / "run" / "logs" / "curves.png").read_bytes()  # the matplotlib summary of the run
    assert curves.startswith(b"\x89PNG") and len(curves) > 10_000
    assert trainer_steps(out) == [3, 6]
    # The profile: one trace, whose device events include the training step's program.
    traces = list((out / "run" / "logs" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and b"jit(train_step)" in traces[0].read_bytes()

    # The torch export holds the final weights: torch_ref gives the Flax model's logits.
    from convert import load_torch_model
    from transcribe import mel_windows

    torch_model = load_torch_model(out / "run" / "model-torch").eval()
    flax_model = trainer.model()
    mel = mel_windows(soundfile.read(SPEECH, dtype="float32")[0][:10000], flax_model.config)
    tokens = np.array([[257, 111, 110, 101]] * len(mel))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(flax_model(mel, tokens)), expected, atol=1e-4)
    # The Hugging Face export holds the same weights under transformers' names.
    from convert import load_checkpoint

    hf, torch_export = load_checkpoint(out / "run" / "model-hf"), load_checkpoint(out / "run" / "model-torch")
    assert hf.format == "hf" and all(np.array_equal(hf.tensors[k], v) for k, v in torch_export.tensors.items())


def trainer_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "run" / "checkpoints").iterdir() if p.name.isdigit())


def test_the_export_is_the_best_evaluated_checkpoint(reference_run):
    """With export_best, the end of a run exports the kept checkpoint of lowest eval loss."""
    from train.checkpointing import Checkpoints

    trainer, _, out = reference_run
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out / "run" / "logs" / "metrics.jsonl", "eval")}
    checkpoints = Checkpoints(out / "run" / "checkpoints")
    best = min(trainer_steps(out), key=lambda step: evals[step])
    assert checkpoints.best_step() == (best, pytest.approx(evals[best]))
    best_trainer = dataclasses.replace(trainer.config, export_best=True)
    state, which = Trainer.exported_state(SimpleNamespace(config=best_trainer, state=trainer.state), checkpoints)
    restored, _, _ = checkpoints.restore(best, trainer.state)
    assert f"step {best}" in which
    for ours, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params), strict=True):
        assert np.array_equal(ours, expected)
    checkpoints.close()


def test_resume_is_bit_exact(reference_run, dataset, tmp_path):
    reference, _, ref_out = reference_run
    config = tiny_train_config(dataset, tmp_path, stop_at_step=4, decode_eval=True)
    first = Trainer(config).run()
    assert first.step == 4 and first.stopped_early
    with pytest.raises(RunFolderError, match="holds a run already: pass --resume"):
        Trainer(config)
    resumed = Trainer(dataclasses.replace(config, stop_at_step=None, resume=True))
    assert resumed.run().step == 6
    ours, expected = params_of(resumed), params_of(reference)
    assert ours.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(ours[name], expected[name]), name
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl", "train")}
    reference_losses = {r["step"]: r["loss"] for r in read_metrics(ref_out / "run" / "logs" / "metrics.jsonl", "train")}
    assert losses == reference_losses


def test_a_partial_checkpoint_is_ignored_on_resume(reference_run, dataset, tmp_path, capsys):
    """Orbax renames a checkpoint into place only when complete; a kill mid-save leaves a
    temporary directory that resuming skips (and removes)."""
    _, _, ref_out = reference_run
    shutil.copytree(ref_out / "run", tmp_path / "run")
    partial = tmp_path / "run" / "checkpoints" / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(os.urandom(64))
    config = tiny_train_config(dataset, tmp_path, resume=True, export=("torch",), export_best=False, decode_eval=True)
    trainer = Trainer(config)
    assert trainer.run().step == 6
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step 6" in capsys.readouterr().out
    assert not partial.exists()


def run_train_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def cli_args(config: TrainConfig) -> list[str]:
    path = config.run_path.parent / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return ["--config", str(path)]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow  # three training processes, signalled one by one: half a minute on 2 cores
def test_ctrl_c_and_sigterm_save_and_stop_cleanly_and_a_kill_keeps_the_last_checkpoint(dataset, tmp_path):
    config = tiny_train_config(dataset, tmp_path, steps=10_000, eval_data=None, save_every=2)
    log = tmp_path / "run" / "logs" / "metrics.jsonl"

    def logged_steps() -> int:
        """Train records in the log (a resumed run appends to it)."""
        return len(read_metrics(log, "train")) if log.exists() else 0

    def stop_with(args: list[str], signum: int, start: int, steps: int) -> tuple[int, str]:
        """Run from step `start`; send `signum` once the run has logged `steps` steps. It must save
        where it stops and exit 0."""
        logged = logged_steps()
        process = run_train_cli(args)
        wait_for(lambda: logged_steps() >= logged + steps)
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["stopped_early"] and summary["step"] >= start + steps
        assert f"on {signal.Signals(signum).name}; checkpoint saved" in out + err
        assert max(trainer_steps(tmp_path)) == summary["step"]  # saved where it stopped
        return summary["step"], out

    first, _ = stop_with(cli_args(config), signal.SIGINT, start=0, steps=3)  # Ctrl-C

    # SIGKILL at an arbitrary moment, saving every other step: the newest complete checkpoint loads.
    resume = [*cli_args(config), "--resume"]
    process = run_train_cli(resume)
    # Saves are asynchronous: wait until a newer checkpoint is complete, then kill while training
    # (and saving every other step) goes on.
    wait_for(lambda: logged_steps() >= first + 4 and max(trainer_steps(tmp_path)) > first)
    process.kill()
    process.communicate()
    last = max(trainer_steps(tmp_path))
    assert last > first

    _, out = stop_with(resume, signal.SIGTERM, start=last, steps=2)  # preemption
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step {last}" in out


def test_a_checkpoint_from_before_the_vocabulary_padding_resumes_and_other_shapes_do_not(reference_run, tmp_path):
    from train.checkpointing import Checkpoints

    trainer, _, _ = reference_run
    state, n_vocab = trainer.state, trainer.model_config.n_vocab
    keystr = jax.tree_util.keystr

    def cut(name: str, rows: int):  # `name`'s arrays with their first `rows` rows only
        return lambda path, x: x[:rows] if name in keystr(path) and x.ndim and x.shape[0] > rows else x

    checkpoints = Checkpoints(tmp_path / "checkpoints", async_save=False)
    old = jax.tree_util.tree_map_with_path(cut("token_embedding", n_vocab), state)  # as stored before
    assert old.params["decoder"]["token_embedding"]["embedding"].shape[0] == n_vocab
    checkpoints.save(3, old, {}, {})
    restored, _, _ = checkpoints.restore(3, state)
    ours, expected = (jax.tree.leaves((s.params, s.opt_state)) for s in (restored, state))
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_array_equal(a, b)  # the padding rows were zero, and are read as zero
    # Any other array of another shape is refused, never padded or truncated.
    rows = trainer.model_config.n_text_ctx - 1
    checkpoints.save(4, jax.tree_util.tree_map_with_path(cut("decoder']['positional_embedding", rows), state), {}, {})
    with pytest.raises(ValueError, match="is not compatible with the stored shape"):
        checkpoints.restore(4, state)
    checkpoints.close()


def test_resume_with_other_settings_names_every_difference(reference_run, dataset, capsys):
    from train.__main__ import main

    _, _, out = reference_run
    same = tiny_train_config(dataset, out, export=("torch",), export_best=False, decode_eval=True, resume=True)
    Trainer(same)  # the stored settings themselves pass
    changed = dataclasses.replace(
        same, learning_rate=1e-3, model={**TINY_MODEL, "decoder_rotary": True}, eval_every=2, stop_at_step=9
    )
    assert main(cli_args(changed)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {out / 'run'}: --resume with settings")
    assert "model.decoder_rotary: False -> True" in err and "learning_rate: 0.003 -> 0.001" in err
    assert "eval_every" not in err and "stop_at_step" not in err


def corrupt(step_folder: Path) -> None:
    """Overwrite every file of a checkpoint with random bytes (a bad disk, a half-copied folder)."""
    for path in step_folder.rglob("*"):
        if path.is_file():
            path.write_bytes(os.urandom(max(path.stat().st_size, 16)))


def test_an_unreadable_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
    reference_run, dataset, tmp_path, capsys
):
    reference, _, ref_out = reference_run
    shutil.copytree(ref_out / "run", tmp_path / "run")
    corrupt(tmp_path / "run" / "checkpoints" / "6" / "state")  # the arrays: found when restoring
    config = tiny_train_config(dataset, tmp_path, resume=True, export=("torch",), export_best=False, decode_eval=True)
    resumed = Trainer(config)
    assert resumed.run().step == 6
    captured = capsys.readouterr()
    assert "warning: checkpoint step 6 cannot be read (" in captured.err and "resuming from step 3" in captured.err
    assert "at step 3" in captured.out
    ours, expected = params_of(resumed), params_of(reference)
    assert all(np.array_equal(ours[name], expected[name]) for name in expected)  # exactly the same run
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "checkpoints-unreadable").iterdir()] == ["6"]

    # With no readable checkpoint at all, the command says so in one line.
    from train.__main__ import main

    steps = trainer_steps(tmp_path)
    for step in steps:
        corrupt(tmp_path / "run" / "checkpoints" / str(step) / "state")
    capsys.readouterr()
    assert main([*cli_args(config), "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: no checkpoint in") and all(f"step {step}:" in error for step in steps)

    # Damaged metadata (which orbax reads when it opens the folder) is set aside by name too.
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(ref_out / "run", tmp_path / "run")
    corrupt(tmp_path / "run" / "checkpoints" / "6")
    Trainer(config).run()
    captured = capsys.readouterr()
    assert "warning: checkpoint step 6 cannot be read (_CHECKPOINT_METADATA is damaged)" in captured.err
    assert "at step 3" in captured.out


def test_a_non_finite_model_is_not_exported_and_bad_labels_stop_at_the_batch(reference_run, tmp_path):
    import copy

    from convert.checkpoints import NonFiniteError
    from train.data import DataError
    from train.run_folder import RunFolder

    trainer = copy.copy(reference_run[0])  # the same compiled steps, another folder and state
    trainer.folder = RunFolder(tmp_path / "run")
    nan = jax.tree.map(lambda x: x * np.nan, trainer.state.params)
    trainer.state = trainer.state.replace(params=nan)
    with pytest.raises(NonFiniteError, match="hold NaN or infinity: decoder"):
        trainer.export()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

    audio = np.zeros((8, 64 * 160), np.float32)
    for bad in (-5, 258):
        labels = np.full((8, 4), -100, np.int32)
        labels[3, 1] = bad
        with pytest.raises(DataError, match=f"a batch holds label {bad}: labels must be token ids in \\[0, 258\\)"):
            trainer.to_device({"audio": audio, "labels": labels})


def test_non_finite_steps_are_skipped_then_the_run_stops(dataset, tmp_path):
    """Batches whose loss is NaN (features poisoned on their way to the devices) change nothing
    but the counters, and after max_bad_steps in a row the run stops with a message."""
    config = tiny_train_config(dataset, tmp_path, max_bad_steps=3)
    trainer = Trainer(config)
    to_device = trainer.to_device
    trainer.to_device = lambda batch: to_device({**batch, "audio": np.full_like(batch["audio"], np.nan)})
    before = params_of(trainer)
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
        trainer.run()
    after = params_of(trainer)
    assert int(trainer.state.skipped) == 3
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gradient_accumulation_equals_one_big_batch(dataset, tmp_path):
    one = tiny_train_config(dataset, tmp_path / "a", batch_size=8, eval_data=None)
    two = dataclasses.replace(one, accumulation_steps=2, run_dir=str(tmp_path / "b"))
    batch = next(train_batches(read_records(one.train_data, "train"), Trainer(one).featurizer, 8, 0, DataStats()))
    results = []
    for config in (one, two):
        trainer = Trainer(config)
        trainer.state, metrics = trainer.train_fn(trainer.state, trainer.to_device(batch))
        results.append((float(metrics["loss"]), params_of(trainer)))
    (loss_one, params_one), (loss_two, params_two) = results
    assert abs(loss_one - loss_two) <= 1e-6 * abs(loss_one)
    for name in params_one:
        np.testing.assert_allclose(params_two[name], params_one[name], atol=1e-6, err_msg=name)


def test_training_parity_with_torch(dataset, tmp_path):
    """Same initial weights, batches and AdamW hyperparameters: flax_whisper + optax and
    torch_ref + torch.optim give the same loss at every step (float32)."""
    from convert.core import flax_to_torch, new_torch_model
    from train.torch_train import torch_optimizer, torch_train_step

    config = tiny_train_config(dataset, tmp_path, eval_data=None, steps=8, clip_norm=0.5, weight_decay=0.1)
    trainer = Trainer(config)
    torch_model = new_torch_model(trainer.model_config, flax_to_torch(jax.device_get(trainer.model())))
    torch_model.train()
    optimizer, scheduler = torch_optimizer(torch_model, config)
    batches = train_batches(read_records(config.train_data, "train"), trainer.featurizer, 8, 0, DataStats())
    losses = []
    for step in range(config.steps):
        batch = next(batches)
        trainer.state, metrics = trainer.train_fn(trainer.state, trainer.to_device(batch))
        ours = float(metrics["loss"])
        mel = np.array(log_mel_spectrogram(batch["audio"], 80))  # as the flax step computes it on the device
        reference = torch_train_step(torch_model, optimizer, scheduler, mel, batch["labels"], config.clip_norm)
        assert abs(ours - reference) <= 1e-4 * abs(reference), f"step {step}: {ours} vs {reference}"
        losses.append(ours)
    assert losses[-1] < losses[0]  # the runs did train


SHARDED_RUN = """
import dataclasses, json, sys
import jax
from train.config import TrainConfig
from train.data import DataStats, read_records, train_batches
from train.loop import Trainer

config = TrainConfig.from_dict(json.loads(sys.argv[1]))
assert len(jax.devices()) == 8, jax.devices()
out = {}
runs = [("one", jax.devices()[:1], 1, 1), ("mesh", jax.devices(), 4, 1), ("tensor", jax.devices(), 2, 2)]
for name, devices, fsdp, tensor in runs:
    trainer = Trainer(dataclasses.replace(config, mesh_fsdp=fsdp, mesh_tensor=tensor), devices=devices)
    batches = train_batches(read_records(config.train_data, "train"), trainer.featurizer, 8, 0, DataStats())
    losses = []
    for _ in range(3):
        trainer.state, metrics = trainer.train_fn(trainer.state, trainer.to_device(next(batches)))
        losses.append(float(metrics["loss"]))
    params = jax.tree_util.tree_flatten_with_path(trainer.state.params)[0]
    shards = {}
    for path, leaf in params:
        local = list(leaf.addressable_shards[0].data.shape)
        shards[jax.tree_util.keystr(path)] = [str(leaf.sharding.spec), local, list(leaf.shape)]
    out[name] = {"losses": losses, "shards": shards, "mesh": dict(trainer.mesh.shape)}

# Starting from a checkpoint (torch, then flax on a mesh with a tensor axis): its weights, placed
# array by array and device by device into the same shardings.
import numpy as np
from convert import load_checkpoint
from convert.core import flax_to_torch
for path, tensor in zip(sys.argv[2:], (1, 2)):
    checkpoint = load_checkpoint(path)
    trainer = Trainer(dataclasses.replace(config, mesh_fsdp=4 // tensor, mesh_tensor=tensor, init_from=path))
    loaded = flax_to_torch(jax.device_get(trainer.model()))
    out["from_" + checkpoint.format] = {
        "equal": all(np.array_equal(loaded[k], np.asarray(v, np.float32)) for k, v in checkpoint.tensors.items()),
        "specs_as_fresh": all(
            a.sharding.is_equivalent_to(b, a.ndim)
            for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(trainer.shardings), strict=True)
        ),
        "embedding": str(trainer.state.params["decoder"]["token_embedding"]["embedding"].get_value().sharding.spec),
    }
print(json.dumps(out))
"""


@pytest.mark.slow  # two training runs in subprocesses; tests/test_sharding.py keeps the mesh in the main suite
def test_eight_device_mesh_matches_one_device_and_shards_parameters(dataset, tmp_path, monkeypatch):
    config = tiny_train_config(dataset, tmp_path, eval_data=None)
    from convert import save_checkpoint
    from convert.core import flax_to_torch

    model_config = config.model_config()
    start = flax_to_torch(Whisper(model_config, rngs=nnx.Rngs(7)))
    start = {k: v.astype(np.float16) for k, v in start.items()}
    save_checkpoint(tmp_path / "start", "torch", model_config, start)
    import convert.checkpoints

    monkeypatch.setattr(convert.checkpoints, "CHUNK_BYTES", 1024)  # stacks in several chunks: read by regions
    save_checkpoint(tmp_path / "start_flax", "flax", model_config, start)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SHARDED_RUN,
            json.dumps(config.to_dict()),
            str(tmp_path / "start"),
            str(tmp_path / "start_flax"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mesh"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert result["tensor"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(result["mesh"]["losses"], result["one"]["losses"], rtol=1e-5)
    np.testing.assert_allclose(result["tensor"]["losses"], result["one"]["losses"], rtol=1e-5)
    shards = result["mesh"]["shards"]
    # The token table (258 tokens, padded to 384 rows) is split on its vocabulary: a quarter each.
    embedding = next(v for k, v in shards.items() if "token_embedding" in k)
    assert embedding == [str(P("fsdp", None)), [384 // 4, 32], [384, 32]]
    fc1 = next(v for k, v in shards.items() if "fc1" in k and "kernel" in k)
    assert fc1[0] == str(P(None, "fsdp", None))  # (layers, embed, mlp): FSDP on the width
    # With a tensor axis: the MLP's hidden units split over it, the table over both.
    spec = {k: v[0] for k, v in result["tensor"]["shards"].items() if "kernel" in k or "embedding" in k}
    assert next(v for k, v in spec.items() if "fc1" in k) == str(P(None, "fsdp", "tensor"))
    assert next(v for k, v in spec.items() if "fc2" in k) == str(P(None, "tensor", "fsdp"))
    assert next(v for k, v in spec.items() if "token_embedding" in k) == str(P(("tensor", "fsdp"), None))
    assert all("fsdp" not in v[0] for v in result["one"]["shards"].values())
    # init_from a (float16) checkpoint: exactly its weights, in float32, sharded as a fresh state.
    for fmt, embedding in (("torch", "fsdp"), ("flax", "tensor")):
        placed = result[f"from_{fmt}"]
        assert placed["equal"] and placed["specs_as_fresh"] and embedding in placed["embedding"], (fmt, placed)
