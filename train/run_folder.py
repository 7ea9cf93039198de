"""The run folder: one directory per training run holding everything the run writes.

    RUN/run.json        the run's settings and model, written when it starts
    RUN/checkpoints/    orbax checkpoints (see `checkpointing.py`)
    RUN/logs/           metrics.jsonl and tensorboard/
    RUN/model/          the flax export (RUN/model-torch/ for torch, RUN/model-hf/ for hf), written at the end

A new run refuses a folder that already holds a run (`--resume` continues it) or that holds
anything else; a run folder never sits inside another. Resuming compares the stored settings with
the new ones and names every difference that would change the model or its training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from train.config import EXPORTS, TrainConfig
from whisper_config import ModelConfig
from whisper_config.config import EXECUTION_ONLY
from whisper_io.outputs import OutputError, check_not_working_directory

RUN_FILE = "run.json"

# Settings that decide the model, the data order and the optimisation trajectory: a resumed run
# must keep them (the others -- evaluation, logging, saving, stopping, exports, the mesh -- may change).
TRAJECTORY = (
    "train_data",
    "train_split",
    "audio_column",
    "text_column",
    "language",
    "language_column",
    "task",
    "audio_buckets",
    "text_buckets",
    "optimizer",
    "learning_rate",
    "warmup_steps",
    "steps",
    "final_lr_ratio",
    "weight_decay",
    "b1",
    "b2",
    "eps",
    "clip_norm",
    "batch_size",
    "accumulation_steps",
    "precision",
    "time_masks",
    "time_mask_width",
    "freq_masks",
    "freq_mask_width",
    "seed",
)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message names it and says what to do."""


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, as they come back from JSON."""
    return json.loads(json.dumps(values))


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def export_path(self, fmt: str) -> Path:
        return self.path / EXPORTS[fmt]

    def record(self) -> dict | None:
        """The stored run.json, or None when the folder holds no run."""
        file = self.path / RUN_FILE
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunFolderError(f"{file}: unreadable run record ({err})") from None
        if not isinstance(record, dict) or not {"train", "model"} <= record.keys():
            raise RunFolderError(f"{file}: not a run record (expected 'train' and 'model')")
        return record

    def check(self, config: TrainConfig, model: ModelConfig) -> bool:
        """Check that this run may use the folder; True when it continues a stored run."""
        try:
            check_not_working_directory(self.path, "run folder")
        except OutputError as err:
            raise RunFolderError(str(err)) from None
        for parent in self.path.resolve().parents:
            if (parent / RUN_FILE).is_file():
                raise RunFolderError(f"{self.path}: is inside the run folder {parent}; give the run its own folder")
        record = self.record()
        if record is None:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise RunFolderError(
                    f"{self.path}: exists and is not a run folder (no {RUN_FILE}); refusing to write into it: "
                    "choose another --run-dir or --name"
                )
            return False
        if not config.resume:
            raise RunFolderError(
                f"{self.path}: holds a run already: pass --resume to continue it, or choose another --name or --run-dir"
            )
        differences = self.differences(record, config, model)
        if differences:
            raise RunFolderError(
                f"{self.path}: --resume with settings that differ from the stored run's: {'; '.join(differences)}. "
                f"Resume with the run's settings, or start a new run from its weights (--init-from {self.path}/model)"
            )
        return True

    @staticmethod
    def differences(record: dict, config: TrainConfig, model: ModelConfig) -> list[str]:
        """`name: stored -> new` for every trajectory setting and model field that changed."""
        stored_train, new_train = record["train"], _jsonable(config.to_dict())
        changed = [
            f"{name}: {stored_train.get(name)!r} -> {new_train[name]!r}"
            for name in TRAJECTORY
            if stored_train.get(name) != new_train[name]
        ]
        stored_model, new_model = record["model"], _jsonable(model.to_dict())
        changed += [
            f"model.{name}: {stored_model.get(name)!r} -> {new_model[name]!r}"
            for name in new_model
            if name not in EXECUTION_ONLY and stored_model.get(name) != new_model[name]
        ]
        return changed

    def start(self, config: TrainConfig, model: ModelConfig) -> None:
        """Create the folder and write run.json (the main process, once, for a new run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"train": config.to_dict(), "model": model.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        partial = self.path / f".{RUN_FILE}.partial"
        partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        partial.replace(self.path / RUN_FILE)
