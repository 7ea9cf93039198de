"""XLA's persistent compilation cache for the command-line tools (`python -m train`, `python -m
transcribe`): a program compiled once (the training step, the decoding loops) is read back from
disk by the next run instead of being compiled again, so a resumed run or a second transcription
starts sooner. JAX keys each entry by the program, the devices and the compiler's flags, and
writes only programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
default) to compile.

Where, first match wins: `--compile-cache DIR` (or `off`); the environment variable
`FLAX_WHISPER_COMPILE_CACHE` (a directory or `off`); JAX's own `JAX_COMPILATION_CACHE_DIR`;
otherwise `$XDG_CACHE_HOME/flax_whisper/xla` (`~/.cache/flax_whisper/xla`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENVIRONMENT = "FLAX_WHISPER_COMPILE_CACHE"
OFF = "off"


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flax_whisper" / "xla"


def use_compile_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at the directory `setting` resolves to (see the
    module's docstring); the directory, or None when off. A directory that cannot be created is
    a warning, never an error: the run compiles as it would without a cache."""
    import jax

    chosen = setting or os.environ.get(ENVIRONMENT) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(chosen).expanduser() if chosen else default_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"warning: no compilation cache ({path}: {err.strerror or err})", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
