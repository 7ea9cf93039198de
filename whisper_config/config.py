"""`ModelConfig`: one frozen dataclass describing a Whisper-like encoder-decoder.

Dimension fields keep OpenAI Whisper's `ModelDimensions` names, so the `dims` of an OpenAI
checkpoint load directly (`ModelConfig.from_openai_dims`). The remaining fields select the
mechanisms of contract sections 2-4. Every value is validated with a message naming the field; a
switch that would have no effect in the chosen configuration is an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from whisper_config.fields import check_field_types

OPENAI_DIM_FIELDS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)

ATTENTION_KINDS = ("mha", "biased", "memory", "dynamic_conv", "hybrid", "integrated")
# The values contract section 1 names for each choice field.
CHOICES: dict[str, tuple[str, ...]] = {
    "encoder_attention": ATTENTION_KINDS,
    "decoder_attention": ATTENTION_KINDS,
    "encoder_positions": ("sinusoidal", "learned_sinusoidal", "none"),
    "decoder_positions": ("learned", "sinusoidal", "learned_sinusoidal", "none"),
    "norm": ("layernorm", "rmsnorm", "group_rms"),
    "attention_implementation": ("auto", "cudnn", "splash", "xla", "chunked", "einsum"),
    "remat_policy": ("full", "save_matmuls"),
}

SWITCHES = (
    "encoder_rotary",
    "decoder_rotary",
    "normalize_positions",
    "mlp_norm",
    "learned_temperature",
    "memory_update",
    "gradient_checkpointing",
    "decode_unroll",
)
# unroll_layers: True, False, or this (`ModelConfig.unrolls`).
UNROLL_CHOICES = (True, False, "auto")
# "auto" unrolls a stack of up to this many layers (one side's): the unrolled step is faster (1.31x
# the scan for `small`, 12 + 12 layers, on an H200; 1.04-1.06x for `tiny` on a 2-core CPU), but its
# compile time grows with depth (8.6-19.3 s against the scan's 3.7-4.4 s at 12 + 12 on that CPU).
UNROLL_AUTO_LAYERS = 12

# Settings that change how a model trains, not what it computes once trained.
TRAINING_ONLY = ("dropout", "attention_dropout")
# What is known about a model, not how it computes.
METADATA = ("alignment_heads",)
# Settings of how the computation runs, not what it computes (up to rounding): a checkpoint does
# not depend on them, and a resumed run may change them.
EXECUTION_ONLY = (
    "attention_implementation",
    "gradient_checkpointing",
    "remat_policy",
    "decode_unroll",
    "unroll_layers",
)

# OpenAI Whisper's released sizes (their `ModelDimensions`), for `ModelConfig.from_size`.
_EN = 51864
_MULTI = 51865
VOCAB_MULTIPLE = 128  # the Flax token table's rows are padded to a multiple of this (`ModelConfig.padded_vocab`)
SIZES: dict[str, dict[str, int]] = {
    name: dict(
        n_mels=mels,
        n_audio_ctx=1500,
        n_audio_state=d,
        n_audio_head=h,
        n_audio_layer=n,
        n_vocab=vocab,
        n_text_ctx=448,
        n_text_state=d,
        n_text_head=h,
        n_text_layer=n,
    )
    for name, (mels, d, h, n, vocab) in {
        "tiny": (80, 384, 6, 4, _MULTI),
        "tiny.en": (80, 384, 6, 4, _EN),
        "base": (80, 512, 8, 6, _MULTI),
        "base.en": (80, 512, 8, 6, _EN),
        "small": (80, 768, 12, 12, _MULTI),
        "small.en": (80, 768, 12, 12, _EN),
        "medium": (80, 1024, 16, 24, _MULTI),
        "medium.en": (80, 1024, 16, 24, _EN),
        "large-v2": (80, 1280, 20, 32, _MULTI),
        "large-v3": (128, 1280, 20, 32, 51866),
    }.items()
}


def _scheme(
    encoder_positions: str, encoder_rotary: bool, decoder_positions: str, decoder_rotary: bool, attention: str = "mha"
):
    return dict(
        encoder_attention=attention,
        decoder_attention=attention,
        encoder_positions=encoder_positions,
        encoder_rotary=encoder_rotary,
        decoder_positions=decoder_positions,
        decoder_rotary=decoder_rotary,
        norm="layernorm",
    )


# Named position/mechanism schemes (model contract section 1; the seed's `Whisper-embeddings` study, plus
# OpenAI Whisper itself). Sizes are independent of the preset; fields can be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "whisper": _scheme("sinusoidal", False, "learned", False),
    "all_rotary": _scheme("none", True, "none", True),
    "rotary_sinusoidal": _scheme("none", True, "sinusoidal", False),
    "rotary_rotary_sinusoidal": _scheme("none", True, "sinusoidal", True),
    "rotary_learned_sinusoidal": _scheme("none", True, "learned_sinusoidal", True),
    # contract 4.6: the seed's integrated block on both sides, with rotary and learned sinusoidal positions.
    "integrated": _scheme("learned_sinusoidal", True, "learned_sinusoidal", True, attention="integrated"),
}


# Bounds checked before anything is built: a config claiming a million layers must be an error,
# not an hour-long allocation. Whisper large-v3 has 1.55 billion parameters in 32 + 32 layers.
MAX_PARAMETERS = 100_000_000_000
MAX_LAYERS = 1024


class ConfigError(ValueError):
    """A `ModelConfig` value is invalid; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the encoder-decoder; defaults are OpenAI's `tiny` with the `whisper` preset."""

    # OpenAI `ModelDimensions`
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4
    # mechanisms (model contract sections 2-4)
    encoder_attention: str = "mha"
    decoder_attention: str = "mha"
    encoder_positions: str = "sinusoidal"
    decoder_positions: str = "learned"
    encoder_rotary: bool = False
    decoder_rotary: bool = False
    rotary_base: float = 10000.0
    normalize_positions: bool = False
    norm: str = "layernorm"
    norm_groups: int = 1
    mlp_norm: bool = False
    learned_temperature: bool = False
    window_size: int = 64
    conv_kernel_size: int = 3
    memory_size: int = 16
    memory_update: bool = False
    memory_momentum: float = 0.9
    dropout: float = 0.0
    attention_dropout: float = 0.0
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute the whole block in the backward pass ("full"), or keep
    # the outputs of its weight matmuls ("save_matmuls": more memory, less recompute; flax only).
    remat_policy: str = "full"
    # How attention runs (flax_whisper/kernel.py): auto, cudnn, xla, chunked or einsum; torch_ref
    # uses scaled_dot_product_attention for all but einsum.
    attention_implementation: str = "auto"
    # flax: decode with each of the decoder's layers on its own (its weights and caches copied out
    # of the stack once per call, the layers one after another), not under `nnx.scan`, which
    # slices every layer's weights and caches out of the stacked arrays at every token; the
    # compile time of a decoding loop grows with depth (False: the scan).
    decode_unroll: bool = True
    # flax: run the layers of a forward without a KV cache (the encoder, training, teacher forcing)
    # unrolled (True), not under `nnx.scan` (False): no per-layer slicing and stacking of what the
    # backward pass keeps, a faster step, but a compile time that grows with depth. "auto" unrolls
    # each side of up to UNROLL_AUTO_LAYERS layers unless gradient_checkpointing (which asks for the
    # scan's bounded memory), and scans deeper ones (`unrolls`).
    unroll_layers: bool | str = "auto"
    # Teacher forcing: the token fed before the first label. None picks OpenAI's
    # <|startoftranscript|> for OpenAI vocabularies (see `start_token_id`).
    decoder_start_token_id: int | None = None
    # Metadata, not architecture: the decoder's cross-attention heads that follow the audio in
    # time (for word timestamps), as flat indices `layer * n_text_head + head`, when known (Hugging
    # Face checkpoints carry them in generation_config.json as [layer, head] pairs).
    alignment_heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_field_types(self, ConfigError)
        for name in OPENAI_DIM_FIELDS:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_audio_layer", "n_text_layer"):
            if getattr(self, name) > MAX_LAYERS:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is more than the {MAX_LAYERS} layers per side this project builds"
                )
        size = self.approximate_parameters()
        if size > MAX_PARAMETERS:
            dims = ", ".join(f"{name}={getattr(self, name)}" for name in OPENAI_DIM_FIELDS)
            raise ConfigError(
                f"this config describes a model of about {size:.2e} parameters, more than the "
                f"{MAX_PARAMETERS:.0e} this project builds: check the dimensions ({dims})"
            )
        for side, state, head in (
            ("audio", self.n_audio_state, self.n_audio_head),
            ("text", self.n_text_state, self.n_text_head),
        ):
            if state % head:
                raise ConfigError(
                    f"n_{side}_head={head} does not divide n_{side}_state={state}: "
                    "each head needs an equal share of the width"
                )
        if self.n_audio_state != self.n_text_state:
            raise ConfigError(
                f"n_audio_state={self.n_audio_state} must equal n_text_state={self.n_text_state}: "
                "cross-attention projects encoder states with the decoder's width"
            )
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            raise ConfigError(f"n_audio_state={self.n_audio_state} must be even and >= 4 (sinusoidal table)")
        for name, known in CHOICES.items():
            value = getattr(self, name)
            if value not in known:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(known)}")
        for name in SWITCHES:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if self.unroll_layers not in UNROLL_CHOICES:
            raise ConfigError(f"unroll_layers must be true, false or 'auto', got {self.unroll_layers!r}")
        self._check_positions()
        self._check_mechanisms()
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        start = self.decoder_start_token_id
        if start is not None and not (isinstance(start, int) and 0 <= start < self.n_vocab):
            raise ConfigError(f"decoder_start_token_id={start!r} must be a token id in [0, n_vocab={self.n_vocab})")
        heads = self.n_text_layer * self.n_text_head
        if self.alignment_heads is not None and not all(0 <= h < heads for h in self.alignment_heads):
            raise ConfigError(
                f"alignment_heads={list(self.alignment_heads)} must be flat head indices in [0, {heads}) "
                f"(layer * n_text_head + head)"
            )

    def _check_positions(self) -> None:
        if (
            isinstance(self.rotary_base, bool)
            or not isinstance(self.rotary_base, (int, float))
            or self.rotary_base <= 1
        ):
            raise ConfigError(f"rotary_base must be a number > 1, got {self.rotary_base!r}")
        for side, rotary, state, head in (
            ("encoder", self.encoder_rotary, self.n_audio_state, self.n_audio_head),
            ("decoder", self.decoder_rotary, self.n_text_state, self.n_text_head),
        ):
            if rotary and (state // head) % 2:
                raise ConfigError(
                    f"{side}_rotary needs an even head width, but {state} / {head} heads = {state // head}"
                )
        if self.normalize_positions and "learned_sinusoidal" not in (self.encoder_positions, self.decoder_positions):
            raise ConfigError(
                "normalize_positions=True normalises learned_sinusoidal rows, but neither "
                "encoder_positions nor decoder_positions is learned_sinusoidal"
            )

    def _check_mechanisms(self) -> None:
        for name, low in (("window_size", 1), ("conv_kernel_size", 1), ("norm_groups", 1), ("memory_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.conv_kernel_size % 2 == 0:
            raise ConfigError(
                f"conv_kernel_size={self.conv_kernel_size} must be odd: the encoder's dynamic "
                "convolution is centred on each position"
            )
        if self.n_audio_state % self.norm_groups:
            raise ConfigError(
                f"norm_groups={self.norm_groups} does not divide the width {self.n_audio_state} "
                "(group_rms splits each position's channels into equal groups)"
            )
        momentum = self.memory_momentum
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"memory_momentum must be in [0, 1], got {momentum!r}")
        with_memory = {"memory", "integrated"} & {self.encoder_attention, self.decoder_attention}
        if self.memory_update and not with_memory:
            raise ConfigError(
                "memory_update=True writes back memory slots, but neither encoder_attention nor "
                "decoder_attention is memory or integrated"
            )
        if self.remat_policy != "full" and not self.gradient_checkpointing:
            raise ConfigError(f"remat_policy={self.remat_policy!r} has no effect without gradient_checkpointing=True")
        for side in ("encoder", "decoder"):
            if getattr(self, f"{side}_rotary") and getattr(self, f"{side}_attention") == "dynamic_conv":
                raise ConfigError(
                    f"{side}_rotary=True has no effect with {side}_attention='dynamic_conv', which has "
                    "no queries or keys to rotate"
                )

    # ---------------------------------------------------------------- derived values

    def approximate_parameters(self) -> int:
        """An upper estimate of the parameter count from the dimensions alone (nothing built):
        attention at most 8 d^2 per self-attention (hybrid has two), 4 d^2 cross-attention,
        8 d^2 MLP, plus the tables, convolutions and memory slots."""
        d_audio, d_text = self.n_audio_state, self.n_text_state
        per_audio = 16 * d_audio**2 + self.memory_size * d_audio
        per_text = 20 * d_text**2 + self.memory_size * d_text
        tables = self.n_audio_ctx * d_audio + (self.n_text_ctx + self.n_vocab) * d_text
        convs = 3 * d_audio * (self.n_mels + d_audio)
        return self.n_audio_layer * per_audio + self.n_text_layer * per_text + tables + convs

    def unrolls(self, n_layers: int) -> bool:
        """Whether a stack of `n_layers` (the encoder's or the decoder's) runs unrolled in a
        forward without a KV cache, under `unroll_layers`."""
        if self.unroll_layers == "auto":
            return n_layers <= UNROLL_AUTO_LAYERS and not self.gradient_checkpointing
        return self.unroll_layers

    @property
    def padded_vocab(self) -> int:
        """Rows of the Flax token table: `n_vocab` rounded up to a multiple of `VOCAB_MULTIPLE`, so
        the table shards evenly on its vocabulary axis. The padded ids' logits are masked; every
        checkpoint format keeps the true `n_vocab` rows."""
        return -(-self.n_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def is_multilingual(self) -> bool:
        """OpenAI's rule: the multilingual vocabulary has at least 51865 tokens."""
        return self.n_vocab >= _MULTI

    @property
    def start_token_id(self) -> int:
        """The decoder start token: the configured one, else OpenAI's <|startoftranscript|>."""
        if self.decoder_start_token_id is not None:
            return self.decoder_start_token_id
        if self.n_vocab >= _MULTI:
            return 50258
        if self.n_vocab == _EN:
            return 50257
        raise ConfigError(f"n_vocab={self.n_vocab} is not an OpenAI vocabulary: set decoder_start_token_id")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_preset(cls, name: str, size: str | None = None, **overrides: Any) -> ModelConfig:
        """A named preset (model contract section 1), optionally at an OpenAI size, then field overrides."""
        fields = dict(SIZES[_check_size(size)]) if size is not None else {}
        fields.update(_preset_fields(name))
        fields.update(overrides)
        return cls.from_dict(fields)

    def with_preset(self, name: str) -> ModelConfig:
        """This config with the fields of preset `name`; dimensions and everything else kept."""
        return self.replace(**_preset_fields(name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, rejecting unknown field names (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if isinstance(data.get("alignment_heads"), list):  # JSON has lists; the frozen config holds tuples
            data = {**data, "alignment_heads": tuple(data["alignment_heads"])}
        return cls(**data)

    @classmethod
    def from_openai_dims(cls, dims: dict[str, Any]) -> ModelConfig:
        """The `whisper` preset with the dimensions of an OpenAI checkpoint's `dims`."""
        missing = [name for name in OPENAI_DIM_FIELDS if name not in dims]
        if missing:
            raise ConfigError(f"OpenAI dims lack field(s): {', '.join(missing)}")
        return cls.from_preset("whisper", **{name: dims[name] for name in OPENAI_DIM_FIELDS})

    def openai_dims(self) -> dict[str, int]:
        """The OpenAI `ModelDimensions` of this config, as a plain dict."""
        return {name: getattr(self, name) for name in OPENAI_DIM_FIELDS}

    def openai_differences(self) -> list[str]:
        """`field=value (OpenAI: value)` for every way this model differs from OpenAI Whisper's
        architecture; training-only settings (dropout, checkpointing) do not count."""
        openai = ModelConfig.from_openai_dims(self.openai_dims())
        return [
            f"{name}={getattr(self, name)!r} (OpenAI: {getattr(openai, name)!r})"
            for name in self.to_dict()
            if name not in TRAINING_ONLY + EXECUTION_ONLY + METADATA and getattr(self, name) != getattr(openai, name)
        ]

    def is_openai_compatible(self) -> bool:
        """True when this config is exactly OpenAI Whisper's architecture."""
        return not self.openai_differences()

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- serialisation

    def portable(self) -> ModelConfig:
        """This config with every setting of how the computation runs (`EXECUTION_ONLY`) at its
        default: what a checkpoint records. How a model runs is its reader's choice (as
        `transformers` keeps `attn_implementation` out of config.json), so a checkpoint written
        under one default keeps none of it when the defaults improve."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in EXECUTION_ONLY}
        return self.replace(**defaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object of field names to values")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a `config.json`; every failure is a `ConfigError` that starts with the path."""
        text = read_text(path)
        try:
            return cls.from_json(text)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 settings file's text; a `ConfigError` starting with the path if it cannot be had."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None


def _preset_fields(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _check_size(size: str) -> str:
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; known sizes: {', '.join(SIZES)}")
    return size
