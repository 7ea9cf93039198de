"""Hugging Face `transformers` Whisper directories (`WhisperForConditionalGeneration`).

A directory holds `config.json` (`model_type: whisper`), `generation_config.json` (what
`generate()` needs), `preprocessor_config.json` (the feature extractor) and the weights, in
`model.safetensors` or in shards listed by `model.safetensors.index.json`. Tensor names are the
`HF_NAMES` rows of `rules.py`; the output projection is tied to the token table.

HF's Whisper is OpenAI's architecture with one width `d_model` and MLPs of `4 * d_model`: a model
of another preset, mechanism or norm cannot be written as HF, and an HF config that sets
something our model cannot hold (an untied output, scaled embeddings, another activation) is
refused, naming the fields.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert.rules import HF_NAMES, HF_TIED_OUTPUT, ConversionError
from convert.tensors import LazyTensors, dtype_of, renamed, safetensors_tensors, shape_of, write_safetensors
from whisper_config import ConfigError, ModelConfig
from whisper_io.messages import first_line

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
# What a directory we write holds (shards aside): `--overwrite` replaces nothing else.
HF_ENTRIES = frozenset({CONFIG_FILE, GENERATION_FILE, PREPROCESSOR_FILE, WEIGHTS, INDEX})
SHARD_BYTES = 5 * 2**30  # above this the weights are written in shards of at most this size

# (HF config.json key, ModelConfig field): the dimensions and the training-time dropouts.
CONFIG_FIELDS = (
    ("vocab_size", "n_vocab"),
    ("num_mel_bins", "n_mels"),
    ("max_source_positions", "n_audio_ctx"),
    ("max_target_positions", "n_text_ctx"),
    ("encoder_layers", "n_audio_layer"),
    ("encoder_attention_heads", "n_audio_head"),
    ("decoder_layers", "n_text_layer"),
    ("decoder_attention_heads", "n_text_head"),
    ("dropout", "dropout"),
    ("attention_dropout", "attention_dropout"),
)
# HF settings our model holds only at one value: (key, required value, HF's default when absent).
FIXED = (
    ("activation_function", "gelu", "gelu"),
    ("scale_embedding", False, False),
    ("tie_word_embeddings", True, True),
    ("use_weighted_layer_sum", False, False),
)
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def is_hf_directory(path: Path) -> bool:
    """A directory whose config.json names a `transformers` model type (ours has no such key)."""
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return False


def is_shard_name(name: str) -> bool:
    """`model-00001-of-00003.safetensors`, the name of one weight shard."""
    return re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


# ----------------------------------------------------------------------------- config


def _read_json(path: Path, what: str) -> dict:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ConversionError(f"{path}: {what} names {', '.join(twice[:4])} more than once")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"{path}: not valid JSON ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def config_from_hf(directory: Path) -> ModelConfig:
    """The `whisper` preset with the dimensions of an HF Whisper config.json."""
    path = directory / CONFIG_FILE
    data = _read_json(path, "config")
    if data.get("model_type") != "whisper":
        raise ConversionError(f"{path}: model_type is {data.get('model_type')!r}, not 'whisper'")
    missing = [key for key, _ in CONFIG_FIELDS[:8] if key not in data] + [k for k in ("d_model",) if k not in data]
    if missing:
        raise ConversionError(f"{path}: missing {', '.join(missing)}")
    d = data["d_model"]
    differ = [
        f"{key}={data.get(key, default)!r} (supported: {want!r})"
        for key, want, default in FIXED
        if data.get(key, default) != want
    ]
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if isinstance(d, int) and key in data and data[key] != 4 * d:
            differ.append(f"{key}={data[key]!r} (supported: 4 * d_model = {4 * d})")
    if differ:
        raise ConversionError(f"{path}: this Whisper variant cannot be represented: {', '.join(differ)}")
    fields = {ours: data[key] for key, ours in CONFIG_FIELDS if key in data}
    try:
        config = ModelConfig.from_preset("whisper", n_audio_state=d, n_text_state=d, **fields)
        start = data.get("decoder_start_token_id")
        if start is not None and _default_start(config) != start:
            config = config.replace(decoder_start_token_id=start)
    except (ConfigError, TypeError) as err:
        raise ConversionError(f"{path}: {first_line(err)}") from None
    return config


def _default_start(config: ModelConfig) -> int | None:
    try:
        return config.replace(decoder_start_token_id=None).start_token_id
    except ConfigError:
        return None


def hf_differences(config: ModelConfig) -> list[str]:
    """How `config` differs from what HF's Whisper can hold (empty when it can)."""
    # HF's config holds the start id; its single d_model is ours too (ModelConfig requires equal widths).
    return config.replace(decoder_start_token_id=None).openai_differences()


