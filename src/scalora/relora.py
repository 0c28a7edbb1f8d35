"""ReLoRA (Lialin et al.), the restart baseline: every N steps merge s·B A into W0 and start the factors afresh.

At each reset: W0 ← W0 + s B A; A re-initialised (Kaiming), B ← 0; the factors' optimiser moments
magnitude-pruned (99 % by default); and the learning rate re-warmed (`jagged_cosine`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.finite import first_false, nonfinite_error
from scalora.moments import prune_moments
from scalora.side_branch import compress
from scalora.wrapper import OptimizerWrapper


class ReLoRA(OptimizerWrapper):
    """``ReLoRA(model, torch.optim.AdamW(...), reset_every=N, prune=0.99)``: resets after every N-th step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, reset_every: int,
                 prune: float = 0.99) -> None:
        if isinstance(reset_every, bool) or not isinstance(reset_every, int) or reset_every < 1:
            raise ConfigError(f"reset_every must be a positive integer, got {reset_every!r}.")
        if not 0.0 <= prune <= 1.0:
            raise ConfigError(f"prune must be a fraction in [0, 1], got {prune!r}.")
        super().__init__(model, optimizer)
        self.reset_every = reset_every
        self.prune = prune
        self.resets = 0

    def after_step(self) -> None:
        if self.num_steps % self.reset_every == 0:
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Merge every adapter into its base, re-initialise it, prune its moments. Refused (`NonFiniteError`, nothing
        changed) if a merge would write NaN or inf into a base weight."""
        bad = first_false([(name, layer.fold_finite(layer.lora_B * layer.scaling, layer.lora_A))
                           for name, layer in self.layers])
        if bad is not None:
            weight = dict(self.layers)[bad].weight
            raise nonfinite_error(weight.dtype, f"folding the update into the base weight of layer {bad!r}")
        for _, layer in self.layers:
            layer.fold_(layer.lora_B * layer.scaling, layer.lora_A)
            layer.reset_lora_parameters()
            for p in (layer.lora_A, layer.lora_B):
                prune_moments(self.optimizer.state.get(p, {}), self.prune)
        compress(layer.side_branch for _, layer in self.layers if layer.side_branch is not None)
        self.resets += 1

    def settings(self) -> dict[str, Any]:
        return {"reset_every": self.reset_every, "prune": self.prune}

    def extra_state(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.resets = int(state.get("resets", 0))


def jagged_cosine(step: int, *, total_steps: int, warmup: int, reset_every: int, restart_warmup: int) -> float:
    """ReLoRA's LR multiplier: linear warm-up, cosine decay to 0 over the run, and after every reset a linear
    re-warm-up over `restart_warmup` steps back to the cosine envelope."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    envelope = 0.5 * (1.0 + math.cos(math.pi * progress))
    since_reset = step % reset_every if step >= reset_every else restart_warmup
    if since_reset < restart_warmup:
        return envelope * (since_reset + 1) / restart_warmup
    return envelope
