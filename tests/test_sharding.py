"""Sharding by rules: logical axis names -> mesh axes, the vocabulary padded so the token table
shards on it, and the compiled train step of a whisper-small model on an 8-device mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from flax_whisper import Whisper
from flax_whisper.model import cross_entropy, shift_right
from tests.conftest import tiny_config
from train.sharding import MESH_AXES, logical_spec, weight_spec
from whisper_config import ConfigError


def mesh(data: int, fsdp: int, tensor: int = 1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_rules_map_logical_axes_to_mesh_axes_each_used_once():
    fsdp = mesh(1, 8)
    assert logical_spec(("layers", "embed", "mlp"), (12, 768, 3072), fsdp) == PartitionSpec(None, "fsdp", None)
    # The table's vocabulary takes "fsdp" first; its width then finds the axis used.
    assert logical_spec(("vocab", "embed"), (51968, 768), fsdp) == PartitionSpec("fsdp", None)
    both = mesh(2, 2, 2)
    assert logical_spec(("layers", "embed", "mlp"), (12, 768, 3072), both) == PartitionSpec(None, "fsdp", "tensor")
    assert logical_spec(("vocab", "embed"), (51968, 768), both) == PartitionSpec(("tensor", "fsdp"), None)
    assert logical_spec(("batch", "length", "embed_act"), (8, 448, 768), both) == PartitionSpec(
        ("data", "fsdp"), None, None
    )
    # A dimension the axes do not divide drops the innermost until they do; axes of size 1 are skipped.
    assert logical_spec(("vocab", "embed"), (51865, 768), both) == PartitionSpec(None, "fsdp")
    assert logical_spec(("batch", "length"), (2, 448), mesh(2, 4)) == PartitionSpec("data", None)
    with pytest.raises(ConfigError, match="no sharding rule for the logical axis 'width'"):
        logical_spec(("width",), (8,), fsdp)


def test_fsdp_reaches_every_large_array_and_leaves_small_ones_whole():
    fsdp = mesh(1, 8)
    assert weight_spec((4, 4), ("embed", "mlp"), fsdp) == PartitionSpec()  # small: replicated
    # Adafactor's factored moment of a (layers, embed, mlp) kernel has no names of its own.
    assert weight_spec((12, 3072), None, fsdp) == PartitionSpec(None, "fsdp")
    # A width that "fsdp" does not divide: FSDP takes the largest dimension that it does.
    assert weight_spec((2, 36, 1024), ("layers", "embed", "mlp"), fsdp) == PartitionSpec(None, None, "fsdp")


def test_padded_vocabulary_masks_its_rows_and_leaves_the_model_unchanged():
    config = tiny_config(n_vocab=258, decoder_start_token_id=257)
    assert config.padded_vocab == 384
    model = Whisper(config, rngs=nnx.Rngs(3))
    table = model.decoder.token_embedding.embedding[...]
    assert table.shape == (384, config.n_text_state) and not np.any(table[258:])
    rng = np.random.default_rng(0)
    mel = jnp.asarray(rng.standard_normal((2, config.n_mels, 2 * config.n_audio_ctx)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 258, (2, 5)))
    inputs = shift_right(labels, config.start_token_id)
    padded, public = nnx.jit(lambda m: (m.logits(mel, inputs, padded_vocab=True), m(mel, inputs)))(model)
    assert public.shape == (2, 5, 258) and padded.shape == (2, 5, 384)
    assert np.all(np.isneginf(padded[..., 258:])) and np.array_equal(padded[..., :258], public)
    # The loss over the padded logits is the loss over the true vocabulary, and no gradient
    # reaches the padding rows.
    loss, grads = nnx.jit(nnx.value_and_grad(lambda m: m.loss(mel, labels)))(model)
    np.testing.assert_allclose(loss, cross_entropy(public, labels), rtol=1e-6)
    table_grad = grads["decoder"]["token_embedding"]["embedding"][...]
    assert np.all(np.isfinite(table_grad)) and not np.any(table_grad[258:]) and np.any(table_grad[:258])


def test_checkpoints_keep_the_true_vocabulary(tmp_path):
    import orbax.checkpoint as ocp

    from convert import load_checkpoint, save_checkpoint
    from convert.core import flax_to_torch, new_flax_model

    config = tiny_config()
    model = Whisper(config, rngs=nnx.Rngs(0))
    tensors = flax_to_torch(model)
    assert tensors["decoder.token_embedding.weight"].shape == (config.n_vocab, config.n_text_state)
    save_checkpoint(tmp_path / "flax", "flax", config, tensors)
    stored = ocp.StandardCheckpointer().metadata((tmp_path / "flax" / "state").absolute()).item_metadata.tree
    assert tuple(stored["decoder"]["token_embedding"]["embedding"].shape) == (config.n_vocab, config.n_text_state)
    loaded = new_flax_model(config, load_checkpoint(tmp_path / "flax").tensors)
    np.testing.assert_array_equal(
        loaded.decoder.token_embedding.embedding[...], model.decoder.token_embedding.embedding[...]
    )


SMALL_STEP = """
import json, sys
import jax, numpy as np
from flax import nnx
from flax_whisper import Whisper
from train.config import TrainConfig
from train.loop import sharded_train_step
from train.sharding import batch_sharding, make_mesh, state_shardings
from train.step import Graphs, make_optimizer, new_state
from whisper_config import ModelConfig

