"""The conversion table, the checked inventory, and the checkpoint formats."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    VARIANTS,
    assert_close,
    flax_forward,
    greedy_cover,
    make_pair,
    random_batch,
    tiny_config,
    variant_config,
    variant_params,
)
from flax import nnx

from convert import (
    ConversionError,
    build_plan,
    detect_format,
    flax_to_torch,
    load_checkpoint,
    load_flax_model,
    load_torch_model,
    new_flax_model,
    save_checkpoint,
)
from convert.core import torch_to_numpy
from convert.openai import from_openai_names, to_openai_names
from convert.rules import CONV1D, LAYER_STACK, LINEAR
from torch_ref import Whisper as TorchWhisper
from whisper_io.outputs import OutputError


def test_plan_matches_both_models(variant, variant_pair):
    """The table's torch names and shapes are exactly torch_ref's state dict, and every Flax
    parameter and buffer is covered once."""
    config = variant
    plan = build_plan(config)
    torch_state = variant_pair[0].state_dict()
    assert {e.torch_key: e.torch_shape for e in plan} == {k: tuple(v.shape) for k, v in torch_state.items()}
    flax_state = nnx.state(variant_pair[1], nnx.Param)
    assert {e.flax_key for e in plan if e.trainable} == {
        ".".join(map(str, p)) for p, _ in nnx.to_flat_state(flax_state)
    }
    buffers = {e.torch_key for e in plan if not e.trainable}
    tables = {"encoder": config.encoder_positions, "decoder": config.decoder_positions}
    fixed = {f"{side}.positional_embedding" for side, kind in tables.items() if kind == "sinusoidal"}
    assert {key for key in buffers if not key.endswith("memory_state")} == fixed
    with_memory = {"memory", "integrated"} & {config.encoder_attention, config.decoder_attention}
    assert any(key.endswith("memory_state") for key in buffers) == bool(with_memory)
    for side, kind in tables.items():
        assert (f"{side}.positional_embedding" in {e.torch_key for e in plan}) == (kind != "none")


def test_transforms_are_named_inverses():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert CONV1D.to_flax(w).shape == (4, 3, 2)
    assert np.array_equal(CONV1D.to_torch(CONV1D.to_flax(w)), w)
    assert np.array_equal(CONV1D.to_flax(w)[1, 2, 0], w[0, 2, 1])
    assert np.array_equal(LINEAR.to_torch(LINEAR.to_flax(w[0])), w[0])
    assert CONV1D.torch_shape((4, 3, 2)) == (2, 3, 4) and LINEAR.name == "linear_transpose"
    layers = [np.full((2, 3), i, np.float32) for i in range(4)]
    stacked = LAYER_STACK.to_flax(layers)
    assert stacked.shape == (4, 2, 3) and LAYER_STACK.name == "layer_stack"
    assert all(np.array_equal(a, b) for a, b in zip(LAYER_STACK.to_torch(stacked), layers, strict=True))
    assert LAYER_STACK.to_torch(np.arange(3.0))[1].shape == ()  # a stacked scalar gives scalars back


def test_torch_flax_torch_is_bit_exact(variant, variant_pair):
    config = variant
    tensors = torch_to_numpy(variant_pair[0])
    back = flax_to_torch(new_flax_model(config, tensors))
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_flax_torch_flax_is_bit_exact(variant, variant_pair):
    config = variant
    flax_model = variant_pair[1]
    again = new_flax_model(config, flax_to_torch(flax_model))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(flax_model, nnx.Param)), nnx.to_flat_state(nnx.state(again, nnx.Param)), strict=True
    ):
        assert np.array_equal(a.get_value(), b.get_value()), path


def test_inventory_names_every_problem(config):
    tensors = torch_to_numpy(TorchWhisper(config))
    del tensors["decoder.ln.weight"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["encoder.conv1.weight"] = tensors["encoder.conv1.weight"][:, :, :2]
    with pytest.raises(ConversionError) as info:
        new_flax_model(config, tensors)
    message = str(info.value)
    assert "missing (1):\n    decoder.ln.weight" in message
    assert "unexpected (1):\n    decoder.extra.weight" in message
    assert "encoder.conv1.weight: expected (32, 8, 3), got (32, 8, 2)" in message


def test_openai_names_map_both_ways():
    ours = {"encoder.blocks.3.mlp.fc1.weight": 1, "decoder.blocks.0.mlp.fc2.bias": 2, "decoder.ln.weight": 3}
    theirs = to_openai_names(ours)
    assert set(theirs) == {"encoder.blocks.3.mlp.0.weight", "decoder.blocks.0.mlp.2.bias", "decoder.ln.weight"}
    assert from_openai_names(theirs) == ours


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_format_name_tables_are_invertible_over_every_tensor(variant):
    """Each format's rows map every torch_ref tensor of every variant to a distinct name and back."""
    from convert.rules import HF_NAMES, OPENAI_NAMES

    config = variant_config(variant)
    keys = [entry.torch_key for entry in build_plan(config)]
    for names in (OPENAI_NAMES, HF_NAMES):
        theirs = [names.to_format(key) for key in keys]
        if names is HF_NAMES and not config.is_openai_compatible():
            continue  # (HF refuses these models before naming anything)
        assert None not in theirs and len(set(theirs)) == len(keys), names.name
        assert [names.from_format(name) for name in theirs] == keys, names.name
    assert HF_NAMES.to_format("decoder.blocks.11.cross_attn.key.weight") == (
        "model.decoder.layers.11.encoder_attn.k_proj.weight"
    )
    assert HF_NAMES.from_format("model.encoder.layers.0.fc1.bias") == "encoder.blocks.0.mlp.fc1.bias"
    assert HF_NAMES.from_format("model.encoder.layers.0.something_else.bias") is None


