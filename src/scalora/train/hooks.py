"""What a method does around an optimiser step beyond the step itself: α-LoRA's held-out step, ScaLoRA's report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scalora.alpha_lora import AlphaScheduler
from scalora.errors import ConfigError
from scalora.optim import ScaLoRA
from scalora.train.order import BatchOrder

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


class StepHook:
    """Nothing around the step (most methods); subclasses add work, metrics and checkpointed state."""

    #: the key of its state in a checkpoint's training state (None: it keeps none)
    key: str | None = None

    def after_step(self, step: int) -> dict[str, float]:
        """Work after optimiser step `step` (from 1), counted in the step's time; returns its metrics."""
        return {}

    def stats(self, step: int) -> dict[str, float]:
        """Metrics of step `step` that cost nothing to read (they are not timed)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class ScalingReport(StepHook):
    """ScaLoRA's scaling statistics, on the steps that rescaled."""

    def __init__(self, optimizer: ScaLoRA) -> None:
        self.optimizer = optimizer

    def stats(self, step: int) -> dict[str, float]:
        last = self.optimizer.last_stats
        return last.as_dict() if last.step == step else {}


class HeldOutAlphaStep(StepHook):
    """α-LoRA: every `alpha_every` steps, one step of the α vectors on a batch of the held-out examples."""

    key = "alpha"

    def __init__(self, model: nn.Module, held: list[dict[str, Any]], collate: Collate | None, *, lr: float,
                 every: int, batch_size: int, seed: int) -> None:
        if not held or collate is None:
            raise ValueError("α-LoRA's step needs the held-out examples and their collate function.")
        self.model, self.held, self.collate, self.every = model, held, collate, every
        self.scheduler = AlphaScheduler(model, lr=lr, every=every)
        self.order = BatchOrder(len(held), min(batch_size, len(held)), seed + 1)

    def after_step(self, step: int) -> dict[str, float]:
        batch = [self.held[i] for i in self.order(step // self.every)]
        loss = self.scheduler.step(step, lambda: self.model(**self.collate(batch)).loss)
        return {} if loss is None else {"alpha/heldout_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def split_holdout(examples: list[dict[str, Any]], holdout: int, batch_size: int) -> tuple[list[dict], list[dict]]:
    """α-LoRA trains its vectors on a held-out slice of the training data: its last `holdout` examples."""
    if len(examples) < holdout + batch_size:
        raise ConfigError(f"alpha-lora holds out {holdout} training examples for its α vectors, but the task has "
                          f"only {len(examples)}; lower --alpha-holdout or use more data.")
    return examples[:-holdout], examples[-holdout:]
