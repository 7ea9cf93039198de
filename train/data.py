"""Training data: manifests or Hugging Face datasets -> a `grain` pipeline of bucketed batches.

A *record* is `{"audio": source, "text": str}` where the source is a file path, encoded bytes,
or `{"array", "sampling_rate"}`; with `"segments"` (a manifest column: a list of `{"start",
"end", "text"}` in seconds, as `openai-whisper`'s JSON has them) it is taught with timestamps,
as Whisper is: `<|start|> text <|end|>` per segment, and a last segment whose `end` is null
(speech that runs past the end of the audio) as its start alone, which tells the long-form loop
to seek there. Records come from a JSONL/CSV manifest (audio paths relative to
the manifest) or a `datasets` dataset saved with `save_to_disk`. The pipeline reads and
tokenises each record (`load_example`), skipping (and counting, by name) the ones whose audio
cannot be used, in several threads with prefetch, then `collate` pads a batch's audio to the
smallest bucket that holds its longest utterance and the labels (with -100) to the smallest
text bucket. The log-mel is not computed here: the jitted step computes it on the device from
the padded audio (`train.step.batch_mel`), so the loader only reads, resamples and pads. The
step compiles once per (audio bucket, text bucket) pair.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_whisper.model import IGNORE_INDEX
from whisper_config import ModelConfig
from whisper_io import AudioFileError, Tokenizer, load_audio
from whisper_io.audio_files import HOP_LENGTH, SAMPLE_RATE, check_finite_samples, resample

TIMESTAMP_STEP = 2 * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp token: one encoder position (0.02)


class DataError(ValueError):
    """A dataset cannot be read at all (missing manifest, missing column, no usable rows)."""


# ----------------------------------------------------------------------------- records


def read_manifest(
    path: str | Path, audio_column: str = "audio", text_column: str = "text", language_column: str = "language"
) -> list[dict]:
    """Records of a `.jsonl` (one object per line) or `.csv` (with a header) manifest; a row's
    `language_column`, when present and not empty, is its language code.

    Every row is checked here, so a bad one is an error naming the file and the line rather
    than a failure deep inside the pipeline.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    rows: list[tuple[int, Any]] = []  # (line number, row)
    if path.suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the manifest is empty")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(fields)} fields where the header has {len(header)} ({header})"
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
    records = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{number}: expected an object with {audio_column!r} and {text_column!r}, got {row!r}"
            )
        missing = [c for c in (audio_column, text_column) if c not in row]
        if missing:
            raise DataError(f"{path}:{number}: the row has no {' or '.join(missing)} column (found {sorted(row)})")
        for column in (audio_column, text_column):
            if not isinstance(row[column], str) or (column == audio_column and not row[column].strip()):
                raise DataError(f"{path}:{number}: {column!r} must be a non-empty string, got {row[column]!r}")
        audio = Path(row[audio_column])
        record = {"audio": str(audio if audio.is_absolute() else path.parent / audio), "text": row[text_column]}
        if "segments" in row:
            record["segments"] = _segments(row["segments"], f"{path}:{number}")
        language = row.get(language_column)
        if language not in (None, ""):
            if not isinstance(language, str):
                raise DataError(f"{path}:{number}: {language_column!r} must be a language code, got {language!r}")
            record["language"] = language
        records.append(record)
    if not records:
        raise DataError(f"{path}: the manifest is empty")
    return records


