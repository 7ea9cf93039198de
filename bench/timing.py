"""Shared by the benchmarks: median wall time of a callable after warm-up calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """`run()` `warmup` times untimed (compiles, caches), then the median of `repeats` timed calls.
    `run` must block until its work is done (`jax.block_until_ready`, `torch.cuda.synchronize`)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Results(dict):
    """Measurements by name, each printed as it lands, so a run cut short (a time limit on a
    lent accelerator) still shows what it measured before the final table."""

    def __setitem__(self, name: str, value) -> None:
        super().__setitem__(name, value)
        seconds = value["seconds"] if isinstance(value, dict) else value
        print(f"  measured {name}: {seconds * 1e3:.1f} ms", flush=True)
