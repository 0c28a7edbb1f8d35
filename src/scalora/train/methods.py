"""The seven methods behind one flag: how each adapts the model and builds its optimiser and schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from scalora.alpha_lora import AlphaScheduler, adapter_parameters
from scalora.config import LoraConfig
from scalora.model import apply_lora, plan_lora
from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA, jagged_cosine
from scalora.train.config import TrainConfig

#: methods that fold updates into the base weights while training (their checkpoints carry those weights)
MERGING = ("scalora", "scalora-i", "relora")
_HEADS = ("classifier", "score")


@dataclass
class Setup:
    """What the loop steps: the optimiser (maybe a ScaLoRA/ReLoRA wrapper), its schedule, α-LoRA's scheduler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    alpha: AlphaScheduler | None


def lora_config(cfg: TrainConfig, model: nn.Module) -> LoraConfig:
    """The adapter config of a method: the classification head (if any) trains in full beside the adapters."""
    heads = [name for name, _ in model.named_children() if name in _HEADS]
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
        use_rslora=cfg.method == "rslora", alpha_vector=cfg.method == "alpha-lora",
        modules_to_save=heads or None,
    )


def tracked_layers(cfg: TrainConfig, model: nn.Module) -> list[tuple[str, bool]]:
    """Up to `cfg.rank_layers` targeted layers, evenly spread, whose accumulated update's rank is tracked:
    (module name, weight stored as (in, out))."""
    config = lora_config(cfg, model)
    if cfg.method == "full":  # no adapters: any layer can be tracked, whatever --r says
        config = dataclasses.replace(config, r=1)
    plan = plan_lora(model, config)
    if cfg.rank_layers == 0:
        return []
    step = max(1, math.ceil(len(plan) / cfg.rank_layers))
    return [(item.name, item.layer_cls.fan_in_fan_out) for item in plan[::step]][: cfg.rank_layers]


def adapt(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """Full fine-tuning trains every weight; every other method adds adapters (and freezes the rest)."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    return apply_lora(model, lora_config(cfg, model))


def _lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build(cfg: TrainConfig, model: nn.Module) -> Setup:
    """AdamW over the trainable weights, wrapped as the method needs, and its LR schedule."""
    params = adapter_parameters(model) if cfg.method == "alpha-lora" else [
        p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer: torch.optim.Optimizer = inner
    if cfg.method in ("scalora", "scalora-i"):
        optimizer = ScaLoRA(model, inner, interval=cfg.interval, rule=cfg.scalora_rule, c=cfg.scalora_c,
                            tau=cfg.scalora_tau, mode=cfg.scalora_mode, transfer_moments=cfg.scalora_transfer_moments)
    elif cfg.method == "relora":
        optimizer = ReLoRA(model, inner, reset_every=cfg.reset_every, prune=cfg.relora_prune)
    if cfg.method == "relora":
        lr_lambda = partial(jagged_cosine, total_steps=cfg.steps, warmup=cfg.warmup_steps or cfg.relora_warmup,
                            reset_every=cfg.reset_every,
                            restart_warmup=min(cfg.relora_warmup, max(1, cfg.reset_every // 4)))
    else:
        lr_lambda = partial(_lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps, schedule=cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    alpha = AlphaScheduler(model, lr=cfg.alpha_lr, every=cfg.alpha_every) if cfg.method == "alpha-lora" else None
    return Setup(optimizer, scheduler, alpha)
