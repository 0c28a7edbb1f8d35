"""The methods behind ``--method``: one `Method` object each, the only place that tells them apart.

The command line's choices and help, the configuration's defaults, the training loop and the reports all read
`METHODS`; a new method is one more object here. The formulas are in docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA, jagged_cosine
from scalora.train.hooks import Collate, HeldOutAlphaStep, ScalingReport, StepHook, split_holdout

if TYPE_CHECKING:
    from scalora.train.config import TrainConfig

Examples = list[dict[str, Any]]


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's factor at `step`: linear warm-up over `warmup` steps, then `schedule` (linear, cosine or
    constant) to step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def warmup_then_decay(cfg: TrainConfig) -> Callable[[int], float]:
    """``--warmup-steps`` of linear warm-up, then ``--schedule`` (linear, cosine or constant) to the last step."""
    return partial(lr_multiplier, warmup=cfg.warmup_steps, total=cfg.steps, schedule=cfg.schedule)


def relora_multiplier(total: int, warmup: int, reset_every: int, restart_warmup: int) -> Callable[[int], float]:
    """ReLoRA's jagged cosine over `total` steps: `warmup` steps of warm-up, and after each restart a re-warm-up over
    `restart_warmup` steps, at most a quarter of the restart period."""
    return partial(jagged_cosine, total_steps=total, warmup=warmup, reset_every=reset_every,
                   restart_warmup=min(restart_warmup, max(1, reset_every // 4)))


def _restarts(cfg: TrainConfig) -> Callable[[int], float]:
    """ReLoRA's jagged cosine: a short re-warm-up after each restart."""
    return relora_multiplier(cfg.steps, cfg.warmup_steps or cfg.relora_warmup, cfg.reset_every, cfg.relora_warmup)


def _scalora(cfg: TrainConfig, model: nn.Module, inner: torch.optim.Optimizer) -> ScaLoRA:
    return ScaLoRA(model, inner, interval=cfg.interval, rule=cfg.scalora_rule, c=cfg.scalora_c_choice,
                   tau=cfg.scalora_tau, factor_norm=cfg.scalora_factor_norm, mode=cfg.scalora_mode,
                   transfer_moments=cfg.scalora_transfer_moments)


def _relora(cfg: TrainConfig, model: nn.Module, inner: torch.optim.Optimizer) -> ReLoRA:
    return ReLoRA(model, inner, reset_every=cfg.reset_every, prune=cfg.relora_prune)


def _no_hook(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, held: Examples,
             collate: Collate | None) -> StepHook:
    return StepHook()


def _scaling_report(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, held: Examples,
                    collate: Collate | None) -> StepHook:
    return ScalingReport(cast(ScaLoRA, optimizer))  # built by _scalora


def _alpha_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, held: Examples,
                collate: Collate | None) -> StepHook:
    return HeldOutAlphaStep(model, held, collate, lr=cfg.alpha_lr, every=cfg.alpha_every,
                            batch_size=cfg.batch_size, seed=cfg.seed)


def _keep_all(cfg: TrainConfig, examples: Examples) -> tuple[Examples, Examples]:
    return examples, []


def _hold_out(cfg: TrainConfig, examples: Examples) -> tuple[Examples, Examples]:
    return split_holdout(examples, cfg.alpha_holdout, cfg.batch_size)


@dataclass(frozen=True)
class Method:
    """One training method: how it is shown, and how the loop adapts, optimises, steps and saves with it."""

    name: str
    help: str
    label: str  # in plots and tables
    color: str  # matplotlib colour in plots
    lr: float = 5e-4  # default peak learning rate
    #: default learning rate when ScaLoRA's c is picked by the first-order rule (its step grows like lr²)
    first_order_lr: float | None = None
    adapters: bool = True  # False: no adapters, every weight trains
    use_rslora: bool = False
    alpha_vector: bool = False
    #: the frozen weights change while training: checkpoints carry every weight, the result is the merged model
    changes_base: bool = False
    interval: int = 1  # default --scalora-interval
    #: wraps AdamW (ScaLoRA, ReLoRA): (config, model, AdamW) → the optimiser the loop steps
    wrap: Callable[[TrainConfig, nn.Module, torch.optim.Optimizer], torch.optim.Optimizer] | None = None
    schedule: Callable[[TrainConfig], Callable[[int], float]] = warmup_then_decay
    #: (config, training examples) → (examples it trains on, examples it holds out)
    split: Callable[[TrainConfig, Examples], tuple[Examples, Examples]] = _keep_all
    #: (config, model, optimiser, held-out examples, collate) → what it does around each step
    hook: Callable[[TrainConfig, nn.Module, torch.optim.Optimizer, Examples, Collate | None], StepHook] = _no_hook

    @property
    def result(self) -> str:
        """``"adapter"`` (the adapter alone) or ``"model"`` (the whole model, adapters merged)."""
        return "model" if self.changes_base else "adapter"

    def default_lr(self, first_order: bool = False) -> float:
        """The learning rate when ``--lr`` is not given (`first_order`: ScaLoRA's c picked by the first-order rule)."""
        return self.first_order_lr if self.first_order_lr is not None and first_order else self.lr


_ALL = (
    Method("full", "full fine-tuning of every weight", "Full FT", "black", lr=5e-5, adapters=False,
           changes_base=True),
    Method("lora", "LoRA, update scaled by lora_alpha/r", "LoRA", "tab:blue"),
    Method("rslora", "rank-stabilised LoRA, scaled by lora_alpha/sqrt(r)", "rsLoRA", "tab:cyan", use_rslora=True),
    Method("alpha-lora", "LoRA with learned α vectors rescaling the frozen weights", "α-LoRA", "tab:purple",
           alpha_vector=True, split=_hold_out, hook=_alpha_step),
    Method("scalora", "ScaLoRA: optimally scaled, accumulated low-rank steps every step", "ScaLoRA", "tab:red",
           first_order_lr=2e-3, changes_base=True, wrap=_scalora, hook=_scaling_report),
    Method("scalora-i", "ScaLoRA every --scalora-interval steps (10 by default)", "ScaLoRA-I (I=10)", "tab:orange",
           first_order_lr=2e-3, changes_base=True, interval=10, wrap=_scalora, hook=_scaling_report),
    Method("relora", "ReLoRA: merge and restart the adapters periodically", "ReLoRA", "tab:brown",
           changes_base=True, wrap=_relora, schedule=_restarts),
)

#: every method by name, in the order the command line lists them
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
