"""The command-line tools' restart with transparent huge pages (`whisper_io.huge_pages`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from whisper_io.huge_pages import (
    ENVIRONMENT,
    TUNABLE,
    describe,
    glibc_version,
    huge_page_mode,
    restart_needed,
    with_tunable,
)

GLIBC = (2, 36)


@pytest.mark.parametrize(
    ("environ", "glibc", "mode", "needed"),
    [
        ({}, GLIBC, "madvise", True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise", True),
        ({}, (2, 35), "madvise", True),
        ({}, (2, 34), "madvise", False),  # glibc before 2.35 does not know the tunable
        ({}, None, "madvise", False),  # not glibc
        ({}, GLIBC, "always", False),  # huge pages anyway
        ({}, GLIBC, "never", False),  # none to be had
        ({}, GLIBC, None, False),  # no transparent huge pages in this kernel
        ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, GLIBC, "madvise", False),  # the user's choice
        ({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}, GLIBC, "madvise", False),  # already set
        ({ENVIRONMENT: "off"}, GLIBC, "madvise", False),
        ({ENVIRONMENT: "OFF "}, GLIBC, "madvise", False),
        ({ENVIRONMENT: "0"}, GLIBC, "madvise", False),
        ({ENVIRONMENT: "on"}, GLIBC, "madvise", True),
    ],
)
def test_a_restart_is_needed_only_where_it_gives_huge_pages(environ, glibc, mode, needed):
    assert restart_needed(environ, glibc, mode) is needed


def test_the_tunable_joins_the_users_other_tunables():
    assert with_tunable({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    environ = with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert environ["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert not restart_needed(environ, GLIBC, "madvise")  # never a second restart


def run_child(code: str, *args: str, tunables: str | None = None, setting: str | None = None) -> list[dict]:
    """Run `code` as a script with `args`, without the tunable unless given; its JSON lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ENVIRONMENT)}
    env.update({"GLIBC_TUNABLES": tunables} if tunables else {})
    env.update({ENVIRONMENT: setting} if setting else {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


RESTART = """
    import json, os, sys
    from whisper_io.huge_pages import restart_with_huge_pages
    print(json.dumps({"pid": os.getpid(), "args": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES")}))
    restart_with_huge_pages()
    print(json.dumps({"pid": os.getpid(), "args": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES")}))
"""

applies = pytest.mark.skipif(
    not restart_needed({}, glibc_version(), huge_page_mode()),
    reason=f"this machine gives no huge pages through the tunable (glibc {glibc_version()}, mode {huge_page_mode()})",
)


@applies
def test_the_program_starts_again_in_the_same_process_with_its_arguments_and_the_tunable():
    first, *again = run_child(RESTART, "--flag", "value with spaces")
    assert first == {"pid": first["pid"], "args": ["--flag", "value with spaces"], "tunables": None}
    # The program ran again from the top, in the same process, and did not restart a second time.
    assert again == [{**first, "tunables": f"{TUNABLE}=1"}] * 2


@applies
@pytest.mark.parametrize("setting", ["off", None])
def test_no_restart_when_turned_off_or_already_chosen(setting):
    tunables = None if setting else f"{TUNABLE}=0"
    lines = run_child(RESTART, "x", tunables=tunables, setting=setting)
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0]["tunables"] == tunables


@applies
def test_no_restart_when_the_command_line_is_not_this_programs():
    # As when a program runs another's main with arguments of its own (runpy, a test harness).
    lines = run_child(RESTART.replace("import json, os, sys", "import json, os, sys; sys.argv[1:] = ['other']"), "x")
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0]["tunables"] is None


def test_the_benchmark_header_says_what_malloc_asks_for(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{TUNABLE}=1")
    assert describe().endswith(f"malloc with {TUNABLE}=1")
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert describe().endswith("malloc's default pages")
    assert f"huge pages {huge_page_mode() or 'unavailable'} in the kernel" in describe()


FAULTS = """
    import ctypes, json, resource
    from whisper_io.huge_pages import restart_with_huge_pages
    restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)  # straight from malloc, as XLA's working memory (NumPy asks for huge pages itself)
    ctypes.memset(block, 1, size)
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@applies
def test_the_restart_maps_large_allocations_with_far_fewer_page_faults():
    [plain] = run_child(FAULTS, setting="off")
    [huge] = run_child(FAULTS)
    assert plain["faults"] >= 16_000  # a 4 KiB page at a time: 16,384 pages
    assert huge["faults"] < plain["faults"] / 8, (huge, plain)


def test_the_commands_help_says_how_to_turn_it_off():
    from train.config import parser as train_parser
    from transcribe.__main__ import parser as transcribe_parser

    for cli in (train_parser(), transcribe_parser("python -m transcribe")):
        assert f"{ENVIRONMENT}=off" in " ".join(cli.format_help().split())


# Each command's imports before its restart, then what first needs JAX.
RESTARTING = {
    "train": ("train.__main__", "from train import TrainConfig, TrainState, decay_mask, make_optimizer, train_step"),
    "transcribe": (
        "transcribe.__main__",
        "import numpy as np; from transcribe import mel_windows; from whisper_config import ModelConfig; "
        "mel_windows(np.zeros(1600, np.float32), ModelConfig())",
    ),
}


@pytest.mark.parametrize("command", sorted(RESTARTING))
def test_python_m_command_restarts_before_jax_is_loaded(command):
    """What `python -m train` and `python -m transcribe` import before their restart (the
    package, then its `__main__` module) leaves JAX unloaded, so the restart costs an interpreter
    start, not JAX's imports; what needs JAX still loads it when used (train: its names, PEP 562;
    transcribe: audio turned into log-mel features)."""
    module, use = RESTARTING[command]
    code = f"""
        import json, sys
        import {module}
        before = sorted(m for m in ("jax", "flax", "optax", "torch") if m in sys.modules)
        {use}
        print(json.dumps({{"before": before, "after": "jax" in sys.modules}}))
    """
    assert run_child(code) == [{"before": [], "after": True}]