def check_hf_compatible(config: ModelConfig) -> None:
    differ = hf_differences(config)
    if differ:
        raise ConversionError(
            "a Hugging Face Whisper directory holds only the plain `whisper` preset; this model differs in "
            + ", ".join(differ)
        )


def config_to_hf(config: ModelConfig, dtype: str, tokenizer=None) -> dict:
    """`config.json` for `WhisperConfig` (`tokenizer`: the vocabulary's, built when not given)."""
    tokens = _special_tokens(config, tokenizer)
    data = {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        **{key: getattr(config, ours) for key, ours in CONFIG_FIELDS},
        "d_model": config.n_audio_state,
        "encoder_ffn_dim": 4 * config.n_audio_state,
        "decoder_ffn_dim": 4 * config.n_text_state,
        "activation_function": "gelu",
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "use_cache": True,
        "decoder_start_token_id": config.start_token_id,
        "bos_token_id": tokens["eot"],
        "eos_token_id": tokens["eot"],
        "pad_token_id": tokens["eot"],
        "begin_suppress_tokens": tokens["begin_suppress"],
        "suppress_tokens": tokens["suppress"],
        "dtype": dtype,
    }
    return data


def _tokenizer(config: ModelConfig):
    from whisper_io import tokenizer_for

    return tokenizer_for(config)


def _special_tokens(config: ModelConfig, tokenizer=None) -> dict:
    """The ids `generate()` needs, from the vocabulary's tokenizer."""
    tokenizer = tokenizer or _tokenizer(config)
    return {
        "eot": tokenizer.eot,
        "sot": config.start_token_id,
        "suppress": list(tokenizer.suppress_tokens),
        "begin_suppress": sorted({*tokenizer.blank_tokens, tokenizer.eot}),
    }


def generation_config(config: ModelConfig, tokenizer=None) -> dict:
    """`generation_config.json`: what `WhisperForConditionalGeneration.generate()` reads."""
    tokenizer = tokenizer or _tokenizer(config)
    tokens = _special_tokens(config, tokenizer)
    data = {
        "decoder_start_token_id": tokens["sot"],
        "bos_token_id": tokens["eot"],
        "eos_token_id": tokens["eot"],
        "pad_token_id": tokens["eot"],
        "max_length": config.n_text_ctx,
        "suppress_tokens": tokens["suppress"],
        "begin_suppress_tokens": tokens["begin_suppress"],
        "is_multilingual": bool(getattr(tokenizer, "multilingual", False)),
    }
    if config.alignment_heads is not None:  # [layer, head] pairs, as HF's word timestamps read them
        data["alignment_heads"] = [list(divmod(h, config.n_text_head)) for h in config.alignment_heads]
    no_timestamps = getattr(tokenizer, "no_timestamps", None)
    if no_timestamps is not None:  # a Whisper vocabulary
        data.update(
            no_timestamps_token_id=no_timestamps,
            prev_sot_token_id=tokenizer.sot_prev,
            max_initial_timestamp_index=50,
            return_timestamps=False,
        )
        if tokenizer.multilingual:
            data["lang_to_id"] = {
                f"<|{code}|>": token
                for code, token in zip(tokenizer.language_codes, tokenizer.language_tokens, strict=True)
            }
            data["task_to_id"] = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
    return data


def preprocessor_config(config: ModelConfig) -> dict:
    """`preprocessor_config.json` for `WhisperFeatureExtractor`: 16 kHz, 25 ms windows every 10 ms."""
    frames = 2 * config.n_audio_ctx
    samples = frames * 160
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": config.n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": samples // 16000 if samples % 16000 == 0 else samples / 16000,
        "n_samples": samples,
        "nb_max_frames": frames,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


