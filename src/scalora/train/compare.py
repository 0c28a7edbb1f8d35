"""Comparing methods: each (method, seed) trains in its own ``scalora train`` subprocess, then one report.

Running every method in a fresh process makes its peak memory its own and keeps one failing method from taking
the others down; the failure is reported in the table with its error line. The report is
``comparison.md`` (a markdown table), ``comparison.json`` (every number) and three PNG plots.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scalora.errors import ConfigError, ScaloraError
from scalora.train import checkpoint, report, results
from scalora.train.config import TrainConfig
from scalora.train.loop import METRICS
from scalora.train.registry import METHODS

__all__ = [
    "Comparison",
    "Job",
    "Outcome",
    "config_from_values",
    "option_flag",
    "plan_jobs",
    "run_comparison",
    "to_argv",
]

LOG = "train.log"
_FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def option_flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: ``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def to_argv(values: dict[str, Any]) -> list[str]:
    """``scalora train`` arguments that reproduce the TrainConfig field values ``values``."""
    argv: list[str] = []
    for name, value in values.items():
        if isinstance(_FIELD_DEFAULTS.get(name), bool) or isinstance(value, bool):
            argv.append(option_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            argv += [option_flag(name), "none"]
        elif isinstance(value, (list, tuple)):
            argv += [option_flag(name), ",".join(str(v) for v in value)]
        else:
            argv += [option_flag(name), str(value)]
    return argv


def config_from_values(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from field values given on the command line: data files replace the default task."""
    values = dict(values)
    if values.get("train_file") is not None or values.get("eval_file") is not None:
        values.setdefault("task", None)
    return TrainConfig(**values)


@dataclass
class Job:
    """One training run of a comparison."""

    method: str
    seed: int
    output_dir: Path
    values: dict[str, Any]  # TrainConfig fields passed to `scalora train`
    config: TrainConfig

    @property
    def label(self) -> str:
        return self.method if self.output_dir.name == self.method else f"{self.method} (seed {self.seed})"

    def command(self, *, resume: bool = False, verbose: bool = False, threads: int | None = None) -> list[str]:
        """``python -m scalora train ...`` for this job."""
        cmd = [sys.executable, "-m", "scalora", "train", *to_argv(dict(self.values, resume=resume))]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        return [*cmd, "--verbose"] if verbose else cmd


@dataclass
class Outcome:
    """How one job ended: ``ok`` (this time), ``reused`` (finished earlier), ``failed`` or ``interrupted``."""

    job: Job
    status: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "reused") and self.summary is not None


@dataclass
class Comparison:
    """The outcomes of every job and the files of the report."""

    output_dir: Path
    outcomes: list[Outcome]
    table: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def parse_list(text: str, what: str) -> list[str]:
    """``"a,b, c"`` → ``["a", "b", "c"]``; empty items and duplicates are an error."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise ConfigError(f"{what}: expected a comma-separated list, got {text!r}.")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise ConfigError(f"{what}: {', '.join(dup)} given more than once.")
    return items


def plan_jobs(methods: Sequence[str], seeds: Sequence[int], values: dict[str, Any], output_dir: Path,
              *, resume: bool = False, overwrite: bool = False) -> list[Job]:
    """One job per (method, seed), validated now so that a bad option fails before anything runs.

    Runs go to ``output_dir/<method>`` (``output_dir/<method>/seed<k>`` with several seeds).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    if not methods:
        raise ConfigError("give at least one method to compare.")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them.")
    jobs = []
    for method in methods:
        for seed in seeds:
            out = output_dir / method if len(seeds) == 1 else output_dir / method / f"seed{seed}"
            job_values = {**values, "method": method, "seed": seed, "output_dir": str(out), "progress": False,
                          "resume": False, "overwrite": overwrite}
            jobs.append(Job(method, seed, out, job_values, config_from_values(job_values)))
    if not resume and not overwrite:
        taken = [j.output_dir for j in jobs if checkpoint.find(j.output_dir) is not None]
        if taken:
            raise ScaloraError(f"{taken[0]} already holds a run; pass --resume to continue (finished runs are kept) "
                               f"or --overwrite to start over, or choose another --output-dir.")
    return jobs


