"""The training loop: `Trainer(config).run()` (what `python -m train` runs).

Build: the model config (or `init_from`'s), checked against the run folder first (a new run
never writes into another run's folder or a folder of other files; `--resume` must keep the
run's settings); tokenizer and featurizer; a (data, fsdp, tensor) mesh; the initial state created
directly in its shardings by a jitted init (or loaded from `init_from`); jitted train and eval
steps. Run: batches from the grain pipeline, a step per batch, metrics every `log_every` steps,
evaluation (loss, token accuracy, greedy CER/WER) every `eval_every`, orbax checkpoints every
`save_every`; SIGTERM or Ctrl-C saves and stops; at the end the weights are exported through
`convert` into the run folder. `--resume` continues from the newest readable checkpoint exactly
(state, data position, RNG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_whisper import Whisper
from flax_whisper.decoding import greedy_decode
from train.agreement import StepAgreement
from train.checkpointing import BEST_METRIC, Checkpoints
from train.config import TrainConfig
from train.data import (
    IGNORE_INDEX,
    DataError,
    DataStats,
    Featurizer,
    check_labels,
    check_languages,
    eval_batches,
    read_records,
    train_batches,
)
from train.metrics import MetricsLog, StepTrace, error_rates, plot_curves
from train.run_folder import RunFolder
from train.sharding import (
    batch_sharding,
    batch_shards,
    check_batch,
    make_mesh,
    place_weights,
    state_shardings,
    with_activation_sharding,
)
from train.step import (
    Graphs,
    TrainState,
    batch_mel,
    eval_step,
    learning_rate_schedule,
    make_optimizer,
    new_state,
    state_from,
    train_step,
)
from whisper_io import decoding_options, text_tokens, tokenizer_for
from whisper_io.decoding import max_new_tokens_for


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps)."""


@dataclasses.dataclass
class RunResult:
    step: int
    stopped_early: bool  # SIGTERM or stop_at_step: resume with --resume
    skipped_steps: int
    eval: dict | None
    data: dict


