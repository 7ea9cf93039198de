"""Shared by the benchmarks: median wall times after warm-up calls, rounds that time every
competitor again in turn, so that a shared machine's slow drifts fall on all of them alike, the
peak a model FLOPs utilisation is taken of, the processor a table ran on, and command-line lists
checked as they are read."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence


def comma_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse `type`: "a,b" -> ["a", "b"], each one of `allowed`, else argparse's usage error."""

    def parse(text: str) -> list[str]:
        items = text.split(",")
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}: choose from {', '.join(allowed)}"
            )
        return items

    return parse


def processor(cpuinfo: str | None = None) -> str:
    """One line for a benchmark's header: the CPU's model, its cores and its widest vector
    instructions, read from Linux's /proc/cpuinfo (`cpuinfo`: that file's text). This project's
    2-core EPYC machines come with and without AVX-512, and the ratios to torch differ between the
    two kinds (bench/NOTES.md): a table compares with another from the same kind of machine."""
    import os

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            import platform

            return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    first: dict[str, str] = {}
    cores = 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        cores += key == "processor"
        first.setdefault(key, value.strip())
    flags = set(first.get("flags", "").split())
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_bf16", "BF16"), ("amx_bf16", "AMX")) if flag in flags]
        vector = "AVX-512" + (f" with {' and '.join(extras)}" if extras else "")
    elif "avx2" in flags:
        vector = "AVX2 (no AVX-512)"
    else:
        vector = "no AVX2"
    family = f" (family {first['cpu family']}, model {first['model']})" if "cpu family" in first else ""
    return f"cpu: {first.get('model name', 'unknown')}{family}, {cores or os.cpu_count()} cores, {vector}"


def call_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """`run()` `warmup` times untimed (compiles, caches), then the seconds of `repeats` timed calls.
    `run` must block until its work is done (`jax.block_until_ready`, `torch.cuda.synchronize`)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median of `call_seconds`."""
    return statistics.median(call_seconds(run, repeats, warmup))


class Results(dict):
    """Measurements by name, each printed as it lands, so a run cut short (a time limit on a
    lent accelerator) still shows what it measured before the final table. A value is seconds,
    or a dict with "seconds" and other figures."""

    def __setitem__(self, name: str, value) -> None:
        super().__setitem__(name, value)
        seconds = value["seconds"] if isinstance(value, dict) else value
        print(f"  measured {name}: {seconds * 1e3:.1f} ms", flush=True)


class Rounds:
    """Interleaved rounds. `time(name, run, warmup)` is `median_seconds` (round 1) and,
    when there are more rounds, keeps `run` (and so whatever it holds: one round keeps nothing,
    for accelerators whose memory the competitors share one after another). `rest(results)` then
    times every kept `run` again, each in turn, `rounds - 1` times, and sets each result to the
    median of its rounds' medians. `rounds` None: three on a CPU (a shared machine drifts by more
    than the gaps measured), one on an accelerator."""

    HELP = "time every competitor again, in turn, this often (default: 3 on a CPU, 1 elsewhere)"

    def __init__(self, rounds: int | None, repeats: int, platform: str):
        self.rounds = rounds or (3 if platform == "cpu" else 1)
        self.repeats = repeats
        self.runs: dict[str, Callable[[], object]] = {}
        self.times: dict[str, list[float]] = {}

    def time(self, name: str, run: Callable[[], object], warmup: int = 1) -> float:
        seconds = median_seconds(run, self.repeats, warmup)
        self.times[name] = [seconds]
        if self.rounds > 1:
            self.runs[name] = run
        return seconds

    def rest(self, results: Results) -> None:
        for number in range(2, self.rounds + 1):
            print(f"round {number} of {self.rounds}", flush=True)
            for name, run in self.runs.items():
                self.times[name].append(median_seconds(run, self.repeats, warmup=0))
        for name in self.runs:
            seconds = statistics.median(self.times[name])
            if isinstance(results[name], dict):
                dict.__setitem__(results, name, {**results[name], "seconds": seconds})
            else:
                dict.__setitem__(results, name, seconds)

    def ratios(self, name: str, reference: str, scale: float = 1.0) -> str:
        """The lowest and highest of `name`'s time over `reference`'s, round by round, times
        `scale` (a ratio of work done, e.g. of tokens generated) ("" for one round)."""
        if len(self.times.get(name, ())) < 2 or len(self.times.get(reference, ())) < 2:
            return ""
        ratios = [scale * a / b for a, b in zip(self.times[name], self.times[reference], strict=True)]
        return f"{min(ratios):.2f}-{max(ratios):.2f}x"


