"""`bench/timing.profile`, behind the benchmarks' `--profile`: the operations it lists, per call."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from timing import busy_seconds, profile


def test_a_loop_body_operation_is_counted_once_per_iteration(tmp_path, capsys):
    """Seven iterations of a loop that multiplies by a matrix: over two traced calls, the summary
    lists an operation run 7 times per call, and the loop itself (a container) not at all."""

    @jax.jit
    def run(x, w):
        return jax.lax.fori_loop(0, 7, lambda _, y: jnp.tanh(y @ w), x)

    x, w = jnp.ones((64, 64)), jnp.eye(64) * 0.5
    run(x, w).block_until_ready()
    profile(str(tmp_path), lambda: run(x, w).block_until_ready(), calls=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("profile: ") and "of XLA operations per call" in lines[0]
    counts = {
        m.group(2): float(m.group(1)) for m in (re.search(r"ms +(\d+)x +(\S+)$", line) for line in lines[1:]) if m
    }
    assert 7 in counts.values(), lines
    assert not any(name.startswith("while") for name in counts), lines
    assert list(tmp_path.rglob("*.xplane.pb")), "the trace is kept for TensorBoard or Perfetto"
    wall, busy, idle = (
        float(v) for v in re.search(r"wall ([\d.]+) ms .* running ([\d.]+) ms .* none ([\d.]+) ms", lines[1]).groups()
    )
    total = float(re.search(r"; ([\d.]+) ms of XLA operations", lines[0]).group(1))
    assert 0 < busy <= min(wall, total + 0.05) and abs(wall - busy - idle) <= 0.15, lines[:2]


def test_busy_time_is_the_union_of_the_operations_intervals():
    """Overlapping intervals count once and gaps not at all: [0, 4] and [1, 7] overlap, [2, 6]
    lies inside [1, 7], [11, 11.5] inside [10, 12]; together they cover 7 + 2 ns."""
    spans = [(10, 12), (0, 4), (2, 6), (1, 7), (11, 11.5)]
    assert busy_seconds(spans) * 1e9 == 9
    assert busy_seconds([]) == 0