def _segments(value: Any, where: str) -> list[tuple[float, float | None, str]]:
    """A manifest row's `segments` -> [(start, end or None, text)], checked: times are seconds,
    ascending and not negative; only the last segment may have no end (its text is not taught)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'segments' must be a non-empty list of {{start, end, text}}, got {value!r}")
    segments, previous = [], 0.0
    for i, segment in enumerate(value):
        start = segment.get("start") if isinstance(segment, dict) else None
        end = segment.get("end") if isinstance(segment, dict) else None
        text = segment.get("text", "") if isinstance(segment, dict) else None
        last = i == len(value) - 1
        numbers = all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            for t in (start, end)
            if t is not None
        )
        if (
            not numbers
            or start is None
            or not isinstance(text, str)
            or (end is None and not last)
            or start < previous
            or (end is not None and end < start)
        ):
            raise DataError(
                f"{where}: segment {i + 1} must be {{start, end, text}} in seconds, in order, with an end "
                f"(null only for the last), got {segment!r}"
            )
        segments.append((float(start), None if end is None else float(end), text))
        previous = start if end is None else end
    return segments


class HFRecords(Sequence):
    """Random access over a `datasets.Dataset` saved on disk, as records (audio stays encoded)."""

    def __init__(
        self,
        path: str | Path,
        split: str,
        audio_column: str = "audio",
        text_column: str = "text",
        language_column: str = "language",
    ):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        for column in (audio_column, text_column):
            if column not in loaded.column_names:
                raise DataError(f"{path}: no column {column!r} (has {', '.join(loaded.column_names)})")
        if isinstance(loaded.features[audio_column], datasets.Audio):
            # Decode with soundfile ourselves: datasets' own decoder would need torchcodec.
            loaded = loaded.cast_column(audio_column, datasets.Audio(decode=False))
        self.dataset, self.path = loaded, str(path)
        self.audio_column, self.text_column = audio_column, text_column
        self.language_column = language_column if language_column in loaded.column_names else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        audio = row[self.audio_column]
        if isinstance(audio, dict) and audio.get("bytes") is None and audio.get("path"):
            audio = audio["path"]
        elif isinstance(audio, dict) and audio.get("bytes") is not None:
            audio = {"bytes": audio["bytes"], "name": audio.get("path") or f"{self.path}[{index}]"}
        record = {"audio": audio, "text": row[self.text_column]}
        if self.language_column and row[self.language_column]:
            record["language"] = row[self.language_column]
        return record


def read_records(
    path: str | Path,
    split: str,
    audio_column: str = "audio",
    text_column: str = "text",
    language_column: str = "language",
) -> Sequence[dict]:
    """A manifest file, or a Hugging Face dataset directory (from `save_to_disk`)."""
    if Path(path).is_dir():
        return HFRecords(path, split, audio_column, text_column, language_column)
    return read_manifest(path, audio_column, text_column, language_column)


def check_languages(records: Sequence[dict], featurizer: Featurizer, what: str) -> None:
    """With a multilingual vocabulary and no run language, every row needs its own language:
    checked before training starts (manifests; a dataset without the column fails at once too)."""
    if featurizer.language is None and featurizer.tokenizer.multilingual:
        if isinstance(records, HFRecords):
            missing = None if records.language_column else 1
        else:
            missing = next((i for i, r in enumerate(records, 1) if not r.get("language")), None)
        if missing is not None:
            raise DataError(
                f"{what}: the vocabulary is multilingual, no `language` is set for the run and row {missing} has "
                "no language: set `language`, or give every row a language (`language_column`, default 'language')"
            )
    for code in sorted({r["language"] for r in records if r.get("language")} if isinstance(records, list) else ()):
        featurizer.prompt(code)  # an unknown code (or one the vocabulary lacks) fails here, naming it
    timed = isinstance(records, list) and next((i for i, r in enumerate(records, 1) if "segments" in r), None)
    if timed and featurizer.tokenizer.timestamp_begin is None:
        raise DataError(
            f"{what}: row {timed} has segments, but the {featurizer.tokenizer.name} vocabulary has no timestamp tokens"
        )


def decode_audio(source: Any) -> np.ndarray:
    """A record's audio -> (N,) float32 mono 16 kHz; `AudioFileError` naming the source if unusable."""
    import soundfile

    if isinstance(source, str | Path):
        return load_audio(source)
    if isinstance(source, dict) and "bytes" in source:
        name = source.get("name", "<bytes>")
        try:
            audio, rate = soundfile.read(io.BytesIO(source["bytes"]), dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioFileError(name, f"unreadable audio bytes ({e})") from None
        audio = audio.mean(axis=1)
    elif isinstance(source, dict) and "array" in source:
        name, rate = "<array>", int(source.get("sampling_rate", SAMPLE_RATE))
        audio = np.asarray(source["array"], np.float32)
        audio = audio.mean(axis=-1) if audio.ndim == 2 else audio
    else:
        raise AudioFileError(str(source)[:80], "not an audio path, bytes or array")
    if rate <= 0:
        raise AudioFileError(name, f"invalid sample rate {rate} Hz")
    if audio.size == 0:
        raise AudioFileError(name, "contains no audio samples")
    check_finite_samples(name, audio, rate)
    return resample(audio.astype(np.float32), rate)


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass
class DataStats:
    """What the pipeline left out or cut, for the log. Thread-safe; files are counted once."""

    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # source -> reason
    truncated: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def skip(self, source: str, reason: str) -> None:
        with self.lock:
            first = source not in self.skipped
            self.skipped[source] = reason
        if first:
            sys.stderr.write(f"warning: skipping {source}: {reason}\n")  # one write: loader threads interleave

    def truncate(self, limit: int) -> None:
        with self.lock:
            self.truncated += 1
            first = self.truncated == 1
        if first:
            sys.stderr.write(
                f"warning: a transcript is longer than n_text_ctx={limit} tokens and was cut; "
                "such cuts are counted as truncated_transcripts in the log\n"
            )

    def summary(self) -> dict[str, int]:
        return {"skipped_files": len(self.skipped), "truncated_transcripts": self.truncated}


@dataclasses.dataclass(frozen=True)
class Featurizer:
    """Turns records into examples and batches of examples into model inputs for one model."""

    config: ModelConfig
    tokenizer: Tokenizer
    language: str | None  # the run's language, for rows without a language of their own
    task: str
    audio_buckets: tuple[int, ...]  # mel frames, ascending, the last one <= 2 * n_audio_ctx
    text_buckets: tuple[int, ...]  # label lengths, ascending, the last one == n_text_ctx

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        tokenizer: Tokenizer,
        language: str | None = None,
        task: str = "transcribe",
        audio_buckets=(),
        text_buckets=(),
    ):
        most_frames = 2 * config.n_audio_ctx
        audio = tuple(sorted({min(int(b), most_frames) for b in audio_buckets} | {most_frames}))
        text = tuple(sorted({min(int(b), config.n_text_ctx) for b in text_buckets} | {config.n_text_ctx}))
        if min(audio) < 1 or min(text) < 1:
            raise DataError("bucket lengths must be positive")
        tokenizer.sot_sequence(language, task)  # an unknown language or task fails here, not in the loader
        return cls(config, tokenizer, language, task, audio, text)

    def prompt(self, language: str | None = None) -> tuple[int, ...]:
        """The forced start sequence before a transcript in `language` (default: the run's).

        A multilingual vocabulary needs a language: without one the prompt would hold a
        placeholder, and every utterance would be taught as that language."""
        language = language or self.language
        if language is None and self.tokenizer.multilingual:
            raise DataError(
                "the vocabulary is multilingual and this row has no language: set `language` for the run, "
                "or give the data a language column (`language_column`)"
            )
        return self.tokenizer.sot_sequence(language, self.task)

    def load_example(self, record: dict, stats: DataStats) -> dict | None:
        """record -> {"audio": (N,) float32, "labels": (L,) int32}, or None (counted in `stats`)."""
        source = record["audio"]
        name = str(source) if isinstance(source, str | Path) else str(source.get("name", "<audio>"))
        try:
            audio = decode_audio(source)
        except AudioFileError as e:
            stats.skip(e.path, e.reason)
            return None
        most = self.audio_buckets[-1] * HOP_LENGTH
        if len(audio) > most:
            stats.skip(str(name), f"{len(audio) / SAMPLE_RATE:.2f} s is longer than the model's {most / SAMPLE_RATE} s")
            return None
        segments = record.get("segments")
        if segments is not None:
            late = max(t for start, end, _ in segments for t in (start, end) if t is not None)
            if late > most / SAMPLE_RATE:
                stats.skip(str(name), f"a timestamp at {late:.2f} s is beyond the model's window")
                return None
        labels = self.labels(record["text"], stats, record.get("language"), segments)
        return {"audio": audio, "labels": labels}

    def labels(
        self, text: str, stats: DataStats | None = None, language: str | None = None, segments=None
    ) -> np.ndarray:
        """The decoder's targets: the prompt (in the row's `language`, else the run's) after its
        start token, the text, end of text. With `segments` [(start, end or None, text)], the
        prompt without <|notimestamps|> and the segments with their timestamps instead of the
        text (see the module's docstring). Cut to n_text_ctx (counted) when longer."""
        prompt = self.prompt(language)
        if segments is None:
            body = self.tokenizer.encode(text)
        else:
            body = []
            begin = self.tokenizer.timestamp_begin
            if begin is None:
                raise DataError(f"the {self.tokenizer.name} vocabulary has no timestamp tokens for 'segments'")
            prompt = prompt[:-1] if prompt[-1] == self.tokenizer.no_timestamps else prompt
            for start, end, words in segments:
                body.append(begin + round(start / TIMESTAMP_STEP))
                if end is not None:
                    body += [*self.tokenizer.encode(words), begin + round(end / TIMESTAMP_STEP)]
        ids = [*prompt[1:], *body, self.tokenizer.eot]
        if len(ids) > self.config.n_text_ctx:
            ids = ids[: self.config.n_text_ctx]
            if stats is not None:
                stats.truncate(self.config.n_text_ctx)
        return np.asarray(ids, np.int32)

    def collate(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        """Examples -> {"audio": (B, frames * 160), "labels": (B, T)} padded to the smallest buckets."""
        longest = max(len(e["audio"]) for e in examples)
        frames = next(b for b in self.audio_buckets if b * HOP_LENGTH >= longest)
        audio = np.zeros((len(examples), frames * HOP_LENGTH), np.float32)
        for row, example in zip(audio, examples, strict=True):
            row[: len(example["audio"])] = example["audio"]
        text = next(b for b in self.text_buckets if b >= max(len(e["labels"]) for e in examples))
        labels = np.full((len(examples), text), IGNORE_INDEX, np.int32)
        for row, example in zip(labels, examples, strict=True):
            row[: len(example["labels"])] = example["labels"]
        return {"audio": audio, "labels": labels}


# ----------------------------------------------------------------------------- pipelines


def check_labels(labels: np.ndarray, n_vocab: int) -> None:
    """Labels (B, T) must be token ids in [0, n_vocab) or the ignore index; checked on the host at
    the batch boundary, since under `jit` an out-of-range id gives NaN or a wrong loss silently."""
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_vocab))
    if bad.any():
        value = int(labels[bad][0])
        raise DataError(
            f"a batch holds label {value}: labels must be token ids in [0, {n_vocab}) or {IGNORE_INDEX} (ignored); "
            "does the tokenizer fit the model's vocabulary?"
        )


