"""What the loop trains with: the adapted model and the optimiser, schedule and step hook of `cfg.method`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scalora.alpha_lora import adapter_parameters
from scalora.config import LoraConfig
from scalora.model import apply_lora, plan_lora
from scalora.train.config import TrainConfig
from scalora.train.hooks import Collate, StepHook
from scalora.train.registry import METHODS

_HEADS = ("classifier", "score")


@dataclass
class Setup:
    """What the loop steps: the optimiser (maybe a ScaLoRA/ReLoRA wrapper), its schedule, the method's step hook."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hook: StepHook


def lora_config(cfg: TrainConfig, model: nn.Module) -> LoraConfig:
    """The adapter config of a method: the classification head (if any) trains in full beside the adapters."""
    method = METHODS[cfg.method]
    heads = [name for name, _ in model.named_children() if name in _HEADS]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
        use_rslora=method.use_rslora, alpha_vector=method.alpha_vector, modules_to_save=heads or None,
    )


def tracked_layers(cfg: TrainConfig, model: nn.Module) -> list[tuple[str, bool]]:
    """Up to `cfg.rank_layers` targeted layers, evenly spread, whose accumulated update's rank is tracked:
    (module name, weight stored as (in, out))."""
    config = lora_config(cfg, model)
    if not METHODS[cfg.method].adapters:  # any layer can be tracked, whatever --r says
        config = dataclasses.replace(config, r=1)
    plan = plan_lora(model, config)
    if cfg.rank_layers == 0:
        return []
    step = max(1, math.ceil(len(plan) / cfg.rank_layers))
    return [(item.name, item.layer_cls.fan_in_fan_out) for item in plan[::step]][: cfg.rank_layers]


def adapt(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """Add the method's adapters (and freeze the rest), or, for a method without adapters, train every weight."""
    if not METHODS[cfg.method].adapters:
        model.requires_grad_(True)
        return model
    return apply_lora(model, lora_config(cfg, model))


def build(cfg: TrainConfig, model: nn.Module, *, held: list[dict[str, Any]] | None = None,
          collate: Collate | None = None) -> Setup:
    """AdamW over the trainable weights (α vectors aside), wrapped as the method needs, its LR schedule and its step
    hook; `held` (the examples `Method.split` held out) and `collate` serve the hook."""
    method = METHODS[cfg.method]
    inner = torch.optim.AdamW(adapter_parameters(model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer = inner if method.wrap is None else method.wrap(cfg, model, inner)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, method.schedule(cfg))
    return Setup(optimizer, scheduler, method.hook(cfg, model, optimizer, held or [], collate))
