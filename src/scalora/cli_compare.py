"""The ``scalora compare`` and ``scalora demo`` commands: several methods on one budget, and the quick tour."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalora.cli_options import training_values
from scalora.cli_train import EXIT_INTERRUPTED, resume_command
from scalora.errors import ConfigError
from scalora.train import asset_fetch
from scalora.train.compare import parse_list, plan_jobs, run_comparison
from scalora.train.config import TrainConfig
from scalora.train.demo import rank_demo
from scalora.train.models import ALIASES
from scalora.train.tasks import BUILTIN_TASKS

__all__ = ["DEMO_METHODS", "DEMO_TIME", "DEMO_VALUES", "cmd_compare", "cmd_demo", "required_assets"]

DEMO_VALUES: dict[str, Any] = {
    "model": "minilm", "task": "sarcasm", "train_size": 2000, "eval_size": 500, "steps": 150, "batch_size": 16,
    "max_length": 48, "eval_every": 50,
}
DEMO_METHODS = "lora,rslora,scalora"
DEMO_TIME = ("It first shows, in about 15 s, a task where rank decides (full fine-tuning, LoRA r=4 and ScaLoRA r=4 on "
             "a planted teacher). The whole demo takes about 3 minutes on a quiet 2-core CPU, plus the downloads "
             "(130 MB).")


def _compare(args: argparse.Namespace, argv: Sequence[str], values: dict[str, Any], output_default: str,
             resume_hint: str) -> int:
    """Shared by compare and demo: plan, run, print the table and where the report is."""
    resume, overwrite = bool(values.pop("resume", False)), bool(values.pop("overwrite", False))
    progress = values.pop("progress", sys.stderr.isatty())
    output_dir = Path(values.pop("output_dir", output_default))
    methods = parse_list(args.methods, "--methods")
    if "eval_every" not in values:  # four points on the eval and rank curves, not just the last one
        values["eval_every"] = max(1, int(values.get("steps", TrainConfig.steps)) // 4)
    if args.seeds is not None and "seed" in values:
        raise ConfigError("give --seed or --seeds, not both.")
    seeds = args.seeds if args.seeds is not None else [values.pop("seed", 0)]
    jobs = plan_jobs(methods, seeds, values, output_dir, resume=resume, overwrite=overwrite)
    try:
        comparison = run_comparison(jobs, output_dir, resume=resume, progress=progress, verbose=args.verbose,
                                    threads=args.threads,
                                    command=shlex.join(["scalora", *argv]))
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are kept in {output_dir}. Continue with:\n  {resume_hint}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(comparison.table)
    print()
    print(f"report: {comparison.files['markdown']}  (data: {comparison.files['json'].name})")
    plots = ", ".join(str(p) for k, p in comparison.files.items() if k not in ("markdown", "json"))
    print(f"plots:  {plots}")
    if comparison.failed:
        print(f"\n{len(comparison.failed)} of {len(comparison.outcomes)} runs failed; their logs are "
              f"<run>/train.log.", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora compare``: every method (and seed) in its own run, then the comparison report."""
    values = training_values(args)
    return _compare(args, argv, values, "runs/compare", resume_command(argv))


def required_assets(values: dict[str, Any]) -> list[str]:
    """The offline assets that the model alias and the built-in task of `values` read."""
    needed = []
    alias = ALIASES.get(str(values.get("model")))
    if alias is not None:
        needed.append(alias.asset)
    task = BUILTIN_TASKS.get(str(values.get("task")))
    if task is not None and task.asset is not None:
        needed.append(task.asset)
    return needed


def cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora demo``: the planted rank demo, then a comparison with the demo's preset."""
    start = time.monotonic()
    given = training_values(args)
    values = {**DEMO_VALUES, **given}
    if not values.get("resume"):
        values.setdefault("overwrite", True)  # the demo's own folder: a rerun replaces it
    values.setdefault("output_dir", "runs/demo")
    print("scalora demo: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in values.items()
                                       if k not in ("overwrite", "resume")))
    if args.threads is None:
        args.threads = _busy_machine_threads()
    output_dir = Path(values["output_dir"])
    print("\n1. Where rank decides: a network trained towards a full-rank change of itself "
          "(scalora.train.planted)", flush=True)
    print(rank_demo(output_dir / "rank_decides"))
    print(f"LoRA r=4 stops at its rank floor; ScaLoRA r=4 hands its updates to the frozen weights and keeps going. "
          f"Plot: {output_dir / 'rank_decides' / 'rank_decides.png'}\n")
    print("2. A real model on real data, where rank does not decide: MiniLM on sarcasm headlines", flush=True)
    for name in required_assets(values):  # before the parallel runs, so that each asset is fetched once
        print(f"asset {name}: present ({asset_fetch.ensure(name, quiet=not args.verbose)})")
    resume_hint = shlex.join(["scalora", *[a for a in argv if a != "--overwrite"], "--resume"])
    code = _compare(args, argv, values, "runs/demo", resume_hint)
    if code != EXIT_INTERRUPTED:
        print(f"demo finished in {_duration(time.monotonic() - start)}")
    return code


def _busy_machine_threads() -> int | None:
    """1 when other processes already keep every core busy (several threads then mostly wait on each other:
    8× slower measured on a loaded 2-core machine), else None (torch's default)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
    cpus = os.cpu_count() or 1
    if cpus > 1 and load >= cpus:
        print(f"the machine is busy (load {load:.1f} on {cpus} CPUs): training with 1 thread per run "
              f"(--threads N to choose)")
        return 1
    return None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"