def error_line(log: str, returncode: int) -> str:
    """The line that says why a run failed: its ``error:`` line, else the exception of a traceback."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode}" + (f": {lines[-1]}" if lines else "")


class _Progress:
    """Shows a running job: a tqdm bar on a terminal, otherwise a line per evaluation (and every minute)."""

    def __init__(self, job: Job, bar: bool, log: Callable[[str], None]) -> None:
        self.job, self.log, self.step = job, log, 0
        self.started = time.time()
        self.metric_key: str | None = None
        self.last_row: dict[str, Any] | None = None
        self.last_line = time.monotonic()
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=job.config.steps, desc=job.label, dynamic_ncols=True, leave=True)

    def update(self) -> None:
        path = self.job.output_dir / METRICS
        try:
            fresh = path.stat().st_mtime >= self.started - 1.0  # not the file of an earlier run being replaced
        except OSError:
            fresh = False
        rows = [r for r in results.read_metrics(self.job.output_dir) if r.get("step", 0) > self.step] if fresh else []
        total = self.job.config.steps
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        for row in evals:
            self.metric_key = next(k for k in row if k.startswith("eval/"))
        if rows and self.bar is not None:
            self.bar.update(rows[-1]["step"] - self.step)
            post = {"loss": f"{rows[-1].get('loss', math.nan):.4f}"}
            if self.metric_key and evals:
                post[self.metric_key.removeprefix("eval/")] = f"{evals[-1][self.metric_key]:.4f}"
            self.bar.set_postfix(post)
        elif self.bar is None:
            for row in evals:
                self.log(f"  {self.job.label}: step {row['step']}/{total}, loss {row['loss']:.4f}, "
                         f"{self.metric_key.removeprefix('eval/')} {row[self.metric_key]:.4f}")
                self.last_line = time.monotonic()
        if rows:
            self.last_row = rows[-1]
            self.step = rows[-1]["step"]
        if self.bar is None and time.monotonic() - self.last_line > 60:  # a sign of life between evaluations
            if self.last_row is None:
                self.log(f"  {self.job.label}: loading the model and data")
            else:
                loss = self.last_row.get("loss", math.nan)
                self.log(f"  {self.job.label}: step {self.step}/{total}, loss {loss:.4f}")
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_job(job: Job, *, resume: bool, progress: bool, verbose: bool, threads: int | None,
             log: Callable[[str], None]) -> Outcome:
    """Train one job in a subprocess, its output kept in ``<run>/train.log``; Ctrl-C stops it and propagates."""
    cmd = job.command(resume=resume and checkpoint.find(job.output_dir) is not None, verbose=verbose,
                      threads=threads)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = job.output_dir / LOG
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    shown = _Progress(job, progress, log)
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        log_file.write("$ " + shlex.join(cmd) + "\n")
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        echoed = log_path.stat().st_size
        try:
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                shown.update()
                if verbose:
                    echoed = _echo(log_path, echoed)
        except KeyboardInterrupt:
            _stop(proc)
            shown.close()
            raise
        finally:
            if proc.poll() is None:
                _stop(proc)
    shown.update()
    shown.close()
    if verbose:
        _echo(log_path, echoed)
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    summary = results.read_summary(job.output_dir)
    if proc.returncode == 0 and summary is not None:
        return Outcome(job, "ok", summary, returncode=0, seconds=seconds)
    status = "interrupted" if proc.returncode in (130, -signal.SIGINT) else "failed"
    return Outcome(job, status, None, error_line(text, proc.returncode), proc.returncode, seconds)


def _echo(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
    return offset + len(chunk)


def _stop(proc: subprocess.Popen) -> None:
    """Ask a run to stop as Ctrl-C would (it then keeps its last checkpoint); kill it if it does not."""
    try:  # from a terminal, Ctrl-C reached the run too: give it a moment to stop by itself
        proc.wait(timeout=5)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_comparison(jobs: Sequence[Job], output_dir: Path, *, resume: bool = False, progress: bool = False,
                   verbose: bool = False, threads: int | None = None, log: Callable[[str], None] = print,
                   command: str | None = None) -> Comparison:
    """Run every job (one subprocess each, one after another), then write the report into ``output_dir``.

    ``threads`` sets each run's CPU threads (``scalora train --threads``); None keeps torch's default.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    for i, job in enumerate(jobs, start=1):
        if resume:
            summary = results.finished_summary(job.output_dir, job.config)
            if summary is not None:
                log(f"[{i}/{len(jobs)}] {job.label}: already finished in {job.output_dir}, reusing it")
                outcomes.append(Outcome(job, "reused", summary, returncode=0))
                continue
        log(f"[{i}/{len(jobs)}] {job.label}: training {job.config.steps} steps in {job.output_dir}")
        try:
            outcome = _run_job(job, resume=resume, progress=progress, verbose=verbose, threads=threads, log=log)
        except KeyboardInterrupt:
            found = checkpoint.find(job.output_dir)
            log(f"  {job.label}: interrupted; " + (f"its last checkpoint is {found}" if found else
                                                    "it had written no checkpoint yet (see --save-every)"))
            raise
        outcomes.append(outcome)
        if outcome.ok and outcome.summary is not None:
            s = outcome.summary
            log(f"  {job.label}: {s.get('metric')} {s.get('eval', math.nan):.4f}, final train loss "
                f"{s.get('final_train_loss', math.nan):.4f}, {outcome.seconds:.0f} s")
        else:
            log(f"  {job.label}: {outcome.status}: {outcome.error} (log: {job.output_dir / LOG})")
            if outcome.status == "interrupted":  # stopped from outside (e.g. SIGINT to the run alone): stop too
                raise KeyboardInterrupt
    comparison = Comparison(output_dir, outcomes)
    report.write_report(comparison, command=command)
    return comparison
