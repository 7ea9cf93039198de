"""What every process must agree on before a training step, agreed host to host.

Each process pads its block of a global batch to its own buckets, and a signal (SIGTERM, Ctrl-C)
may reach one process only; yet every process must give the step the same shapes, and all must
stop after the same step. Before each step every process publishes its block's lengths and
whether it was asked to stop in the key-value store of JAX's coordination service (the one
`jax.distributed.initialize` starts), waits at that step's barrier, and reads what the others
published. Nothing runs on the devices and nothing waits for them: an all-gather on the devices
would queue behind the step still running and hold the host until it ended, at every step, so
the next step could only be dispatched once the devices were idle. The hosts now keep ahead of
their devices, as one process does.

A process waits for its devices only after it has dispatched the step it waits for (reading a
log step's metrics, evaluating, saving); every other process has passed that step's barrier and
dispatched it too, so the step's collectives complete and no barrier waits on them.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax

# How long a process waits at a step's barrier for the slowest one (a host still compiling the
# first step, loading its batch, or writing a checkpoint) before giving up with an error.
BARRIER_TIMEOUT_S = 1800

_runs = itertools.count()  # every process runs the same sequence of training runs: one key space each


class StepAgreementError(RuntimeError):
    """The processes could not agree on a step (one of them died or stopped answering)."""


@dataclasses.dataclass(frozen=True)
class Agreed:
    audio: int  # samples every process pads its block's audio to: the longest block's
    labels: int  # label positions, likewise
    stop: bool  # some process was asked to stop: every one stops after this step


class StepAgreement:
    """`agree(step, audio, labels, stop)` -> `Agreed`, the same in every process of the run."""

    def __init__(self, timeout_s: float = BARRIER_TIMEOUT_S):
        self.timeout_ms = int(timeout_s * 1000)
        self.processes = jax.process_count()
        self.process = jax.process_index()
        self.client = None
        if self.processes > 1:
            from jax._src import distributed  # the coordination service's client (orbax uses it too)

            self.client = distributed.global_state.client
            if self.client is None:
                raise StepAgreementError("several processes but no jax.distributed client: call initialize first")
        self.prefix = f"whisper-train/{next(_runs)}"

    def agree(self, step: int, audio: int, labels: int, stop: bool) -> Agreed:
        if self.client is None:
            return Agreed(audio, labels, stop)
        key = f"{self.prefix}/{step}"
        try:
            self.client.key_value_set(f"{key}/{self.process}", f"{audio},{labels},{int(stop)}", allow_overwrite=True)
            self.client.wait_at_barrier(key, self.timeout_ms)
            entries = self.client.key_value_dir_get(f"{key}/")
            # Every process has read the previous step's entries before it reached this barrier:
            # one process removes them, the whole directory in one call (the coordinator serves
            # three calls per process and step, and this one).
            if self.process == 0:
                self.client.key_value_delete(f"{self.prefix}/{step - 1}")
        except Exception as err:  # jaxlib raises its own runtime error types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StepAgreementError(
                f"process {self.process}: the {self.processes} processes did not all reach step {step} "
                f"within {self.timeout_ms // 1000} s ({first}); did another process fail?"
            ) from None
        if len(entries) != self.processes:
            raise StepAgreementError(f"step {step}: {len(entries)} of {self.processes} processes published")
        values = [tuple(int(v) for v in value.split(",")) for _, value in entries]
        return Agreed(max(v[0] for v in values), max(v[1] for v in values), any(v[2] for v in values))