fsdp, tensor = int(sys.argv[1]), int(sys.argv[2])
# Scanned: the layer layout shards no array differently, and the 12 + 12 step compiles in a third
# of the time it takes unrolled (the default at this depth).
model_config = ModelConfig.from_preset("whisper", "small", unroll_layers=False)
config = TrainConfig(optimizer="adamw", batch_size=8, run_dir="unused")
mesh = make_mesh(fsdp=fsdp, tensor=tensor)
tx = make_optimizer(config)
make = lambda: Whisper(model_config, rngs=nnx.Rngs(0))
abstract = jax.eval_shape(lambda: new_state(make(), tx))  # shapes only: nothing is allocated
step = sharded_train_step(config, Graphs.of(nnx.eval_shape(make)), tx, mesh, state_shardings(abstract, mesh))
batch = {"mel": jax.ShapeDtypeStruct((8, 80, 3000), np.float32, sharding=batch_sharding(mesh)),
         "labels": jax.ShapeDtypeStruct((8, 448), np.int32, sharding=batch_sharding(mesh))}
compiled = step.lower(abstract, batch).compile()
state_in = compiled.input_shardings[0][0]  # what the compiled program takes
leaves, shardings = jax.tree.leaves(abstract), jax.tree.leaves(state_in)
total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)
per_device = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                 for a, s in zip(leaves, shardings, strict=True))
specs = jax.tree_util.tree_flatten_with_path(state_in.params)[0]
print(json.dumps({
    "total": total, "per_device": per_device,
    "arguments": compiled.memory_analysis().argument_size_in_bytes,
    "specs": {jax.tree_util.keystr(p): list(s.spec) for p, s in specs},
}))
"""


# The main suite keeps the mesh with both axes; FSDP alone over 8 devices is `slow`.
@pytest.mark.parametrize(
    "fsdp, tensor", [pytest.param(8, 1, marks=pytest.mark.slow), (4, 2)], ids=["fsdp8", "fsdp4-tensor2"]
)
def test_compiled_whisper_small_step_holds_an_eighth_of_the_state_per_device(fsdp, tensor):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    done = subprocess.run(
        [sys.executable, "-c", SMALL_STEP, str(fsdp), str(tensor)],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # whisper-small with AdamW: 241.7M parameters, float32, three copies (weights, mu, nu).
    assert 2.85e9 < result["total"] < 2.95e9
    # Every large array is split 8 ways; what stays whole (norms, biases, counters) is < 0.1%.
    # With a tensor axis, the arrays it does not split (convolutions, position table, norms) are
    # split 4 ways by "fsdp" alone: 1% more.
    assert result["total"] / 8 <= result["per_device"] < result["total"] / 8 * (1.001 if tensor == 1 else 1.02)
    assert result["arguments"] < result["total"] / 8 * 1.02  # the program's own count, batch included
    specs = {k: PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in v)) for k, v in result["specs"].items()}
    embedding = next(v for k, v in specs.items() if "token_embedding" in k)
    fc1 = next(v for k, v in specs.items() if "decoder" in k and "fc1']['kernel" in k)
    out = next(v for k, v in specs.items() if "decoder" in k and "cross_attn']['out']['kernel" in k)
    if tensor == 1:
        assert embedding == PartitionSpec("fsdp", None)  # on the (padded) vocabulary
        assert fc1 == PartitionSpec(None, "fsdp", None)  # (layers, embed, mlp)
        assert out == PartitionSpec(None, None, "fsdp")  # (layers, heads, embed)
    else:
        assert embedding == PartitionSpec(("tensor", "fsdp"), None)
        assert fc1 == PartitionSpec(None, "fsdp", "tensor")
        assert out == PartitionSpec(None, "tensor", "fsdp")


def test_a_mesh_that_does_not_fit_the_devices_is_named():
    import jax

    from train.sharding import make_mesh

    eight = [jax.devices()[0]] * 8  # the checks come before any device is used
    with pytest.raises(ConfigError, match="mesh_fsdp=3 x mesh_tensor=1 does not divide the 8 devices"):
        make_mesh(fsdp=3, devices=eight)
    with pytest.raises(ConfigError, match=r"a 2 x 2 x 1 \(data x fsdp x tensor\) mesh needs 4 devices, found 8"):
        make_mesh(data=2, fsdp=2, devices=eight)

    class Chip:  # a device of another process, as a multi-host topology lists them
        def __init__(self, process_index):
            self.process_index = process_index

    two_hosts = [Chip(0)] * 4 + [Chip(1)] * 4
    with pytest.raises(ConfigError, match=r"mesh_tensor=8 must divide .* \(found 4 on process 0, 4 on process 1\)"):
        make_mesh(tensor=8, devices=two_hosts)
    interleaved = [Chip(0), Chip(1)] * 4  # groups of 2 neighbours would each straddle both hosts
    with pytest.raises(ConfigError, match="mesh_tensor=2 must divide the devices of each process"):
        make_mesh(tensor=2, devices=interleaved)
    # a slice whose chips all belong to this process takes any tensor axis that divides them
    assert dict(make_mesh(fsdp=2, tensor=4, devices=jax.devices() * 8).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