def sharded_train_step(config: TrainConfig, graphs: Graphs, tx, mesh: Mesh, shardings: TrainState):
    """The jitted `train_step` on `mesh`: the state in `shardings` (donated), the batch split over
    "data" x "fsdp", activations laid out by the rules, metrics replicated."""
    return jax.jit(
        with_activation_sharding(functools.partial(train_step, graphs=graphs, tx=tx, config=config), mesh),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


class Trainer:
    def __init__(self, config: TrainConfig, devices=None):
        """`devices` (default: all) form the mesh."""
        self.config = config
        initial = None
        if config.init_from:
            from convert.checkpoints import load_checkpoint

            checkpoint = load_checkpoint(config.init_from)
            self.model_config, initial = config.model_config(checkpoint.config), checkpoint.tensors
        else:
            self.model_config = config.model_config()
        if "hf" in config.export:  # found out now, not after the run
            from convert.hf import hf_differences

            differ = hf_differences(self.model_config)
            if differ:
                raise TrainingError(
                    "export 'hf' needs a model Hugging Face's Whisper can hold (the plain whisper preset); this one "
                    f"differs in {', '.join(differ)}"
                )
        self.folder = RunFolder(config.run_path)
        self.continuing = self.folder.check(config, self.model_config)  # before anything costly
        self.tokenizer = tokenizer_for(self.model_config)
        self.featurizer = Featurizer.create(
            self.model_config, self.tokenizer, config.language, config.task, config.audio_buckets, config.text_buckets
        )
        # Evaluation decodes as far as the context allows (no previous-text prompt to leave room for).
        prompt_length = len(self.tokenizer.sot_sequence(config.language, config.task))
        self.decode_prompt, self.decode_options = decoding_options(
            self.tokenizer,
            self.model_config,
            config.language,
            config.task,
            max_new_tokens_for(self.model_config, prompt_length),
        )

        self.mesh = make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor, devices)
        check_batch(config.batch_size, config.accumulation_steps, self.mesh)
        if config.eval_batch_size % batch_shards(self.mesh):
            raise DataError(
                f"eval_batch_size {config.eval_batch_size} does not split over {batch_shards(self.mesh)} devices"
            )
        self.tx = make_optimizer(config)
        self.schedule = learning_rate_schedule(config)

        def init() -> TrainState:
            return new_state(Whisper(self.model_config, rngs=nnx.Rngs(config.seed)), self.tx, config.seed)

        self.graphs = Graphs.of(nnx.eval_shape(lambda: Whisper(self.model_config, rngs=nnx.Rngs(config.seed))))
        self.shardings = state_shardings(jax.eval_shape(init), self.mesh)
        # Created inside jit straight into its shardings. From a checkpoint, its weights are placed
        # array by array into those shardings (never the whole model on one host), and the rest of
        # the state (RNG streams, optimizer, counters) is built around them, also inside jit.
        if initial is None:
            self.state = jax.jit(init, out_shardings=self.shardings)()
        else:
            rest = jax.jit(lambda: init().rest, out_shardings=self.shardings.rest)()  # (parameters pruned)
            params, rest = place_weights(jax.eval_shape(init).params, rest, self.shardings, initial, self.model_config)
            around = functools.partial(state_from, tx=self.tx, seed=config.seed)
            self.state = jax.jit(around, out_shardings=self.shardings, donate_argnums=(0, 1))(params, rest)

        self.batch_sharding = batch_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.train_fn = sharded_train_step(config, self.graphs, self.tx, self.mesh, self.shardings)
        self.eval_fn = jax.jit(
            with_activation_sharding(functools.partial(eval_step, graphs=self.graphs, config=config), self.mesh),
            in_shardings=(self.shardings, self.batch_sharding),
            out_shardings=replicated,
        )
        self.mel_fn = jax.jit(
            functools.partial(batch_mel, n_mels=self.model_config.n_mels),
            in_shardings=(self.batch_sharding,),
            out_shardings=self.batch_sharding,
        )
        self.stop_requested: str | None = None  # the name of the signal that asked to stop
        self.agreement = StepAgreement()
        self.trace = StepTrace(
            self.folder.logs / "tensorboard", config.profile_from, config.profile_steps, jax.process_index() == 0
        )

    # ------------------------------------------------------------------ pieces

    def model(self, training: bool = False) -> Whisper:
        """The current weights as a `flax_whisper.Whisper` (sharded as the state is)."""
        return self.graphs.model(self.state, training)

    def to_device(self, batch: dict) -> dict:
        """A host batch onto the mesh; labels are checked here, where values are still known. In a
        run of several processes every process's block must have the same shape (`pad_batch`)."""
        check_labels(batch["labels"], self.model_config.n_vocab)
        arrays = {k: batch[k] for k in ("audio", "labels")}
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), arrays)

    def evaluate(self, batches: list[dict]) -> dict:
        """Eval loss, token accuracy and (with `decode_eval`) greedy CER/WER over `batches`."""
        sums = {"loss_sum": 0.0, "correct": 0, "tokens": 0}
        references, hypotheses = [], []
        decode = self.config.decode_eval
        model = self.model(training=False) if decode else None
        for batch in batches:
            on_device = self.to_device(batch)
            part = jax.device_get(self.eval_fn(self.state, on_device))
            for key in sums:
                sums[key] += part[key].item()
            if model is not None:  # the whole global batch, whatever the number of processes
                prompts = np.tile(self.decode_prompt, (self.config.eval_batch_size, 1))
                tokens = greedy_decode(model, self.mel_fn(on_device), prompts, self.decode_options)
                rows = text_tokens(gather_array(tokens), len(self.decode_prompt), self.decode_options.eot)
                for text, ids in zip(batch["texts"], rows, strict=False):  # padding rows have no text
                    references.append(text)
                    hypotheses.append(self.tokenizer.decode(ids).strip())
        tokens = max(sums["tokens"], 1)
        metrics = {BEST_METRIC: sums["loss_sum"] / tokens, "token_accuracy": sums["correct"] / tokens}
        if references:
            metrics.update(error_rates(references, hypotheses))
            pairs = zip(references[:3], hypotheses[:3], strict=True)
            metrics["examples"] = [{"reference": r, "hypothesis": h} for r, h in pairs]
        return metrics

    def export(self, state: TrainState | None = None, which: str = "the last step") -> None:
        """Write the weights of `state` (default: the current one) into the run folder in each
        `export` format, checked finite first."""
        from convert.checkpoints import save_checkpoint
        from convert.core import flax_state_to_torch
        from convert.rules import CARRIED

        if not self.config.export:
            return
        model = self.graphs.model(self.state if state is None else state, training=False)
        weights = jax.tree.map(gather_array, nnx.state(model, CARRIED))  # every process takes part
        if jax.process_index() != 0:
            return
        tensors = flax_state_to_torch(weights, self.model_config)
        for fmt in self.config.export:
            path = self.folder.export_path(fmt)
            save_checkpoint(path, fmt, self.model_config, tensors, overwrite=True)
            hint = " (python -m transcribe AUDIO --checkpoint ...)" if fmt == "flax" else ""
            print(f"exported {which} as a {fmt} model to {path}{hint}")

    def exported_state(self, checkpoints: Checkpoints) -> tuple[TrainState, str]:
        """The state to export at the end: with `export_best` and evaluations, the kept checkpoint
        of lowest eval loss (restored), else the current one; and which it is, in words."""
        step = int(self.state.step)
        best = checkpoints.best_step() if self.config.export_best else None
        if best is None or best[0] == step:
            return self.state, f"step {step}" + (f" (the best eval loss, {best[1]:.4f})" if best else "")
        state, _, _ = checkpoints.restore(best[0], self.state)
        return state, f"step {best[0]}, the best eval loss ({best[1]:.4f}; set export_best = false for step {step})"

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once, without saving
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.stderr.write("\nstopping after this step and saving (Ctrl-C again aborts without saving)\n")

    # ------------------------------------------------------------------ run

    def run(self) -> RunResult:
        config = self.config
        stats = DataStats()
        process, processes = jax.process_index(), jax.process_count()
        columns = (config.audio_column, config.text_column, config.language_column)
        records = read_records(config.train_data, config.train_split, *columns)
        check_languages(records, self.featurizer, config.train_data)
        evals = []
        if config.eval_data:
            eval_records = read_records(config.eval_data, config.eval_split, *columns)
            check_languages(eval_records, self.featurizer, config.eval_data)
            evals = eval_batches(eval_records, self.featurizer, config.eval_batch_size, stats, process, processes)

        if process == 0 and not self.continuing:
            self.folder.start(config, self.model_config)
        warn = functools.partial(print, file=sys.stderr)
        checkpoints = Checkpoints(self.folder.checkpoints, keep=config.keep_checkpoints, warn=warn)
        # Every process reads its block of each global batch: the batches are those of a single process.
        iterator = train_batches(records, self.featurizer, config.batch_size, config.seed, stats, process, processes)
        start = 0
        restored = checkpoints.restore_newest(self.state, warn=warn)
        if restored is not None:
            start, self.state, data_state, meta = restored
            iterator.set_state(process_part(data_state, process, processes))
            stats.skipped.update(meta.get("skipped_files", {}))
            stats.truncated = meta.get("truncated_transcripts", 0)
            print(f"resumed from {checkpoints.directory} at step {start}")
        elif config.resume:
            print(f"--resume: no checkpoint in {self.folder.path} yet, starting from step 0")

        log = MetricsLog(self.folder.logs, enabled=process == 0)  # one log, written by process 0
        log.write(start, "config", {"train": config.to_dict(), "model": self.model_config.to_dict()})
        handlers = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught: preemption is then the caller's business.
            with contextlib.suppress(ValueError):
                handlers[signum] = signal.signal(signum, self._request_stop)
        last_eval = None
        try:
            if evals and start == 0 and config.decode_eval:
                last_eval = self.evaluate(evals)
                log.write(0, "eval", last_eval)
                print(f"step 0 (untrained): {_describe(last_eval)}")
            last_eval = self._loop(start, iterator, evals, checkpoints, log, stats) or last_eval
            checkpoints.wait()
            final = self.exported_state(checkpoints) if int(self.state.step) == config.steps else None
        finally:
            self.trace.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            checkpoints.wait()
            checkpoints.close()
            log.close()
        step = int(self.state.step)
        if process == 0 and (self.folder.logs / "metrics.jsonl").is_file():
            print(f"curves: {plot_curves(self.folder.logs / 'metrics.jsonl', self.folder.logs / 'curves.png')}")
        if final is not None:
            self.export(*final)
        return RunResult(step, step < config.steps, int(self.state.skipped), last_eval, stats.summary())

    def _loop(self, start, iterator, evals, checkpoints, log, stats) -> dict | None:
        config = self.config
        last_eval = None
        progress = _progress(config, start)
        window_start, window_steps = time.perf_counter(), 0
        metrics = None
        last = config.steps if config.stop_at_step is None else min(config.steps, config.stop_at_step)
        for step in range(start + 1, last + 1):
            self.trace.start(step)  # with profile_from: the batch's loading is traced too
            batch = next(iterator)
            # Every process pads its block to the longest block's buckets and learns whether any
            # process was asked to stop, host to host (the devices keep running the last step).
            agreed = self.agreement.agree(
                step, batch["audio"].shape[1], batch["labels"].shape[1], self.stop_requested is not None
            )
            batch = pad_batch(batch, agreed.audio, agreed.labels)
            self.state, metrics = self.train_fn(self.state, self.to_device(batch))
            window_steps += 1
            if step == start + 1:  # the first step compiled: time the bar's rate (and ETA) from here
                jax.block_until_ready(metrics["loss"])
                progress.reset(total=config.steps)  # restarts the bar's clock
                progress.initial = progress.n = progress.last_print_n = step
                progress.refresh()
            else:
                progress.update(1)
            if jax.process_count() == 1:
                stop = self.stop_requested  # with one process a signal during the step counts at once
            else:
                stop = (self.stop_requested or "a signal to another process") if agreed.stop else None
            traced = self.trace.stop(step, metrics, last=step == last or bool(stop))
            if traced:
                progress.write(traced)
            if step % config.log_every == 0 or step == config.steps or stop:
                values = {k: v.item() for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": values["loss"],
                    "grad_norm": values["grad_norm"],
                    "learning_rate": values["learning_rate"],  # the one applied (skipped steps do not advance it)
                    "examples_per_second": window_steps * config.batch_size / elapsed,
                    "skipped_steps": int(self.state.skipped),
                    **stats.summary(),
                }
                log.write(step, "train", record)
                progress.set_postfix(
                    loss=f"{record['loss']:.4g}", lr=f"{record['learning_rate']:.1e}",
                    ex_s=f"{record['examples_per_second']:.0f}",
                )  # fmt: skip
                window_start, window_steps = time.perf_counter(), 0
                if int(self.state.worst_streak) >= config.max_bad_steps:
                    raise TrainingError(
                        f"{int(self.state.worst_streak)} steps in a row had a non-finite loss or gradient "
                        f"(max_bad_steps={config.max_bad_steps}); lower the learning rate or check the data"
                    )
            evaluated = None
            evaluating = evals and (step % config.eval_every == 0 or step == config.steps)
            saved = step % config.save_every == 0 or step == last or stop
            if jax.process_count() > 1 and (evaluating or saved):
                # Their collectives after the step's: on CPUs programs may run concurrently, and
                # two programs' collectives interleaved differently in two processes would mismatch.
                jax.block_until_ready(metrics)
            if evaluating:
                evaluated = last_eval = self.evaluate(evals)
                log.write(step, "eval", evaluated)
                progress.write(f"step {step}: {_describe(evaluated)}")
            if saved:
                meta = {"step": step, "skipped_files": dict(stats.skipped), "truncated_transcripts": stats.truncated}
                scores = {BEST_METRIC: evaluated[BEST_METRIC]} if evaluated else None
                checkpoints.save(step, self.state, gather_from_processes(iterator.get_state()), meta, scores)
            if evaluated or saved:  # throughput counts training steps only
                window_start, window_steps = time.perf_counter(), 0
            if stop:
                progress.write(f"stopping at step {step} on {stop}; checkpoint saved, continue with --resume")
                break
            if step == last < config.steps:
                progress.write(f"stopping at step {step} (stop_at_step); continue with --resume")
        progress.close()
        return last_eval


