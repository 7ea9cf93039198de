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

from whisper_config import ConfigError, ModelConfig

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
    task: str = "transcribe"
    audio_buckets: tuple[int, ...] = (128, 256)  # mel frame lengths batches are padded to
    text_buckets: tuple[int, ...] = ()  # label lengths; () means n_text_ctx

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

    # Sharding: a (data, fsdp) mesh over all devices; data = -1 takes what fsdp leaves.
    mesh_data: int = -1
    mesh_fsdp: int = 1

    # Logs, evaluation and checkpoints.
    checkpoint_dir: str = "runs/demo/checkpoints"
    log_dir: str = "runs/demo/logs"
    log_every: int = 25
    eval_every: int = 250
    eval_batch_size: int = 40
    decode_eval: bool = True  # greedy-decode the eval split for CER/WER
    save_every: int = 250
    keep_checkpoints: int = 2  # the latest N, plus the best by eval loss
    resume: bool = False
    stop_at_step: int | None = None  # save and stop here (resume later); the schedule still spans `steps`
    export_torch: str | None = None  # write the final weights as a torch_ref checkpoint here
    export_flax: str | None = "runs/demo/model"  # and as a flax checkpoint (for transcribe, convert)
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.optimizer in ("adamw", "adafactor"), f"optimizer must be adamw or adafactor, got {self.optimizer!r}"),
            (self.precision in ("float32", "bfloat16"), f"precision must be float32 or bfloat16: {self.precision!r}"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0 (runs shorter than it warm up throughout)"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.accumulation_steps >= 1, "accumulation_steps must be at least 1"),
            (self.batch_size % self.accumulation_steps == 0, "batch_size must be a multiple of accumulation_steps"),
            (self.clip_norm is None or self.clip_norm > 0, "clip_norm must be positive (or unset)"),
            (min(self.log_every, self.eval_every, self.save_every) >= 1, "log/eval/save intervals must be >= 1"),
            (
                min(self.time_masks, self.time_mask_width, self.freq_masks, self.freq_mask_width) >= 0,
                "SpecAugment settings must be >= 0",
            ),
            (self.mesh_fsdp >= 1 and (self.mesh_data == -1 or self.mesh_data >= 1), "mesh sizes must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def model_config(self) -> ModelConfig:
        """The model this run trains (ignored with `init_from`, whose checkpoint carries its own)."""
        if self.size == "demo":
            return ModelConfig.from_preset(self.preset, **{**DEMO_MODEL, **self.model})
        return ModelConfig.from_preset(self.preset, self.size, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        values = dict(values)
        for name in ("audio_buckets", "text_buckets"):
            if name in values:
                values[name] = tuple(int(v) for v in values[name])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A `.toml` or `.json` file of settings (a `[model]` table holds ModelConfig overrides)."""
        path = Path(path)
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_dict(values)


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
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        default = f"default: {field.default}"
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=default)
        elif typing.get_origin(hint) is tuple:
            default = f"comma-separated integers, empty for none; default: {','.join(map(str, field.default))}"
            p.add_argument(flag, default=None, metavar="N,N,...", help=default)
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


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    values = base.to_dict()
    for name, value in vars(args).items():
        if name in values and name != "model" and value is not None:
            if name in ("audio_buckets", "text_buckets"):
                value = tuple(int(v) for v in value.split(",") if v.strip())
            values[name] = None if value is _NONE else value
    model = dict(values["model"])
    for item in args.model:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--model takes FIELD=VALUE, got {item!r}")
        model[key.strip()] = _parse_value(value.strip())
    values["model"] = model
    return TrainConfig.from_dict(values), args
