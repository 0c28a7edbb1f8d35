"""`OptimizerWrapper`: a torch optimiser that adds work around another optimiser's step.

The wrapped optimiser keeps its parameter groups, state and defaults (so LR schedulers, GradScaler and
``transformers.Trainer`` see one ordinary optimiser); subclasses add `before_step` / `after_step` and their own
entries in the state dict. ScaLoRA and ReLoRA are both built on it, and both merge updates into the base weights
W0 of the adapted layers (scalora's or PEFT's, through `scalora.factors`). Hence the wrapper

* marks those layers, so that saving an adapter alone (which lacks W0) is refused (`scalora.save_guard`);
* carries W0 in its state dict where the model's own checkpoints do not hold it (PEFT saves the adapter only), so
  a run resumes exactly from ``optimizer.state_dict()`` (``transformers.Trainer``, ``accelerate``, own loops).
"""

from __future__ import annotations

import sys
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.factors import LoraFactors, lora_factors
from scalora.save_guard import guard_saves

#: key of the state dict that carries base weights the model's checkpoints lack
BASE_WEIGHTS = "base_weights"


class OptimizerWrapper(torch.optim.Optimizer):
    """Delegates to `optimizer`; counts optimiser steps in `num_steps` (from 1) and calls the hooks around them."""

    #: the subclass works on FSDP2's sharded parameters (`scalora.sharded`)
    supports_fsdp2 = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, OptimizerWrapper):
            raise ConfigError(f"the optimiser is already wrapped in {type(optimizer).__name__}.")
        accelerated = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)
        if accelerated is not None and isinstance(optimizer, accelerated):
            raise ConfigError(f"the optimiser was prepared by accelerate; build {type(self).__name__} over the plain "
                              f"optimiser and prepare it with the model: model, optimizer = accelerator.prepare(model, "
                              f"{type(self).__name__}(model, torch.optim.AdamW(model.parameters()))).")
        self.layers: list[tuple[str, LoraFactors]] = self.find_layers(model)
        if not self.layers:
            raise ConfigError("the model has no LoRA layers: add them with scalora.apply_lora(model, "
                              "scalora.LoraConfig(...)) or peft.get_peft_model(model, peft.LoraConfig(...)) first.")
        _refuse_sharded(model, self.layers, type(self).supports_fsdp2)
        inactive = [name for name, layer in self.layers if not layer.active]
        if inactive:
            raise ConfigError(f"the adapter of {inactive[0]!r} is merged into its base weight or disabled; unmerge "
                              f"or enable the adapters before training.")
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        tied = [name for name, layer in self.layers if uses[id(layer.weight)] > 1]
        if tied:
            raise ConfigError(f"the base weight of {tied[0]!r} is shared with another module (tied input and output "
                              f"embeddings): merging updates into it would change that module too. Leave it out of "
                              f"target_modules, or untie the weights first (load the model with "
                              f"tie_word_embeddings=False).")
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers
                   if id(layer.lora_A) not in optimised or id(layer.lora_B) not in optimised]
        if missing:
            raise ConfigError(f"the optimiser does not update the LoRA factors of {missing[0]!r}; build it over "
                              f"model.parameters() (or every lora_A / lora_B).")
        self.optimizer = optimizer
        self.num_steps = 0
        while isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        guard_saves(model)
        # torch.optim.Optimizer's bookkeeping (hooks, step profiling), without a second copy of the state.
        self.__setstate__({})

    def find_layers(self, model: nn.Module) -> list[tuple[str, LoraFactors]]:
        """The adapted layers the wrapper acts on: the model's own (`lora_factors`)."""
        return lora_factors(model)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        name = type(self).__name__
        raise ConfigError(f"the parameter groups of {name} are those of the optimiser it wraps and cannot be replaced, "
                          f"as DeepSpeed's ZeRO does with its client optimiser: {name} cannot be DeepSpeed's client "
                          f"optimiser. For ScaLoRA under ZeRO pass the plain optimiser to deepspeed.initialize and "
                          f"call scalora.zero.ZeroScaLoRA(engine).before_step() between engine.backward(loss) and "
                          f"engine.step().")

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
        self._mark_base_changed()
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
        """The wrapped optimiser's state plus the wrapper's counters and settings, and the base weights (with
        their fold compensation) of layers whose model checkpoints do not hold them."""
        ours = {"num_steps": self.num_steps, **self.settings(), **self.extra_state()}
        state = {"optimizer": self.optimizer.state_dict(), "wrapper": type(self).__name__, "scalora": ours}
        base = {name: {"weight": layer.base_weight_oi(), "compensation": layer.base_compensation}
                for name, layer in self.layers if not layer.base_in_state_dict}
        if base:
            state[BASE_WEIGHTS] = base
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        name = type(self).__name__
        if state_dict.get("wrapper", name) != name or "scalora" not in state_dict or "optimizer" not in state_dict:
            raise ConfigError(f"this is not a {name} optimiser state (it was saved by "
                              f"{state_dict.get('wrapper', 'a plain optimiser')}).")
        ours = state_dict["scalora"]
        for key, value in self.settings().items():
            if key in ours and ours[key] != value:
                raise ConfigError(f"the saved {name} state has {key}={ours[key]!r} but this optimiser has {value!r}: "
                                  f"build it with {key}={ours[key]!r} to resume that run.")
        self._load_base_weights(state_dict.get(BASE_WEIGHTS))
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.num_steps = int(ours["num_steps"])
        self.load_extra_state(ours)
        self._mark_base_changed()

    def _mark_base_changed(self) -> None:
        """From the moment a wrapper takes charge of the layers (built, or resumed) their base weights may change at
        any step: mark them, so that saving the adapter alone is refused from then on."""
        for _, layer in self.layers:
            layer.mark_base_changed()

    @torch.no_grad()
    def _load_base_weights(self, saved: dict[str, dict[str, torch.Tensor | None]] | None) -> None:
        """Restore W0 (and its compensation) of the layers whose model checkpoints lack it, after checking all."""
        layers = [(name, layer) for name, layer in self.layers if not layer.base_in_state_dict]
        if not layers:
            return
        if saved is None:
            raise ConfigError(f"this {type(self).__name__} state holds no base weights, but the model's checkpoints "
                              f"(PEFT's adapter files) lack them; it was saved by another version or for another "
                              f"model.")
        for name, layer in layers:
            weight = saved.get(name, {}).get("weight")
            if weight is None or tuple(weight.shape) != tuple(layer.base_weight_oi().shape):
                raise ConfigError(f"the saved {type(self).__name__} state has no base weight of shape "
                                  f"{tuple(layer.base_weight_oi().shape)} for layer {name!r}; it was saved for "
                                  f"another model.")
        for name, layer in layers:
            layer.base_weight_oi().copy_(saved[name]["weight"])
            compensation = saved[name].get("compensation")
            if compensation is not None:
                layer.enable_compensation(compensation.dtype)
                layer.base_compensation.copy_(compensation)


def _refuse_sharded(model: nn.Module, layers: list[tuple[str, LoraFactors]], fsdp2: bool) -> None:
    """Refuse (`ConfigError`) models sharded by FSDP1, whose flat parameters hold no whole row of W0 or B on one rank,
    and, unless `fsdp2`, models whose LoRA layers are sharded `DTensor`s (FSDP2's fully_shard)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ConfigError("the model is wrapped in FSDP (FullyShardedDataParallel), whose flat parameters hold no "
                          "whole LoRA factor or base weight on one rank; ScaLoRA and ReLoRA merge into the base "
                          "weights and cannot run under it. Train with DistributedDataParallel (the LoRA factors and "
                          "their optimiser state are small), and shard only if the model does not fit otherwise.")
    sharded = [name for name, layer in layers if any(isinstance(t, DTensor) for t in (layer.lora_A, layer.weight))]
    if sharded and not fsdp2:
        raise ConfigError(f"the parameters of {sharded[0]!r} are sharded DTensors (FSDP2's fully_shard or tensor "
                          f"parallelism), which this optimiser wrapper does not support (ScaLoRA does). Train with "
                          f"DistributedDataParallel.")