def pad_batch(batch: dict, audio: int, labels: int) -> dict:
    """`batch`'s audio padded with silence to `audio` samples and its labels with the ignore index
    to `labels` positions (what one process padding the whole global batch would have chosen)."""

    def pad(x: np.ndarray, n: int, value) -> np.ndarray:  # (B, L) -> (B, n); no copy when L == n
        return x if x.shape[1] == n else np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)

    return {**batch, "audio": pad(batch["audio"], audio, 0.0), "labels": pad(batch["labels"], labels, IGNORE_INDEX)}


def gather_array(array: jax.Array) -> np.ndarray:
    """A global array, whole, on every process's host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def gather_from_processes(value) -> dict:
    """Each process's JSON-able `value` (its data iterator's position), gathered so the one process
    that writes a checkpoint's JSON items stores them all: `{"processes": [value_0, ...]}`."""
    if jax.process_count() == 1:
        return {"processes": [value]}
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return {"processes": [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths, strict=True)]}


def process_part(saved, process: int, processes: int):
    """This process's entry of `gather_from_processes`'s record (older checkpoints hold one state)."""
    if not (isinstance(saved, dict) and "processes" in saved):
        return saved
    states = saved["processes"]
    if len(states) != processes:
        raise TrainingError(
            f"the checkpoint was written by {len(states)} process(es) and this run has {processes}: resume with "
            f"--processes {len(states)} (the data order of each process is part of the run)"
        )
    return states[process]


def _describe(metrics: dict) -> str:
    parts = [f"eval loss {metrics[BEST_METRIC]:.3f}", f"token accuracy {metrics['token_accuracy']:.3f}"]
    if "cer" in metrics:
        parts += [f"CER {metrics['cer']:.3f}", f"WER {metrics['wer']:.3f}"]
    return ", ".join(parts)


def _progress(config: TrainConfig, start: int):
    """The bar counts steps as they are dispatched: the host runs up to `log_every` steps ahead
    of the device and waits at each log line. Its rate and ETA are the average since the bar's
    clock started (`smoothing=0`): tqdm's default moving average swung between bursts and
    waits (an ETA of 1 to 13 minutes within one demo run)."""
    from tqdm import tqdm

    return tqdm(
        total=config.steps,
        initial=start,
        desc="training",
        unit="step",
        smoothing=0,
        disable=not config.progress,
        file=sys.stderr,
    )


def train(config: TrainConfig) -> RunResult:
    return Trainer(config).run()
