"""`TrainConfig`: every setting of a training run, from defaults, a TOML/JSON file, and flags.

The defaults are the demo: a small byte-level model on the spoken-digits-and-commands dataset in
`data/demo/`, sized to learn it on a 2-core CPU in about ten minutes. Precedence: defaults <
`--config FILE` < flags. The model is a preset (+ optional OpenAI size) with `model` overrides
of any `ModelConfig` field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from whisper_config import PRESETS, SIZES, ConfigError, ModelConfig
from whisper_config.config import EXECUTION_ONLY, TRAINING_ONLY, read_text
from whisper_config.fields import check_field_types
from whisper_io import huge_pages

# The demo model: byte-level vocabulary (256 bytes + end of text + start of transcript), 2.56 s of
# audio (the longest demo utterance is 2.2 s), transcripts up to 31 bytes.
DEMO_MODEL = dict(
    n_mels=80,
    n_audio_ctx=128,
    n_audio_state=128,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=258,
    n_text_ctx=32,
    n_text_state=128,
    n_text_head=4,
    n_text_layer=2,
    decoder_start_token_id=257,
    dropout=0.1,  # 300 utterances overfit without it
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Model: a preset, a size ("demo", or an OpenAI size: tiny ... large-v3), then field overrides.
    preset: str = "whisper"
    size: str = "demo"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str | None = None  # start from a checkpoint (any format `convert` reads) instead

    # Data: JSONL/CSV manifests (audio path, relative to the manifest, + transcript) or a
    # Hugging Face dataset saved with `save_to_disk` (a directory; `split` picks from a DatasetDict).
    train_data: str = "data/demo/train.jsonl"
    eval_data: str | None = "data/demo/eval.jsonl"
    train_split: str = "train"
    eval_split: str = "test"
    audio_column: str = "audio"
    text_column: str = "text"
    language: str | None = None  # Whisper vocabularies: the language token of the prompt
    language_column: str = "language"  # a row's own language code, when the data has this column
    task: str = "transcribe"
    audio_buckets: tuple[int, ...] = (128, 256)  # mel frame lengths batches are padded to
    # Label lengths batches are padded to (n_text_ctx is always added; longer ones are clamped):
    # a batch of short transcripts is not padded to 448 tokens.
    text_buckets: tuple[int, ...] = (16, 32, 64, 128, 256)

    # Optimisation.
    optimizer: str = "adamw"  # or "adafactor"
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    steps: int = 1200
    final_lr_ratio: float = 0.05  # cosine decays to learning_rate * final_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    batch_size: int = 32  # examples per optimizer step (all accumulation micro-batches)
    accumulation_steps: int = 1
    precision: str = "float32"  # or "bfloat16": bf16 compute, float32 parameters and optimizer
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    # SpecAugment (Park et al. 2019) on training batches: masks of up to `*_width` frames / mel
    # bins set to the utterance's mean. Off by default: on the demo's 1-2 s clips a time mask can
    # hide a whole digit, and the run learned slower (CER 19% vs 11% after 750 steps).
    time_masks: int = 0
    time_mask_width: int = 20
    freq_masks: int = 0
    freq_mask_width: int = 12
    seed: int = 0

    # Sharding: a (data, fsdp, tensor) mesh over all devices; data = -1 takes what the others
    # leave. Which axes split what: the rules table of train/sharding.py.
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1

    # The run folder (default runs/NAME) holds everything a run writes: run.json (its settings),
    # checkpoints/, logs/ (metrics.jsonl, tensorboard/) and the exports (model/, model-torch/).
    name: str = "demo"
    run_dir: str | None = None
    log_every: int = 25
    eval_every: int = 250
    eval_batch_size: int = 40
    decode_eval: bool = True  # greedy-decode the eval split for CER/WER
    save_every: int = 250
    keep_checkpoints: int = 2  # the latest N, plus the best by eval loss
    resume: bool = False
    stop_at_step: int | None = None  # save and stop here (resume later); the schedule still spans `steps`
    export: tuple[str, ...] = ("flax",)  # formats written at the end: flax -> RUN/model, torch -> RUN/model-torch
    export_best: bool = True  # export the kept checkpoint of lowest eval loss (else the last step)
    progress: bool = True
    # A jax.profiler trace of `profile_steps` steps from `profile_from` (process 0), for TensorBoard.
    profile_from: int | None = None
    profile_steps: int = 3

    def __post_init__(self):
        check_field_types(self, ConfigError)
        fraction = "must be in [0, 1)"
        checks = [
            (self.optimizer in ("adamw", "adafactor"), f"optimizer must be adamw or adafactor, got {self.optimizer!r}"),
            (self.precision in ("float32", "bfloat16"), f"precision must be float32 or bfloat16: {self.precision!r}"),
            (
                self.size in ("demo", *SIZES),
                f"unknown size {self.size!r}; known sizes: demo, {', '.join(SIZES)}",
            ),
            (self.preset in PRESETS, f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0 (runs shorter than it warm up throughout)"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (0 <= self.final_lr_ratio <= 1, f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.b1 < 1, f"b1 {fraction}, got {self.b1}"),
            (0 <= self.b2 < 1, f"b2 {fraction}, got {self.b2}"),
            (self.eps > 0, f"eps must be positive, got {self.eps}"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.accumulation_steps >= 1, "accumulation_steps must be at least 1"),
            (self.batch_size % self.accumulation_steps == 0, "batch_size must be a multiple of accumulation_steps"),
            (self.clip_norm is None or self.clip_norm > 0, "clip_norm must be positive (or unset)"),
            (self.max_bad_steps >= 1, "max_bad_steps must be at least 1"),
            (min(self.log_every, self.eval_every, self.save_every) >= 1, "log/eval/save intervals must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.stop_at_step is None or self.stop_at_step >= 1, "stop_at_step must be at least 1 (or unset)"),
            (self.profile_from is None or self.profile_from >= 1, "profile_from must be at least 1 (or unset)"),
            (self.profile_steps >= 1, "profile_steps must be at least 1"),
            (
                min(self.time_masks, self.time_mask_width, self.freq_masks, self.freq_mask_width) >= 0,
                "SpecAugment settings must be >= 0",
            ),
            (
                min(self.mesh_fsdp, self.mesh_tensor) >= 1 and (self.mesh_data == -1 or self.mesh_data >= 1),
                "mesh sizes must be >= 1",
            ),
            (all(b >= 1 for b in self.audio_buckets + self.text_buckets), "bucket lengths must be positive"),
            (
                bool(self.name.strip()) and "/" not in self.name,
                f"name must be a non-empty folder name, got {self.name!r}",
            ),
            (self.run_dir is None or bool(self.run_dir.strip()), "run_dir must not be empty (or unset for runs/NAME)"),
            (
                set(self.export) <= set(EXPORTS),
                f"export takes formats from {', '.join(EXPORTS)}, got {', '.join(self.export)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def run_path(self) -> Path:
        """The run folder: `run_dir`, else runs/`name`."""
        return Path(self.run_dir) if self.run_dir is not None else Path("runs") / self.name

    def model_config(self, checkpoint: ModelConfig | None = None) -> ModelConfig:
        """The model this run trains: the preset's, or with `init_from` the `checkpoint`'s, where
        `model` may set only how it runs and trains (`EXECUTION_ONLY` and `TRAINING_ONLY`: the
        layer layouts, gradient checkpointing, the attention implementation, dropout); a setting
        of what it computes that differs from the checkpoint's is an error, never ignored."""
        if checkpoint is not None:
            requested = ModelConfig.from_dict({**checkpoint.to_dict(), **self.model})  # names and values checked
            adjustable = EXECUTION_ONLY + TRAINING_ONLY
            fixed = [
                k for k in sorted(self.model) if k not in adjustable and getattr(requested, k) != getattr(checkpoint, k)
            ]
            if fixed:
                shown = ", ".join(
                    f"{k}={self.model[k]!r} (the checkpoint's: {getattr(checkpoint, k)!r})" for k in fixed
                )
                raise ConfigError(
                    f"init_from's checkpoint decides the model; `model` differs from it in {shown}. With init_from, "
                    f"`model` may set only {', '.join(adjustable)}"
                )
            return requested
        if self.size == "demo":
            return ModelConfig.from_preset(self.preset, **{**DEMO_MODEL, **self.model})
        return ModelConfig.from_preset(self.preset, self.size, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"training settings must be a table of names to values, got {type(values).__name__}")
        for old, hint in RENAMED.items():
            if old in values:
                raise ConfigError(f"the setting {old!r} is gone: {hint}")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        values = dict(values)
        for name in ("audio_buckets", "text_buckets", "export"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])  # TOML and JSON lists; the items are type-checked
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A `.toml` or `.json` file of settings (a `[model]` table holds ModelConfig overrides)."""
        path = Path(path)
        text = read_text(path)
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


EXPORTS = {"flax": "model", "torch": "model-torch", "hf": "model-hf"}  # format -> folder in the run folder

# What each setting means and which values it takes: `python -m train --help` shows these.
HELP = {
    "preset": "position scheme and mechanisms of the model: whisper, all_rotary, rotary_sinusoidal, "
    "rotary_rotary_sinusoidal, rotary_learned_sinusoidal or integrated",
    "size": "model dimensions: demo (the small demo model) or an OpenAI size: tiny, tiny.en, base, base.en, small, "
    "small.en, medium, medium.en, large-v2, large-v3",
    "init_from": "start from this checkpoint (flax/torch/Hugging Face directory or OpenAI .pt) instead of "
    "preset/size; --model may then set only how it runs and trains (layer layouts, gradient checkpointing, "
    "attention implementation, dropout)",
    "train_data": "training data: a JSONL/CSV manifest (audio path relative to it, transcript) or a Hugging Face "
    "dataset directory from save_to_disk",
    "eval_data": "evaluation data, the same kinds ('none' for no evaluation)",
    "train_split": "split of a Hugging Face DatasetDict to train on",
    "eval_split": "split of a Hugging Face DatasetDict to evaluate on",
    "audio_column": "column holding the audio (a path, or a datasets Audio column)",
    "text_column": "column holding the transcript",
    "language": "language code for the prompt of every row (Whisper's multilingual vocabularies need one, "
    "here or per row)",
    "language_column": "column holding a row's own language code, used where present",
    "task": "transcribe or translate (Whisper vocabularies)",
    "audio_buckets": "mel frame lengths batches are padded to (2 * n_audio_ctx is always added)",
    "text_buckets": "label lengths batches are padded to (n_text_ctx is always added)",
    "optimizer": "adamw or adafactor",
    "learning_rate": "peak learning rate, reached after warmup (a finite number > 0)",
    "warmup_steps": "steps of linear warmup from 0",
    "steps": "optimizer steps of the run (the cosine schedule spans them)",
    "final_lr_ratio": "the cosine decays to learning_rate times this, in [0, 1]",
    "weight_decay": "decoupled weight decay on the kernels and the token table (>= 0)",
    "b1": "Adam's first-moment decay, in [0, 1)",
    "b2": "Adam's second-moment decay, in [0, 1)",
    "eps": "Adam's epsilon (> 0)",
    "clip_norm": "global gradient-norm clipping ('none' to turn off)",
    "batch_size": "examples per optimizer step, over all devices and accumulation micro-batches",
    "accumulation_steps": "micro-batches per step (batch_size must be a multiple)",
    "precision": "float32, or bfloat16 (bf16 compute; float32 weights, optimizer, softmax and logits)",
    "max_bad_steps": "stop after this many steps in a row with a non-finite loss or gradient",
    "time_masks": "SpecAugment time masks per training utterance (0: off)",
    "time_mask_width": "widest SpecAugment time mask, in mel frames",
    "freq_masks": "SpecAugment frequency masks per training utterance (0: off)",
    "freq_mask_width": "widest SpecAugment frequency mask, in mel bins",
    "seed": "seed of the initialisation, shuffling, dropout and augmentation",
    "mesh_data": "data-parallel axis of the device mesh (-1: the devices the other axes leave)",
    "mesh_fsdp": "axis parameters and optimizer state are sharded over (FSDP)",
    "mesh_tensor": "tensor-parallel axis: MLP hidden units, attention heads and logits split over it",
    "name": "run name: the run folder is runs/NAME unless --run-dir is given",
    "run_dir": "the run's folder (run.json, checkpoints/, logs/, model/); a new run needs it absent or empty",
    "log_every": "steps between log lines (metrics.jsonl, TensorBoard, the progress bar)",
    "eval_every": "steps between evaluations (loss, token accuracy, greedy CER/WER)",
    "eval_batch_size": "evaluation batch size (a multiple of the device count)",
    "decode_eval": "greedy-decode the evaluation split for CER/WER (--no-decode-eval: loss and accuracy only)",
    "save_every": "steps between checkpoints",
    "keep_checkpoints": "latest checkpoints kept (the best by eval loss is kept too)",
    "resume": "continue the run in the run folder from its newest readable checkpoint",
    "stop_at_step": "save and stop at this step (continue with --resume); the schedule still spans --steps",
    "export": "formats of the final model in the run folder: flax (model/), torch (model-torch/), hf (model-hf/, "
    "a Hugging Face transformers directory; whisper preset only)",
    "export_best": "export the kept checkpoint of lowest eval loss (--no-export-best: the last step)",
    "progress": "show a progress bar (--no-progress for logs)",
    "profile_from": "trace --profile-steps steps from this one with jax.profiler into RUN/logs/tensorboard "
    "(TensorBoard's Profile tab; process 0; step 1 includes compiling)",
    "profile_steps": "steps traced from --profile-from",
}
# Settings of earlier versions, with what replaced them.
RENAMED = {
    "checkpoint_dir": "a run keeps its checkpoints in RUN_DIR/checkpoints (set run_dir or name)",
    "log_dir": "a run keeps its logs in RUN_DIR/logs (set run_dir or name)",
    "export_flax": "the flax export is RUN_DIR/model (export = ['flax'])",
    "export_torch": "set export = ['flax', 'torch'] for RUN_DIR/model-torch",
}


def _parse_value(text: str) -> Any:
    """A flag value as JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a flax_whisper model. With no arguments: the demo (see README). Settings "
        "come from the defaults, then --config FILE (TOML or JSON), then these flags.",
        epilog=huge_pages.HELP,
    )
    p.add_argument("--config", help="a TOML or JSON file of settings")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ModelConfig field, e.g. --model n_text_layer=4 --model decoder_attention=hybrid",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host: run the same command on every host)",
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep compiled programs in DIR for the next run or resume ('off': none; default: "
        "$FLAX_WHISPER_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else ~/.cache/flax_whisper/xla)",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="run N cooperating processes on this machine (coordinator on 127.0.0.1), each seeing the devices "
        "XLA_FLAGS gives it; for tests and debugging multi-host code",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        default = f"{HELP[field.name]}; default: {field.default}"
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=default)
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            default = f"{HELP[field.name]}; comma-separated; default: {','.join(map(str, field.default)) or 'none'}"
            p.add_argument(flag, default=None, type=_list_converter(item), metavar="A,B,...", help=default)
        else:
            optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
            kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
            help_text = default + (" ('none' unsets it)" if optional else "")
            p.add_argument(flag, default=None, type=_converter(kind, optional), metavar="VALUE", help=help_text)
    return p


def _converter(kind, optional: bool):
    """Parse a flag as `kind`; an optional setting also takes `none`."""

    def convert(text: str):
        if optional and text.lower() == "none":
            return _NONE
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


_NONE = object()  # a flag that explicitly unsets an optional setting


def _list_converter(item):
    """Parse a comma-separated flag into a tuple of `item`s."""

    def convert(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    convert.__name__ = f"list of {item.__name__}"
    return convert


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    values = base.to_dict()
    for name, value in vars(args).items():
        if name in values and name != "model" and value is not None:
            values[name] = None if value is _NONE else value
    model = dict(values["model"])
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--model takes FIELD=VALUE, got {item!r}")
        model[key.strip()] = _parse_value(value.strip())
    values["model"] = model
    return TrainConfig.from_dict(values), args
