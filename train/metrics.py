"""Run logs: a JSONL file of metrics (one object per event) and TensorBoard event files."""

from __future__ import annotations

import json
import time
from pathlib import Path


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Character and word error rates (jiwer) of transcripts against references."""
    import jiwer

    return {"cer": float(jiwer.cer(references, hypotheses)), "wer": float(jiwer.wer(references, hypotheses))}


class MetricsLog:
    """Appends `{"step", "time", **metrics}` lines to `log_dir/metrics.jsonl` and writes scalars
    to TensorBoard (`log_dir/tensorboard`) when tensorboardX is installed."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        """`enabled=False` (every process but the first of a multi-process run) writes nothing."""
        self.directory = Path(log_dir)
        self.path = self.directory / "metrics.jsonl"
        self.file = self.board = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")  # noqa: SIM115  (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("note: tensorboardX is not installed; writing metrics.jsonl only")
            else:
                self.board = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if self.file is None:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.board.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


class StepTrace:
    """A `jax.profiler` trace of the training steps `first` ... `first + count - 1`, written to
    `directory` (the run's tensorboard/ folder: TensorBoard's Profile tab, or Perfetto, reads
    it). `start(step)` before a step is dispatched, `stop(step, outputs, last)` after it; the
    trace ends once the last traced step's `outputs` are computed, or at the run's last step."""

    def __init__(self, directory: str | Path, first: int | None, count: int, enabled: bool = True):
        self.directory, self.count = Path(directory), count
        self.first = first if enabled else None
        self.active = False

    def start(self, step: int) -> None:
        if step == self.first:
            import jax

            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def stop(self, step: int, outputs=None, last: bool = False) -> str | None:
        """Ends the trace after its last step (or `last`); what was traced, in words, or None."""
        if not self.active or not (last or step >= self.first + self.count - 1):
            return None
        import jax

        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        steps = f"step {step}" if step == self.first else f"steps {self.first}-{step}"
        return f"profile of {steps}: {self.directory} (tensorboard --logdir {self.directory}, Profile tab)"

    def close(self) -> None:
        """Ends a trace the run left open (an error or an interrupt inside the traced steps)."""
        if self.active:
            import jax

            jax.profiler.stop_trace()
            self.active = False


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl file (of one `kind`: "train", "eval", ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """A PNG of a run's curves from its metrics.jsonl: training loss and learning rate against the
    step, and the evaluation's loss and CER (when decoded). Written beside the logs at the end of
    a run, so the curves can be seen without TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path, "train"), read_metrics(metrics_path, "eval")
    figure, (loss_axis, lr_axis, eval_axis) = plt.subplots(1, 3, figsize=(15, 4))
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train])
    loss_axis.set(title="training loss", xlabel="step", yscale="log")
    lr_axis.plot([r["step"] for r in train], [r["learning_rate"] for r in train])
    lr_axis.set(title="learning rate (applied)", xlabel="step")
    eval_axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    decoded = [r for r in evals if "cer" in r]
    if decoded:
        eval_axis.plot([r["step"] for r in decoded], [r["cer"] for r in decoded], "s-", label="CER")
    eval_axis.set(title="evaluation", xlabel="step", yscale="log")
    eval_axis.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
