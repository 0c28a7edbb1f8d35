"""Small helpers shared by the study scripts in this folder (runs of `scalora.train.train`, their logs, results).

Import it from a script in ``benchmarks/`` with ``import common`` (the script's folder is on ``sys.path`` when it is
run as ``python benchmarks/<script>.py``; a script loaded from elsewhere, e.g. by a test, puts it there first).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from scalora.train.results import finished_summary, read_metrics
from scalora.train.rundir import METRICS


def set_threads(n: int) -> None:
    """Use `n` CPU threads for torch (and BLAS/OpenMP in subprocesses).

    On a busy machine one thread per process is usually fastest: with 2 threads on 2 shared cores a MiniLM step
    was seen to take 7x longer than with 1 (the threads wait for each other at every operation).
    """
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and load reports (a study loads a model per run)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def init_worker(threads: int) -> None:
    """Per-process set-up for a study: torch threads and quiet transformers (also the pool's initializer)."""
    set_threads(threads)
    quiet_transformers()


def map_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], *, workers: int = 1,
             threads: int = 1) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in this process (``workers=1``) or in a pool of fresh processes (spawned, so
    each has its own torch threads); results come back in the order of `jobs`. `fn` must be importable by name
    (a module-level function of a script run as ``python benchmarks/<script>.py`` is)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def command_line(script: str | os.PathLike[str], argv: Sequence[str] | None = None) -> str:
    """The shell command that reproduces a run: ``python <script> <args>``, the script's path relative to the
    current folder when it lies below it (``argv`` defaults to this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(script).resolve()
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return shlex.join(["python", shown, *args])


def environment() -> dict[str, Any]:
    """Where the numbers come from: versions, CPU count, threads and the machine's load when the study started."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the studies need it, but this helper does not
        pass
    if hasattr(os, "getloadavg"):
        env["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    return env


def run_config(cfg: Any, *, log: Callable[[str], None] | None = None, reuse: bool = False) -> dict[str, Any]:
    """Run one `TrainConfig` with the library's loop, in this process.

    Returns ``{"summary": ..., "metrics": [rows of metrics.jsonl], "output_dir": str, "wall_s": float,
    "reused": bool}`` where ``wall_s`` includes loading the model and data and the final evaluation (the summary's
    ``wall_time_s`` counts only the training steps). With ``reuse=True`` a finished run of the same computation
    already in ``cfg.output_dir`` (its summary.json has the same config fingerprint) is read back instead of
    trained again (``wall_s`` is then None).
    """
    from scalora.train.loop import train

    if reuse:
        done = finished_run(cfg)
        if done is not None:
            return done
    t0 = time.perf_counter()
    result = train(cfg, log=log or (lambda _msg: None))
    wall = time.perf_counter() - t0
    return {"summary": result.summary, "metrics": read_metrics(result.output_dir), "output_dir": str(result.output_dir),
            "wall_s": wall, "reused": False}


def finished_run(cfg: Any) -> dict[str, Any] | None:
    """The finished run of `cfg` in its output folder (same config fingerprint), or None."""
    out = Path(cfg.output_dir)
    summary = finished_summary(out, cfg) if (out / METRICS).is_file() else None
    if summary is None:
        return None
    return {"summary": summary, "metrics": read_metrics(out), "output_dir": str(out), "wall_s": None, "reused": True}


def column(rows: Iterable[dict[str, Any]], key: str, *, first: int | None = None,
           last: int | None = None) -> list[float]:
    """The values of `key` in the rows whose ``step`` is in [first, last] (bounds optional), in step order."""
    out = []
    for row in sorted(rows, key=lambda r: r.get("step", 0)):
        step = row.get("step", 0)
        if key not in row or (first is not None and step < first) or (last is not None and step > last):
            continue
        out.append(float(row[key]))
    return out


def tail_mean(rows: Iterable[dict[str, Any]], key: str, k: int) -> float:
    """Mean of `key` over the last `k` rows that have it (e.g. the final training loss)."""
    values = column(rows, key)
    if not values:
        return math.nan
    return statistics.fmean(values[-k:])


def mean_std(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``; ``std`` is the sample standard deviation, None for fewer than two values
    (JSON has no NaN)."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "values": vals,
    }


def fmt_mean_std(stats: dict[str, Any], digits: int = 4) -> str:
    """``"0.8123 ± 0.0100"`` (or just the mean when there is one value)."""
    if stats.get("mean") is None:
        return "n/a"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as indented JSON (NaN and infinities become null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n")
    return path


def save_report(path: str | os.PathLike[str], report: dict[str, Any],
                to_markdown: Callable[[dict[str, Any]], str]) -> str:
    """Write `report` as JSON at `path` and its Markdown table beside it (``.md``); print and return the table."""
    path = save_json(path, report)
    table = to_markdown(report)
    path.with_suffix(".md").write_text(table)
    print(table)
    return table


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



@dataclasses.dataclass(frozen=True)
class Part:
    """One model + task experiment of a study (each study adds its own fields)."""

    name: str
    model: str
    task: str | None
    train_file: str | None
    steps: int
    batch_size: int
    max_length: int
    train_size: int | None
    eval_size: int | None
    eval_limit: int | None
    seeds: tuple[int, ...]


def override_part(part: Any, args: Any, name: str, fields: Sequence[str], **changes: Any) -> Any:
    """`part` (a dataclass of one study part's settings) with every option in `fields` that was given on the command
    line, the extra `changes`, and the `--<name>-model` / `--<name>-train-file` overrides (used by smoke tests)."""
    for field_name in fields:
        value = getattr(args, field_name)
        if value is not None:
            changes[field_name] = tuple(value) if isinstance(value, list) else value
    model = getattr(args, f"{name}_model")
    train_file = getattr(args, f"{name}_train_file")
    if model is not None:
        changes["model"] = model
    if train_file is not None:
        changes.update(train_file=train_file, task=None, eval_size=None)
    return dataclasses.replace(part, **changes)
