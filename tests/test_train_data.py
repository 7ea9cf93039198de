"""Training data and settings: manifests (JSONL, CSV), Hugging Face datasets on disk, buckets,
bad rows reported and skipped, long transcripts cut and counted, config files and flags."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from train.config import DEMO_MODEL, TrainConfig, from_args
from train.data import DataError, DataStats, Featurizer, check_languages, eval_batches, read_records, train_batches
from whisper_config import ConfigError, ModelConfig
from whisper_io import ByteTokenizer, TokenizerError

REPO = Path(__file__).parent.parent
CONFIG = ModelConfig.from_preset("whisper", **{**DEMO_MODEL, "n_audio_ctx": 32, "n_text_ctx": 12})


def featurizer(**buckets) -> Featurizer:
    tokenizer = ByteTokenizer(CONFIG.n_vocab)
    return Featurizer.create(CONFIG, tokenizer, **buckets)


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
        assert batch["audio"].shape[1] in [16 * 160, 32 * 160, 64 * 160] and batch["audio"].dtype == np.float32
        assert batch["labels"].shape[1] in (4, 12) and batch["labels"].shape[0] == 2
        longest = (batch["labels"] != -100).sum(axis=1).max()
        assert batch["labels"].shape[1] == min(b for b in (4, 12) if b >= longest)  # the smallest that fits
    assert {b["audio"].shape[1] for b in seen} > {64 * 160}  # batches of short clips use short buckets
    assert stats.summary() == {"skipped_files": 2, "truncated_transcripts": stats.truncated}
    assert stats.truncated >= 1  # "x" * 20 + end of text > n_text_ctx=12
    assert sorted(Path(p).name for p in stats.skipped) == ["broken.wav", "missing.wav"]
    warned = capsys.readouterr().err
    assert warned.count("missing.wav") == 1 and "broken.wav" in warned  # reported once each, by name
    assert warned.count("longer than n_text_ctx=12") == 1  # the first cut is announced

    labels = features.labels("hello")
    np.testing.assert_array_equal(labels, [*b"hello", 256])  # byte ids then end of text
    evals = eval_batches(jsonl, features, 4, DataStats())
    assert sum(b["keep"].sum() for b in evals) == 5 and all(len(b["audio"]) == 4 for b in evals)
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


def test_init_from_takes_the_settings_of_how_the_model_runs_and_refuses_others():
    """With init_from the checkpoint decides the model; `model` still sets how it runs and trains
    (it used to be ignored whole: a fine-tune asking for gradient checkpointing ran without)."""
    checkpoint = ModelConfig.from_preset("whisper", "tiny")
    settings = {"gradient_checkpointing": True, "unroll_layers": True, "dropout": 0.1, "n_text_layer": 4}
    config = TrainConfig(init_from="ckpt", model=settings)
    model = config.model_config(checkpoint)
    assert (model.gradient_checkpointing, model.unroll_layers, model.dropout) == (True, True, 0.1)
    assert model.replace(gradient_checkpointing=False, unroll_layers="auto", dropout=0.0) == checkpoint
    with pytest.raises(ConfigError, match=r"differs from it in n_text_layer=2 \(the checkpoint's: 4\)"):
        TrainConfig(init_from="ckpt", model={"n_text_layer": 2, "unroll_layers": True}).model_config(checkpoint)
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig(init_from="ckpt", model={"n_layers": 2}).model_config(checkpoint)


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


def test_long_form_windows_are_taught_as_the_long_form_loop_reads_them():
    """`data/longform/make_longform.py`'s labels of a 5 s window: whole utterances as segments,
    one cut at the start left out, one running past the end as its start alone (then nothing),
    one barely begun at the end left out; every segment within the window."""
    import importlib.util

    path = REPO / "data" / "longform" / "make_longform.py"
    spec = importlib.util.spec_from_file_location("make_longform", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    spans = [(9.0, 10.5, "cut"), (10.7, 11.9, "one two"), (12.3, 13.0, "three"), (14.1, 15.6, "four"), (16, 17, "x")]
    assert module.window_segments(spans, 10.0) == [
        {"start": 0.7, "end": 1.9, "text": " one two"},
        {"start": 2.3, "end": 3.0, "text": " three"},
        {"start": 4.1, "end": None, "text": ""},
    ]
    assert module.window_segments([(1.0, 2.0, "a"), (5.98, 7.0, "late")], 1.0) == [
        {"start": 0.0, "end": 1.0, "text": " a"}
    ]
    import tomllib

    settings = tomllib.loads((path.parent / "train.toml").read_text())
    assert 2 * settings["model"]["n_audio_ctx"] * 160 / 16000 == module.WINDOW  # the window of the model it trains
    assert settings["audio_buckets"] == [2 * settings["model"]["n_audio_ctx"]]


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


def test_a_damaged_checkpoint_leaves_no_reads_behind(tmp_path, caplog, monkeypatch):
    """Orbax reads a checkpoint's arrays as concurrent tasks and closes its event loop as soon as
    one read fails. The failed restore now lets the other reads end first: nothing is printed
    after the error. Before, each read left behind printed a traceback ("Task exception was never
    retrieved", "Event loop is closed") when it ended or was collected: about 200 here."""
    import gc
    import logging
    import sys
    import time

    import jax.numpy as jnp
    from test_train import corrupt

    from train.checkpointing import CheckpointError, Checkpoints

    checkpoints = Checkpoints(tmp_path / "ck", keep=1, async_save=False)
    state = {f"w{i}": jnp.full(4, float(i)) for i in range(200)}
    checkpoints.save(1, state, {}, {})
    corrupt(tmp_path / "ck" / "1" / "state" / "d")  # the arrays; their metadata reads
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(CheckpointError, match="step 1: "):
        checkpoints.restore_newest(state)
    for _ in range(3):  # the reads' threads finish and their leftovers are collected
        time.sleep(0.2)
        gc.collect()
    assert [str(u.exc_value)[:80] for u in unraisable] == []
    assert [r.getMessage()[:80] for r in caplog.records if r.name == "asyncio"] == []
    checkpoints.close()


def test_bad_manifest_rows_are_errors_naming_file_and_line(tmp_path):
    cases = {
        "null.jsonl": ('{"audio": "a.wav", "text": "x"}\nnull\n', r"null\.jsonl:2: expected an object"),
        "number.jsonl": ("7\n", r"number\.jsonl:1: expected an object with 'audio' and 'text', got 7"),
        "path.jsonl": ('{"audio": 5, "text": "x"}\n', r"path\.jsonl:1: 'audio' must be a non-empty string, got 5"),
        "text.jsonl": ('{"audio": "a.wav", "text": null}\n', r"text\.jsonl:1: 'text' must be a non-empty string"),
        "ragged.csv": ("audio,text\na.wav,hi\nb.wav,hi,extra\n", r"ragged\.csv:3: 3 fields where the header has 2"),
        "short.csv": ("audio,text\na.wav\n", r"short\.csv:2: 1 fields where the header has 2"),
        "latin1.jsonl": (b'{"audio": "\xe9.wav", "text": "x"}\n', r"latin1\.jsonl: not UTF-8 text"),
        "empty.csv": ("", r"empty\.csv: the manifest is empty"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError, match=message):
            read_records(path, "train")


def test_audio_with_nan_samples_is_skipped_by_name(tmp_path, capsys):
    rows = write_rows(tmp_path, [0.2, 0.3], ["ab", "cd"])
    audio = soundfile.read(tmp_path / "a1.wav", dtype="float32")[0]
    audio[500] = np.nan
    soundfile.write(tmp_path / "a1.wav", audio, 16000, subtype="FLOAT")
    stats = DataStats()
    assert featurizer().load_example({"audio": str(tmp_path / "a1.wav"), "text": "cd"}, stats) is None
    assert featurizer().load_example({"audio": str(tmp_path / "a0.wav"), "text": rows[0]["text"]}, stats)
    assert stats.skipped == {str(tmp_path / "a1.wav"): "holds NaN or infinite samples (the first at 0.03 s)"}
    assert "a1.wav: holds NaN or infinite samples" not in capsys.readouterr().out  # warnings go to stderr


def next_within(iterator, seconds: float = 60.0):
    """next(iterator), or a test failure if it does not return in time (instead of hanging)."""
    import threading

    result = {}

    def pull():
        try:
            result["value"] = next(iterator)
        except Exception as error:
            result["error"] = error

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() did not return within {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_unusable_rows_are_counted_per_split_by_row(tmp_path):
    """Six rows naming one clip that is too long: an error, not an endless wait. And missing
    evaluation files do not make a training split with good rows look unusable."""
    long_clip = write_rows(tmp_path, [1.0], ["x"])[0]["audio"]  # 1 s > the 0.64 s this model takes
    (tmp_path / "same.jsonl").write_text(
        "".join(json.dumps({"audio": long_clip, "text": "x"}) + "\n" for _ in range(6))
    )
    batches = train_batches(read_records(tmp_path / "same.jsonl", "train"), featurizer(), 2, 0, DataStats())
    with pytest.raises(DataError, match="none of the 6 training rows can be used"):
        next_within(batches)

    stats = DataStats()
    missing = [{"audio": str(tmp_path / f"gone{i}.wav"), "text": "a"} for i in range(13)]
    with pytest.raises(DataError, match="the evaluation split has no usable rows"):
        eval_batches(missing, featurizer(), 4, stats)
    assert len(stats.skipped) == 13
    good = [
        {"audio": str(tmp_path / r["audio"]), "text": r["text"]}
        for r in write_rows(tmp_path, [0.2] * 11, "abcdefghijk")
    ]
    batch = next_within(train_batches(good, featurizer(), 2, 0, stats))
    assert batch["labels"].shape[0] == 2


@pytest.mark.parametrize(
    "setting, message",
    [
        ('decode_eval = "no"', r"decode_eval must be true or false, got 'no' \(str\)"),
        ("warmup_steps = true", r"warmup_steps must be an integer, got True \(bool\)"),
        ("steps = 6.5", r"steps must be an integer, got 6.5 \(float\)"),
        ("learning_rate = inf", "learning_rate must be a finite number, got inf"),
        ("final_lr_ratio = nan", "final_lr_ratio must be a finite number, got nan"),
        ("final_lr_ratio = 2.0", r"final_lr_ratio must be in \[0, 1\], got 2.0"),
        ("audio_buckets = [64, 8.7]", r"audio_buckets must be a list of integers, got \(64, 8.7\)"),
        ('export = ["onnx"]', "export takes formats from flax, torch, hf, got onnx"),
        ("[model]\nn_text_layer = 8.7", r"n_text_layer must be an integer, got 8.7"),
        ("[model]\nrotary_base = nan", "rotary_base must be a finite number, got nan"),
    ],
)
def test_settings_of_the_wrong_type_or_range_are_one_line_errors(tmp_path, capsys, setting, message):
    from train.__main__ import main

    (tmp_path / "run.toml").write_text(setting + "\n")
    assert main(["--config", str(tmp_path / "run.toml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "content, message",
    [
        ("null", "training settings must be a table of names to values, got NoneType"),
        ("7", "training settings must be a table of names to values, got int"),
        ("{nope", "not valid JSON"),
    ],
)
def test_settings_files_that_are_not_tables_are_one_line_errors(tmp_path, capsys, content, message):
    from train.__main__ import main

    (tmp_path / "run.json").write_text(content)
    assert main(["--config", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and str(tmp_path / "run.json") in err


def test_non_finite_flags_are_refused(capsys):
    from train.__main__ import main

    assert main(["--learning-rate", "inf", "--print-config"]) == 2
    assert "learning_rate must be a finite number, got inf" in capsys.readouterr().err
    assert main(["--final-lr-ratio", "nan", "--print-config"]) == 2
    assert "final_lr_ratio must be a finite number, got nan" in capsys.readouterr().err


def test_print_config_shows_the_resolved_model(capsys):
    from train.__main__ import main

    assert main(["--print-config", "--model", "n_text_layer=3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["n_text_layer"] == 3 and shown["model"]["n_audio_state"] == DEMO_MODEL["n_audio_state"]
    assert shown["run_dir"] == "runs/demo"
    assert main(["--print-config", "--size", "huge"]) == 2
    assert "unknown size 'huge'" in capsys.readouterr().err


def test_every_setting_has_a_meaning_in_help():
    from train.config import HELP

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    assert set(HELP) == fields and all(len(text) > 10 for text in HELP.values())
    from train.config import parser

    shown = " ".join(parser().format_help().split())
    for name in fields:
        assert " ".join(HELP[name].split())[:40] in shown, name
    assert "adamw or adafactor" in shown and "demo (the small demo model) or an OpenAI size" in shown


def multilingual_featurizer(language=None):
    config = ModelConfig.from_preset("whisper", **{**DEMO_MODEL, "n_vocab": 51865, "decoder_start_token_id": None})
    from whisper_io import tokenizer_for

    return Featurizer.create(config, tokenizer_for(config), language)


def test_a_multilingual_vocabulary_needs_a_language_per_row_or_run(tmp_path):
    """Without a language the prompt's placeholder would teach every utterance as <|en|>: an error;
    a manifest `language` column puts each row's own language token in its labels."""
    rows = write_rows(tmp_path, [0.2, 0.3, 0.25], ["bonjour", "hallo", "hello"])
    rows[0]["language"], rows[1]["language"] = "fr", "de"
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(tmp_path / "m.jsonl", "train")
    featurizer = multilingual_featurizer()
    with pytest.raises(DataError, match="row 3 has no language"):
        check_languages(records, featurizer, "m.jsonl")
    tokenizer = featurizer.tokenizer
    codes = dict(zip(tokenizer.language_codes, tokenizer.language_tokens, strict=True))
    labels = [featurizer.load_example(r, DataStats())["labels"] for r in records[:2]]
    assert [int(row[0]) for row in labels] == [codes["fr"], codes["de"]]  # the row's language, after SOT
    english = multilingual_featurizer("en")  # a run language covers rows without one
    check_languages(records, english, "m.jsonl")
    assert int(english.load_example(records[2], DataStats())["labels"][0]) == codes["en"]
    assert int(english.load_example(records[0], DataStats())["labels"][0]) == codes["fr"]  # the row's own wins
    records[1]["language"] = "xx"
    with pytest.raises(TokenizerError, match="xx"):
        check_languages(records, english, "m.jsonl")


def test_processes_read_disjoint_blocks_of_the_same_global_batches(tmp_path):
    """With P processes each reads its block of every global batch: together they read each row
    once per epoch, and the global batches are those of one process (the same rows, in order)."""
    texts = [f"row {i}" for i in range(12)]
    rows = write_rows(tmp_path, [0.1 + 0.02 * i for i in range(12)], texts)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(tmp_path / "m.jsonl", "train")
    features = featurizer()

    def texts_of(batch):
        return [bytes(int(t) for t in row if 0 <= t < 256).decode() for row in batch["labels"]]

    one = train_batches(records, features, 4, seed=3, stats=DataStats())
    parts = [train_batches(records, features, 4, seed=3, stats=DataStats(), process=p, processes=2) for p in (0, 1)]
    epoch_rows = []
    for step in range(6):  # two epochs of 3 global batches
        whole = texts_of(next(one))
        halves = [texts_of(next(part)) for part in parts]
        assert halves[0] + halves[1] == whole  # process p holds rows [2p, 2p + 2) of the global batch
        epoch_rows += whole
        if step % 3 == 2:
            assert sorted(epoch_rows) == sorted(texts)  # every row once per epoch
            epoch_rows = []
    with pytest.raises(DataError, match="batch_size 5 does not split over 2 processes"):
        train_batches(records, features, 5, seed=3, stats=DataStats(), process=0, processes=2)
    evals = [eval_batches(records, features, 8, DataStats(), p, 2) for p in (0, 1)]
    assert [len(b["audio"]) for b in evals[0]] == [4, 4] and evals[0][0]["texts"] == evals[1][0]["texts"]
    assert texts_of(evals[0][0]) + texts_of(evals[1][0]) == evals[0][0]["texts"]


def test_segments_are_taught_with_timestamps(tmp_path, capsys):
    """A manifest row with `segments` gets Whisper's timestamp labels, as `openai-whisper`'s
    tokenizer reads them back: `<|start|> text <|end|>` per segment, a last segment without an
    end as its start alone, and no <|notimestamps|>; a row without keeps it. A timestamp past
    the model's window skips the row, bad segments are errors naming the line, and a vocabulary
    without timestamp tokens says so."""
    import whisper.tokenizer

    from whisper_io import tokenizer_for

    config = ModelConfig.from_preset("whisper", **{**DEMO_MODEL, "n_vocab": 51864, "decoder_start_token_id": 50257})
    featurizer = Featurizer.create(config, tokenizer_for(config))  # a 2.56 s window
    rows = write_rows(tmp_path, [2.0, 2.0, 1.0, 1.0], ["one two", "three", "four", "five"])
    rows[0]["segments"] = [{"start": 0.1, "end": 0.8, "text": " one"}, {"start": 1.0, "end": 1.52, "text": " two"}]
    rows[1]["segments"] = [{"start": 0.2, "end": 0.9, "text": " three"}, {"start": 1.7, "end": None, "text": ""}]
    rows[3]["segments"] = [{"start": 0.2, "end": 2.6, "text": " five"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(tmp_path / "m.jsonl", "train")
    stats = DataStats()
    labels = [featurizer.load_example(r, stats) for r in records]
    oracle = whisper.tokenizer.get_tokenizer(multilingual=False)
    texts = [oracle.decode_with_timestamps(example["labels"].tolist()) for example in labels[:3]]
    assert texts == [
        "<|0.10|> one<|0.80|><|1.00|> two<|1.52|><|endoftext|>",
        "<|0.20|> three<|0.90|><|1.70|><|endoftext|>",
        "<|notimestamps|>four<|endoftext|>",
    ]
    assert labels[3] is None and "2.60 s is beyond the model's window" in capsys.readouterr().err
    bad = [
        [{"start": 0.5, "end": 0.2, "text": " x"}],  # ends before it starts
        [{"start": 0.5, "end": None, "text": " x"}, {"start": 1.0, "end": 1.2, "text": " y"}],  # no end, not last
        [{"start": 0.5, "end": 0.9, "text": " x"}, {"start": 0.7, "end": 1.2, "text": " y"}],  # out of order
        [{"start": "0.5", "end": 0.9, "text": " x"}],
        [{"start": float("nan"), "end": 0.9, "text": " x"}],
        [{"start": -0.1, "end": 0.9, "text": " x"}],
        [],
    ]
    for segments in bad:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"audio": "a0.wav", "text": "x", "segments": segments}) + "\n")
        with pytest.raises(DataError, match=r"bad\.jsonl:1: (segment|'segments')"):
            read_records(tmp_path / "bad.jsonl", "train")
    featurizer_bytes = Featurizer.create(CONFIG, ByteTokenizer(CONFIG.n_vocab))
    with pytest.raises(DataError, match=r"m\.jsonl: row 1 has segments, but the bytes vocabulary has no timestamp"):
        check_languages(records, featurizer_bytes, "m.jsonl")  # before training starts
    with pytest.raises(DataError, match="the bytes vocabulary has no timestamp tokens"):
        featurizer_bytes.labels("x", segments=[(0.1, 0.2, " x")])