# ----------------------------------------------------------------------------- reading


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory -- `model.safetensors`, or the shards its index lists
    (each must exist) -- and the index's map of tensor names to shards (None without an index)."""
    index = directory / INDEX
    if index.is_file():
        data = _read_json(index, "index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no 'weight_map' of tensor names to files")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ConversionError(f"{index}: shard(s) missing from the directory: {', '.join(missing)}")
        return [directory / name for name in shards], weight_map
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS], None
    raise ConversionError(f"{directory}: an HF directory without {WEIGHTS} or {INDEX}")


def load_hf(directory: Path) -> tuple[ModelConfig, LazyTensors]:
    """An HF Whisper directory -> (config, lazily read torch_ref-named tensors)."""
    config = config_from_hf(directory)
    if (directory / GENERATION_FILE).is_file():
        config = _with_alignment_heads(config, directory / GENERATION_FILE)
    else:
        sys.stderr.write(
            f"notice: {directory}: no {GENERATION_FILE}; decoding settings are derived from the vocabulary "
            f"(n_vocab={config.n_vocab})\n"
        )
    files, weight_map = weight_files(directory)
    tensors = safetensors_tensors(files)
    if weight_map is not None:
        index = directory / INDEX
        stray = sorted(set(tensors) ^ set(weight_map))
        if stray:
            raise ConversionError(f"{index}: the index and the shards disagree about {', '.join(stray[:4])}")
        misplaced = sorted(k for k in tensors if Path(tensors.source(k)).name != weight_map[k])
        if misplaced:
            raise ConversionError(f"{index}: tensors not in the shard the index names: {', '.join(misplaced[:4])}")
    if HF_TIED_OUTPUT in tensors:
        output, table = tensors[HF_TIED_OUTPUT], tensors["model.decoder.embed_tokens.weight"]
        if output.shape != table.shape or not np.array_equal(output, table):
            raise ConversionError(
                f"{directory}: {HF_TIED_OUTPUT} differs from the token table; this model ties them (untied "
                "output projections cannot be represented)"
            )
        tensors = tensors.without(HF_TIED_OUTPUT)
    return config, tensors.renamed(HF_NAMES.from_format, f"HF checkpoint {directory}")


def _with_alignment_heads(config: ModelConfig, path: Path) -> ModelConfig:
    """`config` with the generation config's `alignment_heads` ([layer, head] pairs), when it has them."""
    pairs = _read_json(path, "generation config").get("alignment_heads")
    if pairs is None:
        return config
    ok = isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        for p in pairs
    )
    if ok and all(0 <= layer < config.n_text_layer and 0 <= head < config.n_text_head for layer, head in pairs):
        return config.replace(alignment_heads=tuple(layer * config.n_text_head + head for layer, head in pairs))
    raise ConversionError(
        f"{path}: alignment_heads must be [layer, head] pairs within {config.n_text_layer} layers of "
        f"{config.n_text_head} heads, got {str(pairs)[:80]}"
    )


# ----------------------------------------------------------------------------- writing


def save_hf(path: Path, config: ModelConfig, tensors: Mapping[str, np.ndarray], shard_bytes: int | None = None):
    """Write an HF directory `from_pretrained` loads (no missing or unexpected keys)."""
    check_hf_compatible(config)
    named = renamed(tensors, HF_NAMES.to_format, "tensors to save")
    dtypes = {np.dtype(dtype_of(named, k)).name for k in named}
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    path.mkdir()
    tokenizer = _tokenizer(config)
    _write_json(path / CONFIG_FILE, config_to_hf(config, DTYPES.get(dtype, "float32"), tokenizer))
    _write_json(path / GENERATION_FILE, generation_config(config, tokenizer))
    _write_json(path / PREPROCESSOR_FILE, preprocessor_config(config))
    shards = _plan_shards(named, SHARD_BYTES if shard_bytes is None else shard_bytes)
    if len(shards) == 1:
        write_safetensors(path / WEIGHTS, named, shards[0])
        return
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = SHARD.format(number, len(shards))
        write_safetensors(path / name, named, keys)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(_nbytes(named, k) for k in named)
    _write_json(path / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _nbytes(tensors: Mapping, key: str) -> int:
    return int(np.prod(shape_of(tensors, key))) * np.dtype(dtype_of(tensors, key)).itemsize


def _plan_shards(tensors: Mapping, shard_bytes: int) -> list[list[str]]:
    """Tensor names in file order, cut into shards of at most `shard_bytes` (a bigger tensor alone)."""
    shards, size = [[]], 0
    for key in tensors:
        nbytes = _nbytes(tensors, key)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
