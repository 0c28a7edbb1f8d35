"""A run's results as numbers: what it left in its folder (``summary.json``, ``metrics.jsonl``, see
:mod:`scalora.train.loop`) and the statistics over them that the reports and the benchmarks take.

Everything here works on finished, resumed and partly written runs alike.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scalora.errors import ScaloraError
from scalora.train.config import TrainConfig
from scalora.train.loop import METRICS, SUMMARY

__all__ = ["Series", "finished_summary", "mean_std", "read_metrics", "read_summary", "running_mean", "series"]

Series = list[tuple[float, float]]
"""(step, value) pairs of one metric."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (empty when the file is missing); a torn last line is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # a run killed mid-write leaves half a line
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished run, or None when there is none (yet)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def finished_summary(run_dir: str | Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The summary of a run in ``run_dir`` that finished exactly `cfg`'s computation (same identity), else None."""
    summary = read_summary(run_dir)
    if summary is None or not isinstance(summary.get("config"), dict):
        return None
    try:
        earlier = TrainConfig.from_dict(summary["config"])
    except (ScaloraError, TypeError, ValueError):
        return None
    return summary if earlier.identity() == cfg.identity() else None


def series(rows: Iterable[dict[str, Any]], key: str) -> Series:
    """(step, value) pairs of the rows that have a finite ``key``."""
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((float(row["step"]), float(value)))
    return out


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean over ``window`` values (fewer at the start)."""
    window = max(1, window)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan when there are none; std 0 for one)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0
