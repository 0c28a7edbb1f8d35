"""`TrainConfig`: everything that defines a training run, validated, with the defaults the CLI shows."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from scalora.errors import ConfigError
from scalora.optim import DEFAULT_TAU, RULES
from scalora.train.registry import METHODS

SCHEDULES = ("linear", "cosine", "constant")
INT_MAX = 2**31 - 1  # counts and sizes beyond this are typos (and overflow torch's 32-bit arguments)
SEED_MAX = 2**32 - 1
# Fields that do not change the computation: a run may be resumed with other values for them.
_NOT_IDENTITY = {"output_dir", "resume", "overwrite", "log_every", "eval_every", "save_every", "progress",
                 "export_rank", "tensorboard", "eval_batch_size", "eval_limit", "rank_layers"}


@dataclass
class TrainConfig:
    """One training run. ``lr=None`` picks the method's default (`Method.default_lr`)."""

    model: str = "minilm"
    task: str | None = None  # default: "sarcasm", unless train/eval files are given
    method: str = "lora"
    train_file: str | None = None
    eval_file: str | None = None
    train_size: int | None = None
    eval_size: int | None = None
    max_length: int = 64
    max_new_tokens: int | None = None  # generation length of generation tasks (gsm: 256)
    # adapters
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    # optimisation
    lr: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 200
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # method-specific
    scalora_rule: str = "optimizer"  # "optimizer" (fits the optimiser's next step) or "paper"
    scalora_c: float | None = None  # None: "auto" for the optimiser-aware rule, 1.0 for the paper's
    scalora_tau: float = DEFAULT_TAU
    scalora_interval: int | None = None  # 1 for scalora, 10 for scalora-i
    scalora_mode: str = "column"
    scalora_transfer_moments: bool = True
    alpha_lr: float = 5e-3
    alpha_every: int = 10
    alpha_holdout: int = 256
    relora_every: int | None = None  # default: steps // 4
    relora_prune: float = 0.99
    relora_warmup: int = 10  # re-warm-up steps after each reset (at most a quarter of relora_every)
    # evaluation, logging, output
    eval_every: int = 0  # 0: only at the end
    eval_limit: int | None = None
    eval_batch_size: int = 32
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    rank_layers: int = 12
    output_dir: str = "runs/run"
    resume: bool = False
    overwrite: bool = False
    export_rank: int | None = None
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        """Every field's type and range, checked before anything is loaded or written."""
        for name in ("model", "output_dir"):
            _text(name, getattr(self, name))
        for name in ("task", "train_file", "eval_file"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        for name, choices in (("method", METHODS), ("schedule", SCHEDULES), ("scalora_rule", RULES),
                              ("scalora_mode", ("column", "scalar"))):
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
        for name in ("lora_alpha", "scalora_tau", "alpha_lr"):
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
        return self.lr if self.lr is not None else METHODS[self.method].default_lr(self.scalora_rule)

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


#: fields added after runs were first written, with the value those runs implied
_IMPLIED_BEFORE: dict[str, Any] = {"scalora_rule": "paper", "scalora_tau": DEFAULT_TAU}


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