# Dense peak TFLOP/s by device kind and compute precision (bf16; float32 means TF32 on GPUs).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def matmul_rate(precision: str, size: int, repeats: int = 20) -> float:
    """FLOP/s of XLA's product of two `size x size` matrices in `precision` on the default
    device, accumulated in float32 (so that a CPU's bfloat16 dot-product instructions count: XLA:CPU
    uses them only for a float32 result): the fastest of `repeats` jitted calls after warm-up, a
    ceiling (a busy moment of a shared machine only lowers a rate, so the best call is the closest
    to what the device can do)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(precision))
    product = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    return 2 * size**3 / min(call_seconds(lambda: jax.block_until_ready(product(a)), repeats, warmup=3))


def peak_flops(precision: str, given_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s, what it is): the peak a model FLOPs utilisation is taken of. `given_tflops`;
    else a known accelerator's dense peak (`PEAK_TFLOPS`); else, on a CPU (whose clocks and vector
    units vary by machine) or an unknown device, the rate XLA's own product of two large square
    matrices reaches here and now: the ceiling the model's products meet on this machine, so
    the utilisation says how much of the time goes to anything else."""
    import jax

    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, table in PEAK_TFLOPS.items():
        if name in kind:
            return table[precision] * 1e12, f"{name} dense {precision} peak"
    size = 2048 if jax.default_backend() == "cpu" else 8192
    rate = matmul_rate(precision, size)
    return rate, f"XLA's {size} x {size} {precision} product measured on this {kind}"


# Operations that hold others (their time is their children's): left out of the summary.
CONTAINERS = ("while", "conditional", "call", "command_buffer")


def busy_seconds(spans: list[tuple[int, int]]) -> float:
    """The length of the union of (start, end) intervals in nanoseconds, in seconds: the time at
    least one of them covers."""
    covered, end = 0, None
    for start, stop in sorted(spans):
        if end is None or start > end:
            covered, end = covered + stop - start, stop
        elif stop > end:
            covered, end = covered + stop - end, stop
    return covered / 1e9


def profile(directory: str, run: Callable[[], object], calls: int = 1, top: int = 25) -> None:
    """Trace `calls` calls of `run` into `directory` (a jax.profiler trace, for TensorBoard or
    Perfetto) and print the XLA operations that took the most time: per call, each one's time
    and count, longest first. A GPU's kernels come from its device planes' "XLA Ops" lines; on a
    CPU, the host's events that name an HLO operation. A loop-invariant copy that a loop repeats
    shows up as a `copy` or `transpose` fusion run once per iteration.

    Then how busy the calls kept the device: their wall time, the time at least one operation
    ran (the union of the operations' intervals; on a CPU several run at once, one per core, so
    their times add up to more than the wall), and the rest, when none ran: a GPU waiting for
    kernel launches or the host, CPU cores waiting on work XLA hands to a library outside its
    traced operations (Eigen's products and convolutions)."""
    import glob
    import os
    from collections import Counter

    import jax

    with jax.profiler.trace(directory):
        began = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - began) / calls
    path = max(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    planes = list(jax.profiler.ProfileData.from_file(path).planes)  # iterable once
    devices = [plane for plane in planes if plane.name.startswith("/device:")]
    if devices:
        events = [ev for plane in devices for line in plane.lines if line.name == "XLA Ops" for ev in line.events]
    else:
        events = [
            ev
            for plane in planes
            for line in plane.lines
            for ev in line.events
            if any(name == "hlo_op" for name, _ in ev.stats)
        ]
    seconds, counts, spans = Counter(), Counter(), []
    for ev in events:
        if not ev.name.startswith(CONTAINERS):
            seconds[ev.name] += ev.duration_ns / 1e9 / calls
            counts[ev.name] += 1
            spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    total = sum(seconds.values())
    busy = busy_seconds(spans) / calls
    print(f"profile: {path}; {total * 1e3:.1f} ms of XLA operations per call ({'device' if devices else 'host'})")
    print(
        f"  wall {wall * 1e3:.1f} ms a call; some operation running {busy * 1e3:.1f} ms "
        f"({busy / wall:.0%}); none {max(wall - busy, 0.0) * 1e3:.1f} ms"
    )
    for name, spent in seconds.most_common(top):
        print(f"  {spent * 1e3:9.2f} ms {counts[name] / calls:7.0f}x  {name}")
