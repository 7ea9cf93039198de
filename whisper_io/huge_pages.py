"""Transparent huge pages for the command-line tools' memory (Linux, glibc 2.35 or newer).

XLA on a CPU allocates every run of a compiled program's working memory anew: hundreds of
megabytes per training step, which glibc's `malloc` maps fresh from the kernel each time and the
kernel then fills one 4 KiB page at a time. On a 2-core machine the `tiny` training step (batch
4, 30 s) took about 306,000 page faults per step. Where the kernel hands out transparent huge
pages only on request (`/sys/kernel/mm/transparent_hugepage/enabled` reads `[madvise]`, the
default of many distributions), glibc's tunable `glibc.malloc.hugetlb=1` makes `malloc` request
them for its large mappings: about 1,000 faults per step, and the step 1.15x as fast on that
machine (median 3,696 ms against 4,268 over nine steps each, three processes of each kind run in
turn). The tunable is read only when a process starts, so a tool that wants it starts itself
again, once, with it set (`restart_with_huge_pages`); nothing else about the process changes.

Off with `FLAX_WHISPER_HUGE_PAGES=off`; a `GLIBC_TUNABLES` that already names the tunable is the
user's choice and is kept as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENVIRONMENT = "FLAX_WHISPER_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
OFF = ("off", "0", "false", "no")
# For the commands' --help.
HELP = (
    "Memory: on Linux with glibc 2.35+ and transparent huge pages in 'madvise' mode, the command "
    f"starts itself again once, in the same process, with GLIBC_TUNABLES={TUNABLE}=1 (far fewer page "
    f"faults for XLA's working memory: faster CPU steps); {ENVIRONMENT}=off turns this off."
)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on when it is glibc, else None."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):  # not glibc (musl, macOS, Windows)
        return None


def huge_page_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), or None."""
    try:
        text = MODE_FILE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunables(environ: Mapping[str, str]) -> list[str]:
    """The `name=value` settings of `environ`'s `GLIBC_TUNABLES`, in order."""
    return [part for part in environ.get("GLIBC_TUNABLES", "").split(":") if part]


def chosen(environ: Mapping[str, str]) -> str | None:
    """The `glibc.malloc.hugetlb=...` setting `environ` already gives glibc, or None."""
    return next((part for part in reversed(tunables(environ)) if part.startswith(f"{TUNABLE}=")), None)


def restart_needed(environ: Mapping[str, str], glibc: tuple[int, int] | None, mode: str | None) -> bool:
    """Whether starting again with `glibc.malloc.hugetlb=1` would give this process huge pages
    it does not get now: only on glibc 2.35+ (which knows the tunable) under the "madvise" mode
    ("always" gives them anyway, "never" not at all), unless turned off or already chosen."""
    if environ.get(ENVIRONMENT, "").strip().lower() in OFF or chosen(environ):
        return False
    return glibc is not None and glibc >= (2, 35) and mode == "madvise"


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `glibc.malloc.hugetlb=1` added to its `GLIBC_TUNABLES` (kept otherwise)."""
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables(environ), f"{TUNABLE}=1"])}


def restart_with_huge_pages() -> None:
    """Start this program again, in this process (`exec`: the same process id, arguments, open
    files and environment, plus the tunable) when `restart_needed`; otherwise return. Call it
    first thing in a command's `if __name__ == "__main__":`, never from library code. A command
    line that cannot be replayed (the interpreter's own arguments no longer end with this
    program's) is left alone."""
    if not restart_needed(os.environ, glibc_version(), huge_page_mode()):
        return
    command, arguments = list(getattr(sys, "orig_argv", [])), sys.argv[1:]
    if not sys.executable or len(command) < len(arguments) + 2 or command[len(command) - len(arguments) :] != arguments:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *command[1:]], with_tunable(os.environ))
    except OSError as err:  # the program simply runs on without huge pages
        print(f"warning: could not restart with transparent huge pages ({err}); continuing", file=sys.stderr)


def describe() -> str:
    """One line for a benchmark's header: the kernel's mode and what this process's malloc asks."""
    setting = chosen(os.environ)
    asks = f"malloc with {setting}" if setting else "malloc's default pages"
    return f"memory: transparent huge pages {huge_page_mode() or 'unavailable'} in the kernel, {asks}"
