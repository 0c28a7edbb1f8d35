"""Presenting results: the summary table of one run, the comparison table of several, and their plots.

Everything here reads what a run leaves in its output folder (``summary.json`` and ``metrics.jsonl``, see
:mod:`scalora.train.loop`), so it works on finished, resumed and partly written runs alike.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scalora.train.loop import METRICS, SUMMARY

__all__ = [
    "format_summary",
    "markdown_table",
    "mean_std",
    "plot_lines",
    "read_metrics",
    "read_summary",
    "running_mean",
    "series",
    "text_table",
]

Series = list[tuple[float, float]]


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


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,d}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The key results of one run as an aligned two-column table."""
    metric = summary.get("metric", "metric")
    items = [
        ("method", summary.get("method")),
        ("model", summary.get("model")),
        ("task", summary.get("task")),
        ("steps", summary.get("steps")),
        ("seed", summary.get("seed")),
        (f"eval {metric}", _number(summary.get("eval"))),
        ("final train loss", _number(summary.get("final_train_loss"))),
        ("wall time", f"{_number(summary.get('wall_time_s'), 1)} s"),
        ("median step time", f"{_number(summary.get('median_step_s'), 3)} s"),
        ("peak memory", f"{_number(summary.get('peak_rss_mib'), 0)} MiB"),
        ("trainable params", f"{_number(summary.get('trainable_params'))} of {_number(summary.get('total_params'))}"),
        ("effective rank (mean, max)",
         f"{_number(summary.get('rank/mean'), 2)}, {_number(summary.get('rank/max'), 0)}"),
    ]
    for key, value in sorted((summary.get("saved") or {}).items()):
        items.append((f"saved {key}", value))
    return text_table(["", ""], [[k, "-" if v is None else str(v)] for k, v in items], header=False)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, header: bool = True) -> str:
    """A plain aligned table for the terminal."""
    cells = [list(headers)] + [list(r) for r in rows] if header else [list(r) for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_lines(
    lines: dict[str, Series],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    xlabel: str = "step",
    logy: bool | None = None,
    bands: dict[str, tuple[Series, Series]] | None = None,
    markers: bool = False,
) -> Path:
    """One line per label into a PNG at ``path`` (matplotlib, Agg backend).

    ``logy=None`` picks a log scale when the positive values span more than a factor of 20; ``bands`` maps a label
    to (lower, upper) series shaded around its line (e.g. mean ± std over seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        values = [y for pts in lines.values() for _, y in pts]
        if logy is None:
            positive = [v for v in values if v > 0]
            logy = bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 20
        styles = ("-", "--", "-.", ":")
        shapes = ("o", "s", "^", "D", "v", "P", "X")
        for i, (label, pts) in enumerate(lines.items()):
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            (line,) = ax.plot(xs, ys, label=label, linestyle=styles[i % len(styles)],  # overlapping lines stay visible
                              marker=shapes[i % len(shapes)] if markers else None, markersize=5, linewidth=1.6)
            if bands and label in bands:
                lower, upper = bands[label]
                if lower and upper:
                    ax.fill_between([x for x, _ in lower], [y for _, y in lower], [y for _, y in upper],
                                    color=line.get_color(), alpha=0.2, linewidth=0)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if any(lines.values()):
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
