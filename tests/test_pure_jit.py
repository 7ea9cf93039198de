"""`flax_whisper.pure_jit`: a jitted forward that hands back its outputs and nothing else."""

import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from flax import nnx

from flax_whisper import Whisper, pure_jit


def encoder_and_mel():
    config = tiny_config()
    model = Whisper(config, rngs=nnx.Rngs(0))
    model.eval()
    mel = np.random.default_rng(0).standard_normal((2, config.n_mels, 2 * config.n_audio_ctx)).astype(np.float32)
    return model, jnp.asarray(mel)


def test_outputs_are_nnx_jits_and_the_weights_stay_where_they_are():
    """The same encoder output as `nnx.jit`, bit for bit; `nnx.jit` puts a new array (its copy of
    the weight) into the module after each call, `pure_jit` leaves every weight the array it was."""
    model, mel = encoder_and_mel()
    kernel = model.encoder.conv1.kernel
    before = kernel.get_value()
    ours = pure_jit(lambda m, x: m.encoder(x))(model, mel)
    assert kernel.get_value() is before
    theirs = nnx.jit(lambda m, x: m.encoder(x))(model, mel)
    assert kernel.get_value() is not before  # what pure_jit avoids: a copy handed back
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_call_sees_the_weights_the_model_holds_then():
    """The model is split at each call: weights changed between calls are the ones used, with no
    second compile."""
    model, mel = encoder_and_mel()
    traces = []

    def encode(m, x):
        traces.append(1)
        return m.encoder(x)

    encode = pure_jit(encode)
    first = np.asarray(encode(model, mel))
    model.encoder.ln_post.bias.set_value(model.encoder.ln_post.bias.get_value() + 1.0)
    second = np.asarray(encode(model, mel))
    np.testing.assert_allclose(second, first + 1.0, rtol=0, atol=1e-5)
    assert len(traces) == 1
