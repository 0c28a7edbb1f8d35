"""`OptimizerWrapper`: a torch optimiser that adds work around another optimiser's step.

The wrapped optimiser keeps its parameter groups, state and defaults (so LR schedulers, GradScaler and
``transformers.Trainer`` see one ordinary optimiser); subclasses add `before_step` / `after_step` and their own
entries in the state dict. ScaLoRA and ReLoRA are both built on it.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.layers import LoraLayer
from scalora.model import lora_layers


class OptimizerWrapper(torch.optim.Optimizer):
    """Delegates to `optimizer`; counts optimiser steps in `num_steps` (from 1) and calls the hooks around them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, OptimizerWrapper):
            raise ConfigError(f"the optimiser is already wrapped in {type(optimizer).__name__}.")
        self.layers: list[tuple[str, LoraLayer]] = list(lora_layers(model))
        if not self.layers:
            raise ConfigError("the model has no LoRA layers: call scalora.apply_lora(model, config) first.")
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers
                   if id(layer.lora_A) not in optimised or id(layer.lora_B) not in optimised]
        if missing:
            raise ConfigError(f"the optimiser does not update the LoRA factors of {missing[0]!r}; build it over "
                              f"model.parameters() (or every lora_A / lora_B).")
        self.optimizer = optimizer
        self.num_steps = 0
        # torch.optim.Optimizer's bookkeeping (hooks, step profiling), without a second copy of the state.
        self.__setstate__({})

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            self.__dict__.setdefault(name, OrderedDict())
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def before_step(self) -> None:
        """Work done after backward and before the wrapped optimiser's step (`num_steps` already counts it)."""

    def after_step(self) -> None:
        """Work done after the wrapped optimiser's step."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        self.before_step()
        self.optimizer.step()
        self.after_step()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def settings(self) -> dict[str, Any]:
        """Hyperparameters a saved state must agree with to be resumed."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Counters of the subclass to save beside `num_steps`."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimiser's state plus the wrapper's counters and settings."""
        ours = {"num_steps": self.num_steps, **self.settings(), **self.extra_state()}
        return {"optimizer": self.optimizer.state_dict(), "wrapper": type(self).__name__, "scalora": ours}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        name = type(self).__name__
        if state_dict.get("wrapper", name) != name or "scalora" not in state_dict or "optimizer" not in state_dict:
            raise ConfigError(f"this is not a {name} optimiser state (it was saved by "
                              f"{state_dict.get('wrapper', 'a plain optimiser')}).")
        ours = state_dict["scalora"]
        for key, value in self.settings().items():
            if key in ours and ours[key] != value:
                raise ConfigError(f"the saved {name} state has {key}={ours[key]!r} but this optimiser has {value!r}.")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.num_steps = int(ours["num_steps"])
        self.load_extra_state(ours)
