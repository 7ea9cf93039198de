"""Orbax checkpoints of a training run: state, data position and metadata, kept as the latest N
plus the best by evaluation loss, saved asynchronously.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact (the partial one is never listed).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from whisper_io.messages import first_line

BEST_METRIC = "eval_loss"
# How long a failed restore waits for orbax's other reads of that checkpoint to end.
SETTLE_SECONDS = 120.0


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be restored; the message says why for each step."""


async def settled(coro):
    """`coro`, but when it fails, the other tasks of its event loop run to their end before the
    error is raised, and their errors are read.

    Orbax reads a checkpoint's arrays as concurrent tasks on an event loop of its own, which it
    closes as soon as the restore fails. The reads still under way were left behind: when they
    ended or were collected, each printed a traceback ("Task exception was never retrieved",
    "Event loop is closed", a tensorstore spec of several KB) long after the one-line warning
    that the checkpoint cannot be read."""
    try:
        return await coro
    except Exception:
        current, deadline = asyncio.current_task(), time.monotonic() + SETTLE_SECONDS
        while pending := [t for t in asyncio.all_tasks() if t is not current and not t.done()]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, _ = await asyncio.wait(pending, timeout=left)
            for task in done:
                if not task.cancelled():
                    task.exception()  # read: asyncio logs the errors no one read
        raise


def _settle_failed_restores() -> None:
    """Orbax (0.12) runs each synchronous call's coroutine on a fresh event loop through its private
    `asyncio_utils._run_sync_via_new_loop`: wrap it so that the coroutine goes through `settled`.
    Successful calls are unchanged. Installed once; an orbax without that function is left as it is."""
    from orbax.checkpoint._src import asyncio_utils

    run = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if run is None or getattr(run, "settles", False):
        return

    def run_settled(coro):
        return run(settled(coro))

    run_settled.settles = True
    asyncio_utils._run_sync_via_new_loop = run_settled


_settle_failed_restores()


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def to_savable(tree):
    """Typed PRNG keys (dropout RNG state) -> their raw uint32 data, which orbax stores."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree, like):
    """Undo `to_savable`, given the tree it came from (or its shapes)."""
    return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x) if _is_key(ref) else x, tree, like)


def _abstract(leaf):
    """A restore target for one leaf: shape, dtype and sharding (typed keys as their raw data)."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


def _names(path) -> tuple[str, ...]:
    """A tree path as plain names, the same for a saved tree and the state it came from."""
    names = tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    return names[:-1] if names and names[-1] == "value" else names


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True, warn=print):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    reverse=True,  # lower loss is better
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # Also what makes orbax write each step's metrics to disk, so the best survives a resume.
            best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = Path(directory).absolute()
        self.warn = warn
        self._set_aside_damaged_metadata()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def _set_aside_damaged_metadata(self) -> None:
        """Orbax reads every kept step's small JSON files when it opens the folder, and fails as a
        whole on one damaged file: such steps are set aside first, by name."""
        damaged = []
        for folder in self.directory.iterdir() if self.directory.is_dir() else ():
            if not folder.name.isdigit():
                continue
            for name in ("_CHECKPOINT_METADATA", "metrics/metrics"):
                file = folder / name
                try:
                    if file.exists():
                        json.loads(file.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    damaged.append(int(folder.name))
                    self.warn(f"warning: checkpoint step {folder.name} cannot be read ({name} is damaged)")
                    break
        self._move_aside(damaged)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> tuple[int, float] | None:
        """(step, eval loss) of the kept checkpoint with the lowest eval loss; None if none has one."""
        scored = []
        for step in self.all_steps():
            try:
                metrics = self.manager.metrics(step)
            except Exception:  # a checkpoint saved without metrics
                metrics = None
            if metrics and BEST_METRIC in metrics:
                scored.append((float(metrics[BEST_METRIC]), step))
        if not scored:
            return None
        loss, step = min(scored)
        return step, loss

    def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_savable(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, like) -> tuple[Any, dict, dict]:
        """(state shaped and sharded like `like`, data iterator state, metadata) of `step`.

        A checkpoint written before the token table was padded (its rows, and the optimizer
        moments shaped like it, hold the true vocabulary) is read with the padding rows zero, as
        a fresh padded model has them; any other difference of shape is an error."""
        target = jax.tree.map(_abstract, like)
        padded = self._unpadded_vocabulary(step, target)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target, strict=not padded),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return from_savable(restored.state, like), restored.data, restored.meta

    def _unpadded_vocabulary(self, step: int, target) -> bool:
        """True when the arrays of `step` whose shapes differ from `target`'s are all the token
        table's (or its moments'), stored with fewer rows."""
        try:
            stored = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # unreadable metadata: the restore itself says why
            return False
        shapes = {_names(path): tuple(m.shape) for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
        differ = [
            (names, shapes[names], tuple(leaf.shape))
            for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
            if (names := _names(path)) in shapes and shapes[names] != tuple(leaf.shape)
        ]
        return bool(differ) and all(
            "token_embedding" in names and old[1:] == new[1:] and old[0] < new[0] for names, old, new in differ
        )

    def restore_newest(self, like, warn=print) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data state, metadata) of the newest checkpoint that can be read, or None
        when there is none. Unreadable newer ones are moved to `checkpoints-unreadable/` beside
        the checkpoint folder (kept, never deleted), with a warning naming each; if none can be
        read, `CheckpointError` lists why for every step."""
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data, meta = self.restore(step, like)
            except Exception as err:  # orbax and tensorstore raise many types; each is summarised
                failures.append((step, first_line(err)))
                continue
            for failed, reason in failures:
                warn(f"warning: checkpoint step {failed} cannot be read ({reason}); resuming from step {step}")
            self._set_aside([failed for failed, _ in failures])
            return step, state, data, meta
        if failures:
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} can be read: {reasons}")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable step folders out of orbax's directory, so training can save those steps again."""
        self._move_aside(steps)
        if steps:
            self.manager.reload()

    def _move_aside(self, steps: list[int]) -> None:
        """Every process finds the same steps unreadable and calls this (with none too); process 0
        alone moves them (the folder is shared), once every process has looked, and the others
        wait until it has."""
        from jax.experimental import multihost_utils

        several = jax.process_count() > 1
        if several:
            multihost_utils.sync_global_devices("checkpoints read")
        if jax.process_index() == 0:
            aside = self.directory.parent / f"{self.directory.name}-unreadable"
            for step in steps:
                source = self.directory / str(step)
                if source.exists():
                    aside.mkdir(exist_ok=True)
                    source.rename(aside / f"{step}-{int(time.time())}")
        if several:
            multihost_utils.sync_global_devices("unreadable checkpoints set aside")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