class _Indexed(Sequence):
    """`records` as (index, record) pairs, so the pipeline knows which rows failed."""

    def __init__(self, records: Sequence[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return int(index), self.records[int(index)]


class _ProcessBlock(Sequence):
    """Process `process`'s rows of each global batch: the global order is cut into batches of
    `batch_size`, and process p of P reads the p-th contiguous block of `batch_size // P` rows of
    each (the rows its devices hold in the global array). Every process computes the same global
    order, so together they read each row once per epoch, and the global batches are the same
    whatever the number of processes."""

    def __init__(self, order, batch_size: int, process: int, processes: int):
        self.order, self.batch_size = order, batch_size
        self.local, self.process = batch_size // processes, process
        self.length = (len(order) // batch_size) * self.local

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        step, row = divmod(int(index), self.local)
        return self.order[step * self.batch_size + self.process * self.local + row]


def train_batches(
    records: Sequence[dict],
    featurizer: Featurizer,
    batch_size: int,
    seed: int,
    stats: DataStats,
    process: int = 0,
    processes: int = 1,
):
    """An endless, checkpointable grain iterator of this process's part of the training batches
    (`batch_size // processes` rows of each global batch of `batch_size`), reshuffled every epoch.

    `iterator.get_state()` / `set_state()` save and restore its position exactly. Unusable rows
    are skipped (reported through `stats`); once every row of `records` has failed, the next
    batch raises `DataError` instead of spinning forever.
    """
    import grain

    if batch_size % processes:
        raise DataError(f"batch_size {batch_size} does not split over {processes} processes")
    failed: set[int] = set()
    lock = threading.Lock()

    def load(item: tuple[int, dict]) -> dict | None:
        index, record = item
        example = featurizer.load_example(record, stats)
        if example is None:
            with lock:
                failed.add(index)
                hopeless = len(failed) == len(records)
            if hopeless:
                raise DataError(f"none of the {len(records)} training rows can be used (see the warnings above)")
        return example

    order = grain.MapDataset.source(_Indexed(records)).seed(seed).shuffle().repeat()  # the same in every process
    dataset = (
        grain.MapDataset.source(_ProcessBlock(order, batch_size, process, processes))
        .map(load)  # None (skipped) rows are dropped
        .to_iter_dataset()
        .batch(batch_size // processes, drop_remainder=True, batch_fn=featurizer.collate)
    )
    return iter(dataset)


def eval_batches(
    records: Sequence[dict],
    featurizer: Featurizer,
    batch_size: int,
    stats: DataStats,
    process: int = 0,
    processes: int = 1,
) -> list[dict]:
    """The whole eval split as global batches of exactly `batch_size` (the last one padded with
    rows whose labels are all ignored and whose `keep` is False). Each batch holds this process's
    block of `batch_size // processes` rows (the rows its devices hold) and the transcripts of the
    whole global batch, which greedy decoding's gathered tokens are compared with."""
    if batch_size % processes:
        raise DataError(f"eval_batch_size {batch_size} does not split over {processes} processes")
    examples, texts = [], []
    for record in records:
        example = featurizer.load_example(record, stats)
        if example is not None:
            examples.append(example)
            texts.append(record["text"])
    if not examples:
        raise DataError("the evaluation split has no usable rows")
    batches, local = [], batch_size // processes
    mine = slice(process * local, (process + 1) * local)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        keep = np.arange(batch_size) < len(chunk)
        filler = {"audio": np.zeros(HOP_LENGTH, np.float32), "labels": np.zeros(0, np.int32)}
        batch = featurizer.collate(chunk + [filler] * (batch_size - len(chunk)))  # padded as one global batch
        batch = {key: value[mine] for key, value in batch.items()}
        batches.append({**batch, "keep": keep[mine], "texts": texts[start : start + batch_size]})
    return batches
