"""Training data and settings: manifests (JSONL, CSV), Hugging Face datasets on disk, buckets,
bad rows reported and skipped, long transcripts cut and counted, config files and flags."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from train.config import DEMO_MODEL, TrainConfig, from_args
from train.data import DataError, DataStats, Featurizer, eval_batches, read_records, train_batches
from whisper_config import ConfigError, ModelConfig
from whisper_io import ByteTokenizer

REPO = Path(__file__).parent.parent
CONFIG = ModelConfig.from_preset("whisper", **{**DEMO_MODEL, "n_audio_ctx": 32, "n_text_ctx": 12})


def featurizer(**buckets) -> Featurizer:
    tokenizer = ByteTokenizer(CONFIG.n_vocab)
    return Featurizer.create(CONFIG, tokenizer, tokenizer.sot_sequence(), **buckets)


def write_rows(folder: Path, seconds: list[float], texts: list[str]) -> list[dict]:
    rows = []
    for i, (length, text) in enumerate(zip(seconds, texts, strict=True)):
        name = f"a{i}.wav"
        tone = 0.3 * np.sin(np.arange(int(16000 * length)) * 0.05).astype(np.float32)
        soundfile.write(folder / name, tone, 16000)
        rows.append({"audio": name, "text": text})
    return rows


def test_manifests_batches_buckets_and_bad_rows(tmp_path, capsys):
    rows = write_rows(tmp_path, [0.1, 0.3, 0.5, 0.2, 0.6], ["ab", "cd", "ef", "x" * 20, "gh"])
    rows.append({"audio": "missing.wav", "text": "never read"})
    (tmp_path / "broken.wav").write_text("not audio")
    rows.append({"audio": "broken.wav", "text": "never read either"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl, table = read_records(tmp_path / "m.jsonl", "train"), read_records(tmp_path / "m.csv", "train")
    assert jsonl == table and jsonl[0]["audio"] == str(tmp_path / "a0.wav")  # relative to the manifest

    stats = DataStats()
    features = featurizer(audio_buckets=(16, 32), text_buckets=(4,))
    assert features.audio_buckets == (16, 32, 64) and features.text_buckets == (4, 12)
    batches = train_batches(jsonl, features, 2, seed=0, stats=stats)
    seen = [next(batches) for _ in range(10)]  # several epochs
    for batch in seen:
        assert batch["mel"].shape[1:] in [(80, 16), (80, 32), (80, 64)] and batch["mel"].dtype == np.float32
        assert batch["labels"].shape[1] in (4, 12) and batch["labels"].shape[0] == 2
        longest = (batch["labels"] != -100).sum(axis=1).max()
        assert batch["labels"].shape[1] == min(b for b in (4, 12) if b >= longest)  # the smallest that fits
    assert {b["mel"].shape[2] for b in seen} > {64}  # batches of short clips use short buckets
    assert stats.summary() == {"skipped_files": 2, "truncated_transcripts": stats.truncated}
    assert stats.truncated >= 1  # "x" * 20 + end of text > n_text_ctx=12
    assert sorted(Path(p).name for p in stats.skipped) == ["broken.wav", "missing.wav"]
    warned = capsys.readouterr().err
    assert warned.count("missing.wav") == 1 and "broken.wav" in warned  # reported once each, by name
    assert warned.count("longer than n_text_ctx=12") == 1  # the first cut is announced

    labels = features.labels("hello")
    np.testing.assert_array_equal(labels, [*b"hello", 256])  # byte ids then end of text
    evals = eval_batches(jsonl, features, 4, DataStats())
    assert sum(b["keep"].sum() for b in evals) == 5 and all(len(b["mel"]) == 4 for b in evals)
    assert evals[-1]["labels"][~evals[-1]["keep"]].max() == -100  # padding rows count nowhere


def test_training_data_without_a_usable_row_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"audio": f"x{i}.wav", "text": "a"}) + "\n" for i in range(3)))
    batches = train_batches(read_records(tmp_path / "m.jsonl", "train"), featurizer(), 2, seed=0, stats=DataStats())
    with pytest.raises(DataError, match="none of the 3 training rows can be used"):
        next(batches)


def test_huggingface_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = write_rows(tmp_path, [0.2, 0.3, 0.25], ["one", "two", "three"])
    paths = [str(tmp_path / r["audio"]) for r in rows]
    table = datasets.Dataset.from_dict({"speech": paths, "sentence": [r["text"] for r in rows]})
    table = table.cast_column("speech", datasets.Audio(sampling_rate=16000))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "hf"))
    records = read_records(tmp_path / "hf", "train", audio_column="speech", text_column="sentence")
    assert len(records) == 3 and records[1]["text"] == "two"
    example = featurizer().load_example(records[1], DataStats())
    np.testing.assert_allclose(example["audio"], soundfile.read(paths[1], dtype="float32")[0], atol=1e-4)
    assert len(read_records(tmp_path / "hf", "test", "speech", "sentence")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        read_records(tmp_path / "hf", "validation", "speech", "sentence")
    with pytest.raises(DataError, match="no column 'text'"):
        read_records(tmp_path / "hf", "train", "speech", "text")


def test_bad_manifests_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such manifest"):
        read_records(tmp_path / "none.jsonl", "train")
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the row has no text column"):
        read_records(tmp_path / "bad.jsonl", "train")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"junk\.jsonl:1: not JSON"):
        read_records(tmp_path / "junk.jsonl", "train")


def test_settings_from_defaults_file_and_flags(tmp_path):
    (tmp_path / "run.toml").write_text(
        "steps = 77\nlearning_rate = 1e-4\naudio_buckets = [64]\n[model]\nn_text_layer = 3\n"
    )
    config, _ = from_args(["--config", str(tmp_path / "run.toml"), "--steps", "88", "--model", "norm=rmsnorm"])
    assert (config.steps, config.learning_rate, config.audio_buckets) == (88, 1e-4, (64,))  # flag beats file
    assert config.model["n_text_layer"] == 3 and config.model_config().norm == "rmsnorm"
    assert config.model_config().n_audio_ctx == DEMO_MODEL["n_audio_ctx"]  # the demo model underneath
    config, _ = from_args(["--eval-data", "none", "--no-decode-eval", "--export", "flax,torch", "--name", "x"])
    assert config.eval_data is None and not config.decode_eval and config.export == ("flax", "torch")
    assert config.run_path == Path("runs/x")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown training settings: stpes"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="optimizer must be adamw or adafactor"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="multiple of accumulation_steps"):
        TrainConfig(batch_size=10, accumulation_steps=4)
    with pytest.raises(ConfigError, match="unknown"):
        from_args(["--model", "n_layers=3"])[0].model_config()


def test_the_demo_dataset_is_complete():
    """The shipped demo: every manifest row has its FLAC, and no eval transcript is trained on."""
    demo = REPO / "data" / "demo"
    train, evaluation = read_records(demo / "train.jsonl", "train"), read_records(demo / "eval.jsonl", "test")
    assert len(train) >= 200 and len(evaluation) >= 30
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    longest = 0.0
    for record in [*train, *evaluation]:
        info = soundfile.info(record["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        longest = max(longest, info.duration)
    assert longest <= 2 * DEMO_MODEL["n_audio_ctx"] * 160 / 16000  # every clip fits the demo model


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    import jax.numpy as jnp

    from train.checkpointing import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ck", keep=1, async_save=False)
    state = {"w": jnp.zeros(3)}
    for step, loss in [(1, 0.5), (2, 0.1), (3, 0.9), (4, None)]:
        metrics = None if loss is None else {"eval_loss": loss}
        checkpoints.save(step, {"w": state["w"] + step}, {"next_index": step}, {"step": step}, metrics)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 4]  # the lowest eval loss and the latest
    restored, data, meta = checkpoints.restore(2, state)
    np.testing.assert_array_equal(restored["w"], [2, 2, 2])
    assert data == {"next_index": 2} and meta == {"step": 2}
    checkpoints.close()
