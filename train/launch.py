"""`python -m train --processes N ...`: N cooperating training processes on this machine.

For tests and for debugging multi-host code on one computer. Each process is `python -m train`
with the same flags plus `--distributed`, told by environment variables where the coordinator is
(127.0.0.1 on a free port), how many processes there are and which one it is; each sees the
devices `XLA_FLAGS` gives it (on a CPU, `--xla_force_host_platform_device_count=K` makes K).
Process 0's output is streamed; the others' goes to their own log files, whose tails are shown
if they fail. When any process fails, the rest are stopped and the exit status is non-zero.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COORDINATOR_HOST = "127.0.0.1"  # local runs only: nothing else is ever contacted
# How long a process waits for the coordinator before failing (instead of hanging).
CONNECT_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((COORDINATOR_HOST, 0))
        return probe.getsockname()[1]


def strip_processes(argv: list[str]) -> list[str]:
    """`argv` without `--processes N` / `--processes=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m train argv --distributed` as `processes` cooperating processes; the worst
    exit status (0 when all succeed)."""
    if processes < 1:
        print(f"error: --processes must be at least 1, got {processes}", file=sys.stderr)
        return 2
    address = f"{COORDINATOR_HOST}:{free_port()}"
    logs = Path(tempfile.mkdtemp(prefix="train-processes-"))
    children: list[subprocess.Popen] = []
    files = []
    for index in range(processes):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(index),
        }
        command = [sys.executable, "-m", "train", *strip_processes(argv), "--distributed"]
        if index == 0:
            children.append(subprocess.Popen(command, env=env))
        else:
            log = open(logs / f"process-{index}.log", "w")  # noqa: SIM115 (closed below)
            files.append(log)
            children.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))

    def forward(signum, _frame):  # Ctrl-C / SIGTERM reach every process (each saves and stops)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        running = set(range(processes))
        while running:
            for index in sorted(running):
                code = children[index].poll()
                if code is None:
                    continue
                running.discard(index)
                if code != 0 and status == 0:
                    status = code
                    _report_failure(index, code, logs)
                    _stop(children)
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for log in files:
            log.close()
    return status


def _stop(children: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM every running process, then kill what is left after `grace_s`."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _report_failure(index: int, code: int, logs: Path) -> None:
    tail = ""
    log = logs / f"process-{index}.log"
    if index and log.is_file():
        lines = log.read_text(errors="replace").splitlines()[-15:]
        tail = "\n".join(f"  [process {index}] {line}" for line in lines)
    print(f"error: process {index} of the run exited with status {code}; stopping the others", file=sys.stderr)
    if tail:
        print(tail, file=sys.stderr)
