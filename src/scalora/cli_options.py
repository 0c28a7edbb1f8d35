"""How `TrainConfig`'s fields become command-line options: flags, types, choices, help, and back to values.

`add_training_options` adds one flag per field (grouped, with the help text kept on the field and the field's
default shown); `training_values` reads back the fields that were given. The small option types (`optional`,
`seeds`, `parse_target_modules`) live here too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

from scalora.errors import ConfigError
from scalora.optim import MODES, RULES
from scalora.train.compare import option_flag, parse_list
from scalora.train.config import SCHEDULES, TrainConfig
from scalora.train.models import ALIASES
from scalora.train.registry import METHODS
from scalora.train.tasks import BUILTIN_TASKS


def methods_text() -> str:
    return "; ".join(f"{m.name} ({m.help})" for m in METHODS.values())


def aliases_text() -> str:
    return ", ".join(f"{name} ({a.description})" for name, a in ALIASES.items())


def tasks_text() -> str:
    builtin = "; ".join(f"{name} ({t.description})" for name, t in BUILTIN_TASKS.items())
    return f"{builtin}; hf:DATASET[:CONFIG] (needs the datasets package); or none with --train-file"


_GROUPS: dict[str, tuple[str, ...]] = {
    "model and data": ("model", "task", "method", "train_file", "eval_file", "train_size", "eval_size", "max_length",
                       "max_new_tokens"),
    "adapters": ("r", "lora_alpha", "lora_dropout", "target_modules"),
    "optimisation": ("lr", "weight_decay", "batch_size", "grad_accum", "steps", "warmup_steps", "schedule",
                     "max_grad_norm", "seed"),
    "method-specific": ("scalora_rule", "scalora_c", "scalora_tau", "scalora_interval", "scalora_mode",
                        "scalora_transfer_moments", "alpha_lr", "alpha_every", "alpha_holdout", "relora_every",
                        "relora_prune", "relora_warmup"),
    "evaluation, logging and output": ("eval_every", "eval_limit", "eval_batch_size", "log_every", "save_every",
                                       "rank_layers", "output_dir", "resume", "overwrite", "export_rank", "progress",
                                       "tensorboard"),
}
_CHOICES: dict[str, Sequence[str]] = {"method": tuple(METHODS), "schedule": SCHEDULES,
                                     "scalora_mode": MODES, "scalora_rule": RULES}
_EXTRA_FLAGS: dict[str, tuple[str, ...]] = {"r": ("--rank",)}
_REGEX_CHARS = set("\\^$.|?*+()[]{}")

# ---------------------------------------------------------------------------------------------------------
# Option types.


def parse_target_modules(text: str) -> str | list[str]:
    """``all-linear``; a comma list of names (``query,value``); or a regex (anything with regex characters)."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("give all-linear, a comma list of module names, or a regex")
    if text == "all-linear":
        return text
    if _REGEX_CHARS & set(text):
        import re

        try:
            re.compile(text)
        except re.error as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid regex ({e})") from None
        return text
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty module name")
    return names


def optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "auto", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in parse_list(text, "--seeds")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _annotation(f: Field) -> tuple[str, bool]:
    """(base type name, accepts None) of a TrainConfig field, from its annotation string."""
    parts = [p.strip() for p in str(f.type).split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    return (parts[0] if len(parts) == 1 else " | ".join(parts)), nullable


def _default_text(f: Field) -> str:
    """`` (default: X)`` for help texts; nothing for None and flags (their help says what the default means)."""
    if f.default is MISSING or f.default is None or isinstance(f.default, bool):
        return ""
    return f" (default: {f.default})"


def add_training_options(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = (),
                         defaults: dict[str, Any] | None = None) -> None:
    """One flag per TrainConfig field (``batch_size`` → ``--batch-size``), grouped, with its help and default.

    Every flag defaults to "not given" (argparse.SUPPRESS), so only what the user typed reaches the config and
    TrainConfig keeps the defaults in one place; ``defaults`` only changes the shown defaults (the demo's).
    """
    defaults = defaults or {}
    by_name = {f.name: f for f in fields(TrainConfig) if f.name not in exclude}
    grouped = {name for names in _GROUPS.values() for name in names}
    groups = list(_GROUPS.items()) + [("other training options", tuple(n for n in by_name if n not in grouped))]
    fill = {"aliases": aliases_text(), "tasks": tasks_text(), "methods": methods_text()}
    for title, names in groups:
        names = tuple(n for n in names if n in by_name)
        if not names:
            continue
        group = parser.add_argument_group(f"training options: {title}")
        for name in names:
            f = by_name[name]
            base, nullable = _annotation(f)
            help_text = f.metadata["help"].format(**fill)
            shown = f" (default: {defaults[name]})" if name in defaults else _default_text(f)
            flags = [option_flag(name), *_EXTRA_FLAGS.get(name, ())]
            kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text + shown}
            if base == "bool":
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if name == "target_modules":
                convert: Callable[[str], Any] = parse_target_modules
                kwargs["metavar"] = "SPEC"
            elif base == "int":
                convert, kwargs["metavar"] = int, "N"
            elif base == "float":
                convert, kwargs["metavar"] = float, "X"
            else:
                convert = str
                kwargs["metavar"] = "PATH" if name.endswith(("_file", "_dir")) else "NAME"
            if name in _CHOICES:
                kwargs["choices"] = list(_CHOICES[name])
                kwargs["metavar"] = "{" + ",".join(_CHOICES[name]) + "}"
            group.add_argument(*flags, type=optional(convert) if nullable else convert, **kwargs)


def training_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}
