"""`python -m train [--config FILE] [--FLAG VALUE ...]`: see `python -m train --help` and the README."""

from __future__ import annotations

import json
import os
import sys
import threading

from train.config import from_args
from whisper_config import ConfigError
from whisper_io.huge_pages import restart_with_huge_pages


def main(argv: list[str] | None = None) -> int:
    from convert.rules import ConversionError
    from train.agreement import StepAgreementError
    from train.checkpointing import CheckpointError
    from train.data import DataError
    from train.loop import Trainer, TrainingError
    from train.run_folder import RunFolderError
    from whisper_io import TokenizerError
    from whisper_io.outputs import OutputError

    errors = (
        CheckpointError,
        ConfigError,
        ConversionError,
        DataError,
        OutputError,
        RunFolderError,
        StepAgreementError,
        TokenizerError,
        TrainingError,
        OSError,
    )
    try:
        config, args = from_args(argv)
        if args.print_config:
            model = None if config.init_from else config.model_config().to_dict()  # validates the model
            print(json.dumps({"train": config.to_dict(), "model": model, "run_dir": str(config.run_path)}, indent=2))
            return 0
        if args.processes is not None:
            from train.launch import launch

            return launch(args.processes, sys.argv[1:] if argv is None else argv)
        if args.distributed:
            initialize_distributed()
        from flax_whisper.compile_cache import use_compile_cache

        use_compile_cache(args.compile_cache)
        result = Trainer(config).run()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        _leave_distributed_run(2)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped without saving (the last checkpoint is kept)", file=sys.stderr)
        return 130
    summary = {"step": result.step, "stopped_early": result.stopped_early, "skipped_steps": result.skipped_steps}
    summary.update(result.data)
    if result.eval:
        summary.update({k: v for k, v in result.eval.items() if k != "examples"})
    print(json.dumps(summary))
    return 0


def _leave_distributed_run(code: int) -> None:
    """After an error in a run of several processes, exit now: JAX's shutdown at interpreter exit
    waits at a barrier for every process, which one that stopped at another point (or already
    left) never reaches, and that wait is minutes long. Nothing is left to save by then."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()`: TPU pods and SLURM clusters configure themselves; elsewhere
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID say where the coordinator is,
    how many processes there are and which one this is. CPU processes use gloo collectives. A
    coordinator that cannot be reached is an error after JAX_INITIALIZATION_TIMEOUT seconds
    (default 60), never a hang."""

    import jax

    from train.loop import TrainingError

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ
    numbers = {}
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_INITIALIZATION_TIMEOUT"):
        if env.get(name):
            try:
                numbers[name] = int(env[name])
            except ValueError:
                raise TrainingError(f"{name} must be an integer, got {env[name]!r}") from None
    address = env.get("JAX_COORDINATOR_ADDRESS")
    timeout = numbers.get("JAX_INITIALIZATION_TIMEOUT", 60)
    expected = numbers.get("JAX_NUM_PROCESSES")
    if expected is not None and not 0 <= numbers.get("JAX_PROCESS_ID", 0) < expected:
        raise TrainingError(f"JAX_PROCESS_ID={numbers['JAX_PROCESS_ID']} must be in [0, JAX_NUM_PROCESSES={expected})")
    if address and numbers.get("JAX_PROCESS_ID", 0) != 0:
        wait_for_coordinator(address, timeout)  # JAX's own client aborts the process instead
    bind = env.get("JAX_COORDINATOR_BIND_ADDRESS")
    if address and address.startswith("127.0.0.1:") and not bind:
        bind = address  # a local run listens on the loopback only
    # The runtime's threads (the coordination client, the CPU backend's collective transport) are
    # started with SIGTERM and SIGINT blocked, so a preemption signal reaches the main thread --
    # which asks the run to stop -- and never interrupts a collective's socket I/O half-way.
    import signal

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    # When fewer processes join than the coordinator waits for (one not started, or started with
    # another JAX_NUM_PROCESSES), JAX's client aborts the process with a stack trace once its own
    # timeout passes; this watchdog says what is wrong and exits first.
    watchdog = threading.Timer(timeout, _not_all_joined, args=(address, expected, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=expected,
            process_id=numbers.get("JAX_PROCESS_ID"),
            initialization_timeout=timeout + 10,
            coordinator_bind_address=bind,
        )
        jax.devices()  # the backend and its threads, created now, under the mask
    except (ValueError, TypeError, RuntimeError) as err:
        from whisper_io.messages import first_line

        raise TrainingError(f"jax.distributed.initialize failed (coordinator {address}): {first_line(err)}") from None
    finally:
        watchdog.cancel()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _check_process_counts(expected)


def _not_all_joined(address: str | None, expected: int | None, timeout_s: float) -> None:
    told = f" (this one was told JAX_NUM_PROCESSES={expected})" if expected else ""
    sys.stderr.write(
        f"error: not every process joined the coordinator at {address or '(auto-detected)'} within "
        f"{timeout_s:g} s{told}: is every process started, with the same JAX_COORDINATOR_ADDRESS and "
        "JAX_NUM_PROCESSES?\n"
    )
    sys.stderr.flush()
    os._exit(2)


def _check_process_counts(expected: int | None) -> None:
    """Every process must have been told the number of processes the coordinator runs with (the
    coordinator's own count wins silently otherwise): compared across all of them, so all stop."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from train.loop import TrainingError

    told = multihost_utils.process_allgather(np.asarray([-1 if expected is None else expected], np.int32))
    told = [int(n) for n in np.asarray(told).reshape(-1)]
    if any(n not in (-1, jax.process_count()) for n in told):
        said = ", ".join(f"process {i}: {'unset' if n == -1 else n}" for i, n in enumerate(told))
        raise TrainingError(
            f"the processes disagree on JAX_NUM_PROCESSES ({said}); the coordinator runs "
            f"{jax.process_count()}: give every process the same value"
        )


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once the coordinator at HOST:PORT accepts connections; `TrainingError` after
    `timeout_s` seconds of trying."""
    import socket
    import time

    from train.loop import TrainingError

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise TrainingError(f"JAX_COORDINATOR_ADDRESS must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise TrainingError(
                    f"cannot reach the coordinator at {address} within {timeout_s:g} s ({err.strerror or err}); "
                    "is process 0 running, and are JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES the same everywhere?"
                ) from None
            time.sleep(0.5)


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
