"""A run's metrics: one JSON object per logged step, kept across resumes, mirrored to TensorBoard."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalora.peft_format import atomic_write
from scalora.train import checkpoint
from scalora.train.rundir import METRICS, RunFolder


class MetricsLog:
    """metrics.jsonl (one JSON object per line) in the run's current folder, plus TensorBoard when installed.

    On resume the rows up to the checkpoint's step are kept; a last line that a crash left half written is dropped
    and reported through `log`.
    """

    def __init__(self, run: RunFolder, keep_until: int | None, tensorboard: bool,
                 log: Callable[[str], None]) -> None:
        self.run = run
        self.rows = [] if keep_until is None else [
            r for r in _read_rows(run.current / METRICS, log) if r.get("step", 0) <= keep_until]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in self.rows)))
        self.writer = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.current / "tensorboard"))

    @property
    def path(self) -> Path:
        return self.run.current / METRICS

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_rows(path: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of a metrics file; a torn last line is dropped (and reported), a bad line before it is an error."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").split("\n"), start=1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == lines[-1][0]:
            log(f"{path}: dropped line {n}, which a crash left half written")
        else:
            raise checkpoint.CheckpointError(f"{path} line {n} is not a JSON object; the file is corrupt: delete "
                                             f"that line (or the file) and resume again.")
    return rows
