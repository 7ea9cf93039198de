"""Independent oracle: OpenAI's own model code (the `openai-whisper` package).

A `whisper.model.Whisper` with random weights is saved in OpenAI's `.pt` format, converted by the
`python -m convert` command into both frameworks, and both must reproduce OpenAI's logits.
"""

import dataclasses

import numpy as np
import pytest
import torch
import whisper
from conftest import OPENAI_DIMS as DIMS
from conftest import assert_close, convert_cli, flax_forward, random_openai_model, save_openai_model

from convert import load_checkpoint, load_flax_model, load_torch_model


@pytest.fixture(scope="module")
def openai_checkpoint(tmp_path_factory):
    model = random_openai_model(noise=0.1)
    path = save_openai_model(model, tmp_path_factory.mktemp("openai") / "tiny-random.pt")
    return model, path


def test_both_frameworks_reproduce_openai_logits(openai_checkpoint, tmp_path):
    model, path = openai_checkpoint
    convert_cli(path, tmp_path / "flax")
    convert_cli(path, tmp_path / "torch", "--to", "torch")
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((2, DIMS.n_mels, 2 * DIMS.n_audio_ctx)).astype(np.float32)
    tokens = rng.integers(0, DIMS.n_vocab, (2, DIMS.n_text_ctx))
    with torch.no_grad():
        reference = model(torch.from_numpy(mel), torch.from_numpy(tokens)).numpy()
        ours_t = load_torch_model(tmp_path / "torch").eval()(torch.from_numpy(mel), torch.from_numpy(tokens))
    flax_model = load_flax_model(tmp_path / "flax")
    flax_model.eval()
    assert_close(ours_t.numpy(), reference, 1e-4, "torch_ref vs OpenAI")
    assert_close(flax_forward(flax_model, mel, tokens), reference, 1e-4, "flax_whisper vs OpenAI")


def test_export_back_to_openai_is_exact_and_loadable(openai_checkpoint, tmp_path):
    _, path = openai_checkpoint
    convert_cli(path, tmp_path / "flax")
    convert_cli(tmp_path / "flax", tmp_path / "again.pt", "--to", "openai")
    original = torch.load(path, weights_only=True)
    exported = torch.load(tmp_path / "again.pt", weights_only=True)
    assert exported["dims"] == original["dims"]
    assert exported["model_state_dict"].keys() == original["model_state_dict"].keys()
    for key, value in original["model_state_dict"].items():
        assert torch.equal(exported["model_state_dict"][key], value), key
    reloaded = whisper.load_model(str(tmp_path / "again.pt"), device="cpu")
    assert reloaded.dims == DIMS


def test_openai_dims_become_the_whisper_preset(openai_checkpoint):
    _, path = openai_checkpoint
    config = load_checkpoint(path).config
    assert config.is_openai_compatible() and config.openai_dims() == dataclasses.asdict(DIMS)
    assert config.start_token_id == 50258


def test_float16_checkpoint_keeps_its_precision_and_models_load_as_float32(openai_checkpoint, tmp_path):
    """OpenAI ships float16 weights: a conversion keeps them float16 (read lazily, without torch),
    and a model built from them is float32 holding exactly the widened values."""
    model, _ = openai_checkpoint
    half = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"dims": dataclasses.asdict(DIMS), "model_state_dict": half}, tmp_path / "half.pt")
    tensors = load_checkpoint(tmp_path / "half.pt").tensors
    expected = half["decoder.blocks.1.mlp.2.weight"].numpy()
    assert tensors["decoder.blocks.1.mlp.fc2.weight"].dtype == np.float16
    assert np.array_equal(tensors["decoder.blocks.1.mlp.fc2.weight"], expected)
    torch_model = load_torch_model(tmp_path / "half.pt")
    assert torch.equal(torch_model.decoder.blocks[1].mlp.fc2.weight, half["decoder.blocks.1.mlp.2.weight"].float())
    flax_model = load_flax_model(tmp_path / "half.pt")
    kernel = np.asarray(flax_model.decoder.blocks.mlp.fc2.kernel[...])[1]  # (in, out) of layer 1
    assert kernel.dtype == np.float32 and np.array_equal(kernel, expected.astype(np.float32).T)


def test_openai_files_of_every_precision_and_layout_read_as_torch_reads_them(tmp_path):
    """The torch-free reader gives `torch.load`'s values for float32, float16, bfloat16 and
    non-contiguous (transposed, offset) tensors, and refuses code references by name."""
    import ml_dtypes

    from convert.pt_file import Refused, read_pt

    base = torch.randn(6, 10)
    tensors = {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "transposed": base.t(),
        "offset": base[2:, 3:7],
        "scalar": base[1, 1],
    }
    torch.save({"w": tensors}, tmp_path / "all.pt")
    read = read_pt(tmp_path / "all.pt")["w"]
    for key, tensor in tensors.items():
        expected = tensor.float().numpy() if key == "bf16" else tensor.numpy()
        value = read[key].read()
        assert value.shape == tuple(tensor.shape), key
        if key == "bf16":
            assert value.dtype == ml_dtypes.bfloat16
        assert np.array_equal(np.asarray(value, np.float32), expected.astype(np.float32)), key

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Refused, match="print"):
        read_pt(tmp_path / "evil.pt")
