"""Presenting results: the summary table of one run, the comparison table of several, and their plots.

The numbers come from the runs' folders through :mod:`scalora.train.results`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalora.train.results import Series, mean_std, read_metrics, running_mean, series

if TYPE_CHECKING:
    from scalora.train.compare import Comparison, Outcome

__all__ = ["format_summary", "markdown_table", "plot_lines", "text_table", "write_report"]

MARKDOWN = "comparison.md"
JSON = "comparison.json"
PLOTS = {"train_loss": "train_loss.png", "eval_metric": "eval_metric.png", "effective_rank": "effective_rank.png"}


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


# ---------------------------------------------------------------------------------------------------------
# The comparison of several runs: its table, plots and files.

_COLUMNS = (  # (summary key, header, digits, unit)
    ("eval", None, 4, ""),
    ("final_train_loss", "final train loss", 4, ""),
    ("wall_time_s", "wall time (s)", 1, ""),
    ("median_step_s", "median step (s)", 3, ""),
    ("peak_rss_mib", "peak memory (MiB)", 0, ""),
    ("trainable_params", "trainable params", 0, ""),
    ("rank/mean", "effective rank (mean)", 2, ""),
)


def _by_method(outcomes: Sequence[Outcome]) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.job.method, []).append(o)
    return groups


def _cell(values: list[float], digits: int, several: bool) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    if digits == 0 and std == 0:
        return f"{mean:,.0f}"
    text = f"{mean:,.{digits}f}"
    return f"{text} ± {std:,.{digits}f}" if several else text


def aggregate(comparison: Comparison) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Headers and rows of the comparison table (mean ± std over seeds), and the same as data."""
    groups = _by_method(comparison.outcomes)
    metric = next((o.summary["metric"] for o in comparison.outcomes if o.ok and o.summary), "metric")
    several = any(len(g) > 1 for g in groups.values())
    headers = ["method"] + [h or f"eval {metric}" for _, h, _, _ in _COLUMNS]
    rows, data = [], []
    notes_needed = False
    for method, group in groups.items():
        ok = [o for o in group if o.ok and o.summary is not None]
        entry: dict[str, Any] = {"method": method, "seeds": [o.job.seed for o in group], "ok": len(ok),
                                 "failed": len(group) - len(ok), "mean": {}, "std": {}}
        row = [method]
        for key, _, digits, _ in _COLUMNS:
            values = [float(o.summary[key]) for o in ok if isinstance(o.summary.get(key), (int, float))]
            mean, std = mean_std(values)
            entry["mean"][key], entry["std"][key] = mean, std
            row.append(_cell(values, digits, several))
        note = ""
        if not ok:
            first = group[0]
            note = f"{first.status}: {first.error}"
            row[1] = first.status
        elif len(ok) < len(group):
            bad = [o for o in group if not o.ok]
            note = f"{len(bad)} of {len(group)} seeds {bad[0].status}: {bad[0].error}"
        entry["note"] = note or None
        notes_needed = notes_needed or bool(note)
        rows.append(row + [note])
        data.append(entry)
    if notes_needed:
        headers.append("notes")
    else:
        rows = [r[:-1] for r in rows]
    return headers, rows, data


def _mean_series(runs: list[Series]) -> tuple[Series, Series, Series]:
    """Mean, mean − std and mean + std at the steps every run has."""
    runs = [r for r in runs if r]
    if not runs:
        return [], [], []
    steps = sorted(set.intersection(*(set(x for x, _ in r) for r in runs)))
    lookup = [dict(r) for r in runs]
    mean, lower, upper = [], [], []
    for s in steps:
        m, sd = mean_std([d[s] for d in lookup])
        mean.append((s, m))
        lower.append((s, m - sd))
        upper.append((s, m + sd))
    return mean, lower, upper


def _smooth(points: Series, window: int) -> Series:
    if not points:
        return []
    xs, ys = zip(*points, strict=True)
    return list(zip(xs, running_mean(ys, window), strict=True))