@pytest.mark.parametrize("fmt", ["torch", "flax", "openai", "hf"])
def test_checkpoint_formats_round_trip(tmp_path, fmt):
    config = tiny_config(decoder_start_token_id=None, n_vocab=51865, n_text_layer=1, n_audio_layer=1)
    torch_model, _ = make_pair(config, seed=3)
    tensors = torch_to_numpy(torch_model)
    path = tmp_path / ("model.pt" if fmt == "openai" else "ckpt")
    save_checkpoint(path, fmt, config, tensors)
    assert detect_format(path) == fmt
    ckpt = load_checkpoint(path)
    assert ckpt.config == config and ckpt.format == fmt
    for key, value in tensors.items():
        assert np.array_equal(ckpt.tensors[key], value), key
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        save_checkpoint(path, fmt, config, tensors)
    save_checkpoint(path, fmt, config, tensors, overwrite=True)


def test_checkpoints_record_what_a_model_computes_not_how_it_runs(tmp_path):
    """Execution settings (layer layouts, attention implementation, checkpointing) are the
    reader's: a checkpoint written under other ones stores and loads the defaults, so a
    checkpoint of an older default decodes with today's."""
    config = tiny_config(n_text_layer=1, n_audio_layer=1)
    running = config.replace(decode_unroll=False, unroll_layers=True, attention_implementation="einsum")
    tensors = torch_to_numpy(make_pair(config, seed=3)[0])
    save_checkpoint(tmp_path / "t", "torch", running, tensors)
    stored = json.loads((tmp_path / "t" / "config.json").read_text())
    written = (stored["decode_unroll"], stored["unroll_layers"], stored["attention_implementation"])
    assert written == (True, "auto", "auto")
    assert load_checkpoint(tmp_path / "t").config == config
    # A config.json written before: its execution settings are not taken.
    (tmp_path / "t" / "config.json").write_text(running.to_json())
    assert load_checkpoint(tmp_path / "t").config == config


