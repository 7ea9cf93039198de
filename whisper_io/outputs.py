"""Writing outputs without losing data.

Every command that writes a checkpoint or an export goes through here:

- `check_destination` refuses, before anything is read or written, a destination that is empty,
  the current directory (or one holding it), the source itself, inside the source or holding
  it, or an existing path that is not what the command writes (a folder of other files, say).
  An existing output of the right kind is replaced only when the caller allows it.
- `atomic_output` hands out a temporary sibling of the destination to write into and renames it
  into place only once the write has succeeded; on any failure the partial output is removed and
  whatever was at the destination before is left untouched. Replacing an existing output moves
  it aside first and deletes it only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class OutputError(ValueError):
    """A destination cannot or must not be written; the message names it and says why."""


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_working_directory(path: str | os.PathLike, kind: str) -> None:
    """Refuse the current directory, or a folder holding it, as the place for an output."""
    if _within(Path.cwd().resolve(), Path(path).resolve()):
        raise OutputError(f"{path}: is the current directory or holds it; give the {kind} its own path")


def check_destination(
    destination: str | os.PathLike,
    *,
    overwrite: bool,
    replaceable: Callable[[Path], bool],
    kind: str,
    sources: Sequence[str | os.PathLike] = (),
) -> Path:
    """Check that writing `destination` can lose nothing; return it as a `Path`.

    `replaceable(path)` says whether an existing path is an output of `kind` (a checkpoint, say)
    that `overwrite` may replace. An empty directory is always usable. `sources` are inputs of
    the same command, which the output must neither be, contain nor sit inside.
    """
    if not str(destination).strip():
        raise OutputError("the destination path is empty")
    path = Path(destination)
    resolved = path.resolve()
    check_not_working_directory(path, kind)
    for source in sources:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved:
            raise OutputError(f"{path}: is the source itself; write the {kind} to another path")
        if _within(resolved, source_resolved):
            raise OutputError(f"{path}: is inside the source {source}; write the {kind} elsewhere")
        if _within(source_resolved, resolved):
            raise OutputError(f"{path}: holds the source {source}; write the {kind} elsewhere")
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            return path
        if not replaceable(path):
            what = "folder" if path.is_dir() else "file"
            raise OutputError(
                f"{path}: exists and is not a {kind} (a {what} of something else); refusing to replace it"
            )
        if not overwrite:
            raise OutputError(f"{path}: exists; pass --overwrite (overwrite=True) to replace it")
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `destination`; on success rename it into place.

    Whatever the body writes at the yielded path (a file or a directory) becomes `destination`
    only if the body returns normally. An `OSError` while writing (a full disk, a read-only
    folder) becomes an `OutputError` naming the destination; the partial output is removed in
    every case, and an existing destination is never touched unless the new output is complete.
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{destination}: cannot create its folder: {err.strerror or err}") from None
    partial = _sibling(destination, "partial")
    try:
        yield partial
        _swap_into_place(partial, destination)
    except OSError as err:
        raise OutputError(f"{destination}: could not be written: {err.strerror or err}") from None
    finally:
        _remove(partial)


def _swap_into_place(new: Path, destination: Path) -> None:
    """Rename `new` to `destination`, moving an existing destination aside until it succeeds."""
    if not (destination.exists() or destination.is_symlink()):
        os.rename(new, destination)
        return
    old = _sibling(destination, "old")
    os.rename(destination, old)
    try:
        os.rename(new, destination)
    except OSError:
        os.rename(old, destination)
        raise
    _remove(old)
