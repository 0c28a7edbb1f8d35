"""The ``scalora train`` and ``scalora eval`` commands: train one method on one task, evaluate a run or a model.

Ctrl-C during training says where the last checkpoint is and the command line that resumes it (exit code
`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalora.cli_options import training_values
from scalora.errors import ConfigError, ScaloraError
from scalora.train import report, results
from scalora.train.compare import config_from_values
from scalora.train.config import TrainConfig
from scalora.train.tasks import BUILTIN_TASKS

__all__ = ["EXIT_INTERRUPTED", "cmd_eval", "cmd_train", "resume_command"]

EXIT_INTERRUPTED = 130


def _quiet_libraries(verbose: bool) -> None:
    """Hide transformers' load reports and progress bars (and the hub client's retry notices) unless --verbose."""
    if verbose:
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - transformers always brings it
        return
    hub_logging.set_verbosity_error()


def resume_command(argv: Sequence[str]) -> str:
    """The command line that resumes a run started with ``argv``."""
    kept = [a for a in argv if a not in ("--overwrite", "--no-overwrite", "--resume", "--no-resume")]
    return shlex.join(["scalora", *kept, "--resume"])


def _checkpoint_state(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run's checkpoint folder and its trainer_state.json ({} when unreadable), or None without a checkpoint."""
    from scalora.train import checkpoint

    folder = checkpoint.find(output_dir)
    if folder is None:
        return None
    try:
        meta = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError, RecursionError):
        meta = {}
    return folder, meta if isinstance(meta, dict) else {}


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora train``: one run, its summary printed; Ctrl-C says how to resume."""
    values = training_values(args)
    values.setdefault("progress", sys.stderr.isatty())
    cfg = config_from_values(values)
    _quiet_libraries(args.verbose)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from scalora.train.loop import train

    try:
        result = train(cfg, log=print)
    except KeyboardInterrupt:
        out = Path(cfg.output_dir)
        found = _checkpoint_state(out)
        hint = "" if cfg.save_every else " (add --save-every N to write one every N steps)"
        if found is None:
            print(f"\ninterrupted before the first checkpoint was written{hint}; nothing to resume: run the "
                  f"command again to start over.", file=sys.stderr)
        elif found[1].get("fingerprint") != cfg.fingerprint():  # an earlier run's: the new one never saved
            print(f"\ninterrupted before this run's first checkpoint was written{hint}; the previous run in {out} "
                  f"is kept as it was. Run the command again to start over.", file=sys.stderr)
        else:
            folder, meta = found
            step = meta.get("step")
            at = f"step {step} of {cfg.steps}" if isinstance(step, int) else "unreadable step"
            print(f"\ninterrupted. The last checkpoint is {folder} ({at}); resume with:\n  {resume_command(argv)}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(report.format_summary(result.summary))
    return 0


def _evaluation_target(args: argparse.Namespace) -> tuple[str, dict[str, Any], Path | None, TrainConfig | None]:
    """(model to load, load_task arguments, adapter folder or None, the run's config or None)."""
    if args.run:
        clash = [flag for flag, value in (("--model", args.model), ("--task", args.task), ("--adapter", args.adapter),
                                          ("--train-file", args.train_file)) if value]
        if clash:
            raise ConfigError(f"--run takes the model, task and weights from the run; drop {', '.join(clash)}.")
        run = Path(args.run)
        summary = results.read_summary(run)
        if summary is None or not isinstance(summary.get("config"), dict):
            if _checkpoint_state(run) is not None:
                raise ScaloraError(f"the run in {run} has not finished (it has a checkpoint but no summary.json); "
                                   f"finish it with `scalora train ... --output-dir {run} --resume`.")
            raise ScaloraError(f"{run} holds no finished run (no summary.json); give the --output-dir of a "
                               f"`scalora train` run.")
        cfg = TrainConfig.from_dict(summary["config"])
        task_args = {"name_or_spec": cfg.task, "train_file": cfg.train_file, "eval_file": cfg.eval_file,
                     "train_size": cfg.train_size, "eval_size": cfg.eval_size, "seed": cfg.seed}
        if (run / "adapter").is_dir():
            model, adapter = cfg.model, run / "adapter"
        elif (run / "model").is_dir():
            model, adapter = str(run / "model"), None
        else:
            raise ScaloraError(f"{run} has neither adapter/ nor model/; the run did not save its result.")
    else:
        if not args.model:
            raise ConfigError("give --run DIR (a finished run), or --model NAME with --task or --eval-file.")
        if args.task is None and not (args.train_file or args.eval_file):
            raise ConfigError(f"give --task ({', '.join(BUILTIN_TASKS)}, hf:NAME) or --eval-file/--train-file.")
        cfg, model = None, args.model
        adapter = Path(args.adapter) if args.adapter else None
        task_args = {"name_or_spec": args.task, "train_file": args.train_file, "eval_file": args.eval_file,
                     "train_size": None, "eval_size": None, "seed": 0}
    if args.eval_file and task_args["name_or_spec"] in BUILTIN_TASKS:
        task_args.update(name_or_spec=None, train_file=None)  # a built-in task's own data is replaced
    task_args["eval_file"] = args.eval_file or task_args["eval_file"]
    if args.eval_size is not None:
        task_args["eval_size"] = args.eval_size
    if args.seed is not None:
        task_args["seed"] = args.seed
    return model, task_args, adapter, cfg


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``scalora eval``: the metric of a finished run, or of a model (with an adapter), on a task."""
    model_name, task_args, adapter, cfg = _evaluation_target(args)
    defaults = cfg or TrainConfig()
    max_length = args.max_length or defaults.max_length
    batch_size = args.batch_size or defaults.eval_batch_size
    for flag, value in (("--max-length", max_length), ("--batch-size", batch_size), ("--limit", args.limit),
                        ("--eval-size", args.eval_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    _quiet_libraries(args.verbose)
    from scalora.peft_format import load_adapter
    from scalora.train.loop import check_max_length
    from scalora.train.models import load_model
    from scalora.train.tasks import load_task

    task = load_task(**task_args)
    model, tokenizer = load_model(model_name, task.kind, num_labels=task.num_labels)
    check_max_length(max_length, model)
    if adapter is not None:
        load_adapter(model, adapter)
    start = time.perf_counter()
    result = task.evaluate(model, tokenizer, max_length=max_length, batch_size=batch_size, limit=args.limit)
    seconds = time.perf_counter() - start
    weights = f"{model_name}" + (f" + adapter {adapter}" if adapter else "")
    if args.json:
        print(json.dumps({"task": task.name, "metric": task.metric, "model": model_name,
                          "adapter": str(adapter) if adapter else None, **result, "seconds": seconds}))
        return 0
    n = int(result.get("n", 0))
    print(f"{task.name}: {task.metric} {result[task.metric]:.4f} on {n} examples ({weights}, {seconds:.1f} s)")
    for key, value in result.items():
        if key not in (task.metric, "n"):
            print(f"  {key} {value:.4f}")
    return 0