def test_loaded_models_agree(tmp_path, config):
    torch_model, flax_model = make_pair(config, seed=4)
    save_checkpoint(tmp_path / "t", "torch", config, torch_to_numpy(torch_model))
    mel, tokens = random_batch(config, 2, 20, 6)
    loaded_t, loaded_f = load_torch_model(tmp_path / "t").eval(), load_flax_model(tmp_path / "t")
    loaded_f.eval()
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
        assert np.array_equal(loaded_t(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy(), reference)
    assert np.array_equal(flax_forward(loaded_f, mel, tokens), flax_forward(flax_model, mel, tokens))
    assert_close(flax_forward(loaded_f, mel, tokens), reference, 1e-4)


def test_wrong_shape_checkpoint_is_reported(tmp_path, config):
    save_checkpoint(tmp_path / "small", "torch", config, torch_to_numpy(TorchWhisper(config)))
    (tmp_path / "small" / "config.json").write_text(tiny_config(n_text_ctx=20).to_json())
    with pytest.raises(ConversionError, match=r"decoder.positional_embedding: expected \(20, 32\), got \(12, 32\)"):
        load_checkpoint(tmp_path / "small")


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake_pt = tmp_path / "model.pt"
    fake_pt.write_bytes(b"\x00garbage")
    (tmp_path / "empty").mkdir()
    bad_st = tmp_path / "bad"
    bad_st.mkdir()
    (bad_st / "model.safetensors").write_bytes(b"nope")
    (bad_st / "config.json").write_text(tiny_config().to_json())
    cases = [
        (tmp_path / "missing", "no such file or directory"),
        (text, "not a checkpoint"),
        (fake_pt, "not a PyTorch checkpoint"),
        (tmp_path / "empty", "not a checkpoint directory"),
        (bad_st, "not a readable safetensors file"),
    ]
    for path, message in cases:
        with pytest.raises(ConversionError, match=message):
            load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not an OpenAI Whisper checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": Payload()}, path)
    with pytest.raises(ConversionError, match="refused: it holds a reference to print") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


def test_cli_converts_and_reports_errors(tmp_path, config):
    save_checkpoint(tmp_path / "t", "torch", config, torch_to_numpy(TorchWhisper(config)))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True)

    done = run(str(tmp_path / "t"), str(tmp_path / "f"))
    assert done.returncode == 0, done.stderr
    assert "(torch) ->" in done.stdout and "(flax)" in done.stdout
    assert detect_format(tmp_path / "f") == "flax"
    assert json.loads((tmp_path / "f" / "config.json").read_text()) == config.to_dict()
    back = run(str(tmp_path / "f"), str(tmp_path / "t2"))
    assert back.returncode == 0 and detect_format(tmp_path / "t2") == "torch"
    original, again = load_checkpoint(tmp_path / "t").tensors, load_checkpoint(tmp_path / "t2").tensors
    assert all(np.array_equal(original[k], again[k]) for k in original)
    failed = run(str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert failed.returncode == 2 and "error:" in failed.stderr and "Traceback" not in failed.stderr


def layer_parameter_names(name: str) -> set[str]:
    """A variant's per-layer parameter names, layer numbers as N (`encoder.blocks.N.attn.query.kernel`)."""
    keys = (entry.flax_layer_key.split(".") for entry in build_plan(variant_config(name)))
    return {".".join("N" if part.isdigit() else part for part in key) for key in keys}


# The layout change is generic over parameter names: the main suite loads variants that hold every
# name between them; the others (positions and norms the chosen ones already name) are `slow`.
@pytest.mark.parametrize(
    "variant", variant_params(greedy_cover({name: layer_parameter_names(name) for name in VARIANTS})), indirect=True
)
def test_flax_checkpoints_of_the_per_layer_layout_still_load(tmp_path, variant, variant_pair):
    """Earlier versions stored each block separately (`encoder.blocks.3.attn.query.kernel`); such a
    checkpoint loads into today's stacked blocks with the same tensors."""
    import orbax.checkpoint as ocp

    tensors = torch_to_numpy(variant_pair[0])
    per_layer: dict = {}
    for entry in build_plan(variant):
        node = per_layer
        *parents, leaf = entry.flax_layer_key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = entry.transform.to_flax(tensors[entry.torch_key])
    (tmp_path / "old").mkdir()
    variant.save(tmp_path / "old" / "config.json")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "old" / "state").absolute(), per_layer)
    checkpointer.wait_until_finished()
    loaded = load_checkpoint(tmp_path / "old").tensors
    assert loaded.keys() == tensors.keys()
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_flax_arrays_are_read_by_tensorstore_and_by_orbax_where_it_cannot(tmp_path, monkeypatch):
    """A flax checkpoint's arrays are read straight from their Zarr arrays, never through orbax's
    partial restore (which reads every array's metadata for each one); where TensorStore cannot
    open an array, orbax reads it. Both give the saved tensors."""
    import orbax.checkpoint as ocp

    from convert import checkpoints

    config = tiny_config("whisper")
    tensors = torch_to_numpy(TorchWhisper(config))
    save_checkpoint(tmp_path / "flax", "flax", config, tensors)

    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("orbax restored an array TensorStore can read")

    with monkeypatch.context() as patch:
        patch.setattr(ocp, "PyTreeCheckpointer", Refused)
        loaded = load_checkpoint(tmp_path / "flax").tensors
        assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())

    def unopenable(path):
        def read(name, index):
            raise checkpoints.ConversionError(f"{path}: cannot read {name}")

        return read

    monkeypatch.setattr(checkpoints, "_region_reader", unopenable)
    loaded = load_checkpoint(tmp_path / "flax").tensors
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_revision_1_memory_update_tensors_are_dropped_with_a_notice(tmp_path, capsys):
    """Model contract revision 2 removed augmented memory's `memory_update` linear; checkpoints
    that have it load without it, and say so."""
    from safetensors.numpy import save_file

    config = tiny_config("whisper", encoder_attention="memory", decoder_attention="memory", memory_update=True)
    tensors = torch_to_numpy(TorchWhisper(config))
    old = dict(tensors)
    for side, layers in (("encoder", config.n_audio_layer), ("decoder", config.n_text_layer)):
        for layer in range(layers):
            old[f"{side}.blocks.{layer}.attn.memory_update.weight"] = np.zeros((32, 32), np.float32)
            old[f"{side}.blocks.{layer}.attn.memory_update.bias"] = np.zeros((32,), np.float32)
    (tmp_path / "old").mkdir()
    config.save(tmp_path / "old" / "config.json")
    save_file(old, tmp_path / "old" / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.tensors.keys() == tensors.keys()
    err = capsys.readouterr().err
    assert "notice:" in err and "dropped 8 tensor(s) of layers the model contract removed" in err


def test_flax_checkpoints_store_layer_stacks_in_chunks_read_region_by_region(tmp_path, monkeypatch):
    """Layer stacks are written in chunks of at most `CHUNK_BYTES` (here a few hundred bytes, so
    that a tiny model's stacks span several) and read back region by region, each region equal
    to that part of the stack; other arrays stay one chunk. Checkpoints written before, in one
    chunk per array, still load (a region is then cut from the array read whole)."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    import convert.checkpoints
    from convert.core import place_flax_arrays

    config = tiny_config("whisper")
    tensors = {k: v.astype(np.float16) for k, v in torch_to_numpy(TorchWhisper(config)).items()}
    monkeypatch.setattr(convert.checkpoints, "CHUNK_BYTES", 512)
    save_checkpoint(tmp_path / "f", "flax", config, tensors)
    tree = ocp.StandardCheckpointer().metadata((tmp_path / "f" / "state").absolute()).item_metadata.tree
    fc1 = tree["decoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert np.prod(fc1.storage.chunk_shape) * 2 <= 512 < np.prod(fc1.shape) * 2
    table = tree["decoder"]["token_embedding"]["embedding"]
    assert tuple(table.storage.chunk_shape) == tuple(table.shape)

    loaded = load_checkpoint(tmp_path / "f").tensors
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    stacks = loaded.stacks
    whole = stacks["decoder.blocks.mlp.fc1.kernel"]
    region = stacks.spec("decoder.blocks.mlp.fc1.kernel").read_region
    for index in [(slice(None), slice(8, 16), slice(None)), (slice(1, 2), slice(None), slice(32, 96))]:
        assert np.array_equal(region(index), whole[index])

    # Placed region by region (one device here: the whole array is its one region), and the same
    # from a checkpoint of the earlier single-chunk layout.
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = {entry.flax_path: device for entry in build_plan(config)}
    placed = dict(place_flax_arrays(loaded, config, shardings))
    monkeypatch.setattr(convert.checkpoints, "CHUNK_BYTES", None)
    save_checkpoint(tmp_path / "single", "flax", config, tensors)
    single = load_checkpoint(tmp_path / "single").tensors
    assert single.stacks.spec("decoder.blocks.mlp.fc1.kernel").read_region is None
    again = dict(place_flax_arrays(single, config, shardings))
    assert placed.keys() == again.keys()
    assert all(np.array_equal(placed[k], again[k]) and placed[k].dtype == np.float32 for k in placed)
    assert np.array_equal(placed[("decoder", "blocks", "mlp", "fc1", "kernel")], whole.astype(np.float32))
