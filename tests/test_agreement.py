"""`train.agreement.StepAgreement` between two real processes (coordinator on 127.0.0.1): the same
answer in both, reached while their devices are still busy, and an error, not a hang, when a
process never arrives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from train.launch import free_port

ROOT = Path(__file__).resolve().parent.parent

# argv: port, process index, barrier timeout (s), then a JSON list of [step, audio, labels, stop] to agree on.
PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, index, timeout, plan = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index, initialization_timeout=60)
    from train.agreement import StepAgreement, StepAgreementError

    @jax.jit
    def busy(x):  # seconds of work on this process's device
        return jax.lax.fori_loop(0, 1000, lambda i, y: jnp.tanh(y @ y), x)

    x = jnp.full((500, 500), 1e-3)
    busy = busy.lower(x).compile()
    agreement = StepAgreement(timeout_s=timeout)
    agreement.agree(0, 0, 0, False)  # both processes here: from now on neither waits for the other to start
    running = busy(x)
    out = {"agreed": []}
    try:
        for step, audio, labels, stop in plan:
            agreed = agreement.agree(step, audio, labels, stop)
            out["agreed"].append([agreed.audio, agreed.labels, agreed.stop])
    except StepAgreementError as err:
        out["error"] = str(err)
    if index == 0:  # it removes each step's entries once every process has read them
        out["kept"] = sorted(k for k, _ in agreement.client.key_value_dir_get(agreement.prefix + "/"))
    out["device_still_busy"] = not running.is_ready()
    out["busy_result"] = float(running[0, 0])  # waits for it
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()  # together: the coordinator lives in process 0
    """
)


def run_pair(plans: list[list], timeout_s: float = 60) -> list[dict]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    processes = []
    for index, plan in enumerate(plans):
        command = [sys.executable, "-c", PROCESS, str(port), str(index), str(timeout_s), json.dumps(plan)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and out.strip(), err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_processes_agree_on_the_longest_block_and_any_stop_without_waiting_for_their_devices():
    first = [[1, 4800, 16, False], [2, 9600, 32, False], [3, 4800, 64, False]]
    second = [[1, 9600, 16, False], [2, 4800, 16, True], [3, 4800, 32, False]]
    results = run_pair([first, second])
    expected = [[9600, 16, False], [9600, 32, True], [4800, 64, False]]
    assert [r["agreed"] for r in results] == [expected, expected]
    # The store holds the last step's entries only: each earlier step's went once both had read them.
    assert results[0]["kept"] == [f"whisper-train/0/3/{i}" for i in (0, 1)]
    # Each process's device was still running its work after three agreements: nothing waited on it.
    assert [r["device_still_busy"] for r in results] == [True, True]


def test_a_process_that_never_arrives_is_an_error_in_bounded_time():
    results = run_pair([[[1, 4800, 16, False], [2, 4800, 16, False]], [[1, 4800, 16, False]]], timeout_s=3)
    assert results[0]["agreed"] == [[4800, 16, False]]
    assert "did not all reach step 2 within 3 s" in results[0]["error"]
    assert "error" not in results[1]
