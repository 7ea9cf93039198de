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

    def __init__(self, log_dir: str | Path, tensorboard: bool = True):
        self.directory = Path(log_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self.file = open(self.path, "a")  # noqa: SIM115  (closed in close())
        self.board = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("note: tensorboardX is not installed; writing metrics.jsonl only")
            else:
                self.board = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, kind: str, metrics: dict) -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.board.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl file (of one `kind`: "train", "eval", ...)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]
