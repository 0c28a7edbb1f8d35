"""α-LoRA's training schedule (El Firdoussi et al.): the α vectors learn on held-out data with their own optimiser.

The adapters train as usual (α's gradient from those steps is discarded: the vectors are frozen then); every
`every` adapter steps the α vectors take one step of their own Adam on a batch from a held-out split of the
training data, with every other parameter frozen. Paper defaults: Adam, lr 5e-3, betas (0.9, 0.99), every 10.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.model import lora_layers


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The α vectors of every LoRA layer."""
    return [layer.alpha_vector for _, layer in lora_layers(model) if layer.alpha_vector is not None]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that are not α vectors (what the adapters' own optimiser steps)."""
    alphas = {id(p) for p in alpha_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in alphas]


class AlphaScheduler:
    """Steps the α vectors every `every` steps on held-out batches; keeps them frozen otherwise."""

    def __init__(self, model: nn.Module, *, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.99),
                 every: int = 10) -> None:
        self.model = model
        self.vectors = alpha_parameters(model)
        if not self.vectors:
            raise ConfigError("the model has no α vectors: use LoraConfig(alpha_vector=True).")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a positive integer, got {every!r}.")
        self.every = every
        self.optimizer = torch.optim.Adam(self.vectors, lr=lr, betas=betas)
        for p in self.vectors:
            p.requires_grad_(False)

    @contextmanager
    def _only_alpha(self) -> Iterator[None]:
        others = [p for p in self.model.parameters() if p.requires_grad]
        for p in others:
            p.requires_grad_(False)
        for p in self.vectors:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self.vectors:
                p.requires_grad_(False)
                p.grad = None
            for p in others:
                p.requires_grad_(True)

    def step(self, global_step: int, held_out_loss: Callable[[], torch.Tensor]) -> float | None:
        """After adapter step `global_step` (from 1): if it is a multiple of `every`, one α step on
        ``held_out_loss()`` (a closure computing the loss of one held-out batch). Returns that loss or None."""
        if global_step % self.every != 0:
            return None
        with self._only_alpha():
            loss = held_out_loss()
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