def write_plots(comparison: Comparison) -> dict[str, Path]:
    """train_loss.png (running mean), eval_metric.png and effective_rank.png: one line per method."""
    groups = _by_method(comparison.outcomes)
    first = next((o for o in comparison.outcomes if o.summary), None)
    metric = first.summary["metric"] if first and first.summary else None
    steps = max((o.job.config.steps for o in comparison.outcomes), default=1)
    window = max(1, min(50, steps // 15))
    metrics = {id(o): read_metrics(o.job.output_dir) for o in comparison.outcomes}
    if metric is None:  # every run failed: take the metric name from any evaluation row
        keys = (k for rows in metrics.values() for r in rows for k in r if k.startswith("eval/"))
        metric = next((k.removeprefix("eval/") for k in keys), "metric")

    def lines(key: str, smooth: int = 1) -> tuple[dict[str, Series], dict[str, tuple]]:
        out, bands = {}, {}
        for method, group in groups.items():
            label = method if any(o.ok for o in group) else f"{method} ({group[0].status})"
            runs = [_smooth(series(metrics[id(o)], key), smooth) for o in group]
            mean, lower, upper = _mean_series(runs)
            out[label] = mean
            if len(group) > 1:
                bands[label] = (lower, upper)
        return out, bands

    seeds = max(len(g) for g in groups.values()) if groups else 1
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    task = first.summary.get("task") if first and first.summary else first.job.config.task if first else None
    where = f" ({task})" if task else ""
    files = {}
    loss, loss_bands = lines("loss", window)
    files["train_loss"] = plot_lines(
        loss, comparison.output_dir / PLOTS["train_loss"], ylabel="train loss", logy=False, bands=loss_bands,
        title=f"training loss{where}" + (f", running mean of {window} steps" if window > 1 else "") + over)
    ev, ev_bands = lines(f"eval/{metric}")
    files["eval_metric"] = plot_lines(
        ev, comparison.output_dir / PLOTS["eval_metric"], title=f"eval {metric}{where}{over}", ylabel=metric,
        logy=False, bands=ev_bands, markers=True)
    rk, rk_bands = lines("rank/mean")
    files["effective_rank"] = plot_lines(
        rk, comparison.output_dir / PLOTS["effective_rank"],
        title=f"effective rank of the accumulated update (mean over tracked layers){over}",
        ylabel="effective rank", bands=rk_bands, markers=True)
    return files


def write_report(comparison: Comparison, *, command: str | None = None) -> Comparison:
    """Write comparison.md, comparison.json and the plots; fills ``comparison.table`` and ``.files``."""
    out = comparison.output_dir
    headers, rows, data = aggregate(comparison)
    comparison.table = markdown_table(headers, rows)
    plots = write_plots(comparison)
    first = next((o for o in comparison.outcomes if o.summary), None)
    cfg = comparison.outcomes[0].job.config if comparison.outcomes else None
    seeds = sorted({o.job.seed for o in comparison.outcomes})
    settings = []
    if cfg is not None:
        data_name = first.summary.get("task") if first and first.summary else (cfg.task or cfg.train_file)
        settings = [f"model `{cfg.model}`", f"task `{data_name}`", f"{cfg.steps} steps",
                    f"batch {cfg.batch_size}×{cfg.grad_accum}", f"r {cfg.r}", f"lora_alpha {cfg.lora_alpha:g}",
                    f"max length {cfg.max_length}", "seed " + ", ".join(map(str, seeds))]
    md = ["# Method comparison", ""]
    if settings:
        md += ["Same data, seed and step budget for every method: " + ", ".join(settings) + ".", ""]
    md += [comparison.table, ""]
    if len(seeds) > 1:
        md += [f"Mean ± standard deviation over {len(seeds)} seeds.", ""]
    md += ["Wall time and median step time are training time (evaluation excluded); peak memory is the resident set "
           "of each run's own process.", ""]
    md += [f"![{name}]({path.name})" for name, path in plots.items()]
    if command:
        md += ["", "Command:", "", "```", command, "```"]
    (out / MARKDOWN).write_text("\n".join(md) + "\n")
    runs = []
    for o in comparison.outcomes:
        summary = dict(o.summary) if o.summary else None
        runs.append({"method": o.job.method, "seed": o.job.seed, "status": o.status, "error": o.error,
                     "returncode": o.returncode, "output_dir": str(o.job.output_dir), "summary": summary})
    payload = {"command": command, "methods": data, "runs": runs, "table": comparison.table,
               "plots": {k: str(v) for k, v in plots.items()}}
    (out / JSON).write_text(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    comparison.files = {"markdown": out / MARKDOWN, "json": out / JSON, **plots}
    return comparison


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
