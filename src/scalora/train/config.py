"""`TrainConfig`: everything that defines a training run, validated, with the defaults the CLI shows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from scalora.errors import ConfigError
from scalora.optim import DEFAULT_TAU, RULES

METHODS = ("full", "lora", "rslora", "alpha-lora", "scalora", "scalora-i", "relora")
SCHEDULES = ("linear", "cosine", "constant")
# Fields that do not change the computation: a run may be resumed with other values for them.
_NOT_IDENTITY = {"output_dir", "resume", "overwrite", "log_every", "eval_every", "save_every", "progress",
                 "export_rank", "tensorboard", "eval_batch_size", "eval_limit", "rank_layers"}


@dataclass
class TrainConfig:
    """One training run. ``lr=None`` picks the method's default (5e-5 for full fine-tuning, 5e-4 otherwise)."""

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
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.scalora_rule not in RULES:
            raise ConfigError(f"scalora_rule must be one of {', '.join(RULES)}, got {self.scalora_rule!r}.")
        if self.scalora_mode not in ("column", "scalar"):
            raise ConfigError(f"scalora_mode must be 'column' or 'scalar', got {self.scalora_mode!r}.")
        for name in ("r", "batch_size", "grad_accum", "steps", "max_length", "eval_batch_size", "alpha_every",
                     "alpha_holdout", "relora_warmup", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("scalora_interval", "relora_every", "export_rank", "train_size", "eval_size", "eval_limit",
                     "max_new_tokens"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "rank_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a whole number ≥ 0, got {value!r}.")
        if self.scalora_c is not None and not self.scalora_c > 0:
            raise ConfigError(f"scalora_c must be positive (or none for the rule's default), got {self.scalora_c!r}.")
        for name in ("lora_alpha", "scalora_tau", "alpha_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm!r}.")
        if not 0.0 <= self.relora_prune <= 1.0:
            raise ConfigError(f"relora_prune must be in [0, 1], got {self.relora_prune!r}.")
        if self.task is None and self.train_file is None and self.eval_file is None:
            self.task = "sarcasm"

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-5 if self.method == "full" else 5e-4

    @property
    def interval(self) -> int:
        if self.scalora_interval is not None:
            return self.scalora_interval
        return 10 if self.method == "scalora-i" else 1

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


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
