"""`bench/gpu_program.py`'s reading of a compiled program (here XLA:CPU's, the same HLO text the
deviceless GPU compilation gives): each launch and the bytes it writes, loops counted as they run."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from gpu_program import computations, kernels, report


def test_a_loop_body_counts_as_often_as_it_runs_and_is_the_per_token_report(capsys):
    """A seven-step loop between two launches of its own: the program's launches are the
    entry's own plus seven times the body's (each 64 x 64 float32 result 16,384 bytes), only the
    entry's own when loops are not followed, and a loop report (decoding's) is the body's."""

    @jax.jit
    def run(x, w):
        return jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ w) + i, x) * 2

    text = run.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    comps = computations(text)
    entry = re.search(r"^ENTRY %([\w.\-]+)", text, re.M).group(1)
    (body,) = re.findall(r"body=%([\w.\-]+)", text)
    own, per_step = kernels(comps, entry, loops=False), kernels(comps, body)
    assert per_step and any(size == 64 * 64 * 4 for _, size in per_step)
    assert sorted(kernels(comps, entry)) == sorted(own + per_step * 7)
    report("decode", text, loop=True)
    assert capsys.readouterr().out.startswith(f"decode: {len(per_step)} kernels per token")
