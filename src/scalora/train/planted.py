"""A planted teacher: the task where the rank of the update decides, shared by the demo and the benchmark.

A "pre-trained" MLP 64 → 256 → 256 → 64 (GELU, seeded random weights) is trained towards a teacher, the same network
with every weight moved by a full-rank perturbation D ~ N(0, 0.3² / in). Inputs x ~ N(0, I) are fresh every step
(batch 128, mean squared error); the loss reported is the held-out one on 4 096 fixed inputs divided by its value
at the start, so every run starts at 1. An adapter of rank r moves each weight by rank r only, so LoRA stops at its
rank floor while full fine-tuning goes on; ScaLoRA's accumulated update is not bound by r.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from scalora.config import LoraConfig
from scalora.factors import lora_factors
from scalora.model import apply_lora
from scalora.rank import accumulated_updates, effective_rank, snapshot_base_weights
from scalora.relora import ReLoRA
from scalora.train.registry import lr_multiplier, relora_multiplier
from scalora.wrapper import OptimizerWrapper

WIDTHS = (64, 256, 256, 64)
PERTURBATION = 0.3
TRACKED = "2"  # the middle layer (256 × 256), whose accumulated update's rank is tracked
BATCH = 128


@dataclass(frozen=True)
class PlantedMethod:
    """How one run adapts and optimises the student: rank (0 = full fine-tuning), optimiser wrapper and its options."""

    r: int
    wrapper: type[OptimizerWrapper] | None = None  # e.g. ScaLoRA or ReLoRA; None: plain AdamW
    options: dict[str, Any] = field(default_factory=dict)


def pretrained_mlp(seed: int) -> nn.Sequential:
    """The "pre-trained" network: seeded random weights (Kaiming-uniform, as nn.Linear initialises them)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(WIDTHS) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def teacher_of(student: nn.Sequential, seed: int) -> nn.Sequential:
    """The student with every weight moved by a full-rank Gaussian D ~ N(0, PERTURBATION² / in)."""
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for layer in teacher:
            if isinstance(layer, nn.Linear):
                scale = PERTURBATION / math.sqrt(layer.in_features)
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * scale)
    return teacher.requires_grad_(False)


def adapter_optimizer(method: PlantedMethod, model: nn.Module, lr: float, **targets: Any) -> torch.optim.Optimizer:
    """LoRA of rank ``method.r`` (lora_alpha = 2r) on `targets` (`LoraConfig`'s ``target_modules`` /
    ``exclude_modules``), AdamW over the adapters (no weight decay), wrapped as `method` says."""
    apply_lora(model, LoraConfig(r=method.r, lora_alpha=2 * method.r, **targets))
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return inner if method.wrapper is None else method.wrapper(model, inner, **method.options)


def _optimizer(method: PlantedMethod, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if method.r == 0:
        model.requires_grad_(True)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    targets = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    return adapter_optimizer(method, model, lr, target_modules=targets)


def lr_schedule(method: PlantedMethod, steps: int, schedule: str, warmup: int = 0) -> Callable[[int], float] | None:
    """The learning-rate multiplier of a run of `steps`: None for ``"constant"``; for ``"cosine"``, a linear warm-up
    over `warmup` steps, then cosine decay to 0, and for ReLoRA the same envelope with a linear re-warm-up after each
    restart (over a quarter of the restart period, at most 10 steps, as the CLI does)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}.")
    if schedule == "constant":
        if warmup:
            raise ValueError("a warm-up needs schedule='cosine'.")
        return None
    if method.wrapper is ReLoRA:
        return relora_multiplier(steps, warmup, method.options["reset_every"], restart_warmup=10)
    return partial(lr_multiplier, warmup=warmup, total=steps, schedule="cosine")


def train_planted(method: PlantedMethod, lr: float, seed: int, steps: int, eval_every: int,
                  schedule: str = "constant", warmup: int = 0) -> list[dict[str, float]]:
    """One run: every `eval_every` steps (and at 0 and the end) the held-out loss relative to the start, the effective
    rank of the middle layer's accumulated update W − W_pretrained and the training seconds so far. Stops early
    (last loss inf) if the loss stops being finite. ``schedule`` and ``warmup``: see `lr_schedule`."""
    student = pretrained_mlp(seed)
    teacher = teacher_of(student, seed)
    x_eval = torch.randn(4096, WIDTHS[0], generator=torch.Generator().manual_seed(20_000 + seed))
    y_eval = teacher(x_eval)
    with torch.no_grad():
        start_loss = float((student(x_eval) - y_eval).square().mean())
    opt = _optimizer(method, student, lr)
    g = torch.Generator().manual_seed(30_000 + seed)

    def batch_loss() -> torch.Tensor:
        x = torch.randn(BATCH, WIDTHS[0], generator=g)
        return (student(x) - teacher(x)).square().mean() / start_loss

    def eval_loss() -> float:
        return float((student(x_eval) - y_eval).square().mean()) / start_loss

    return tracked_run(student, opt, TRACKED, batch_loss, eval_loss, steps, eval_every,
                       lr_schedule(method, steps, schedule, warmup))


def tracked_run(model: nn.Module, opt: torch.optim.Optimizer, tracked: str, batch_loss: Callable[[], torch.Tensor],
                eval_loss: Callable[[], float], steps: int, eval_every: int,
                schedule: Callable[[int], float] | None = None) -> list[dict[str, float]]:
    """`steps` optimiser steps on `batch_loss` (the learning rate times ``schedule(step)`` if given, else constant);
    every `eval_every` steps (and at 0 and the end) `eval_loss`, the effective rank of the accumulated update
    W − W_start of the linear layer `tracked` (adapted or trained whole) and the training seconds so far. Stops early
    (last loss inf) once the loss is not finite."""
    scheduler = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    adapted = bool(lora_factors(model))
    if adapted:
        pretrained = snapshot_base_weights(model)
    else:
        start = model.get_submodule(tracked).weight.detach().double().clone()
    curve: list[dict[str, float]] = []
    seconds = 0.0

    def evaluate(step: int) -> bool:
        with torch.no_grad():
            loss = eval_loss()
            if adapted:
                update = accumulated_updates(model, pretrained)[tracked]
            else:
                update = model.get_submodule(tracked).weight.detach().double() - start
        finite = math.isfinite(loss)
        curve.append({"step": step, "loss": loss if finite else math.inf,
                      "rank": effective_rank(update).rank if finite else 0, "time_s": seconds})
        return finite

    evaluate(0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch_loss().backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        seconds += time.perf_counter() - t0
        if (step % eval_every == 0 or step == steps) and not evaluate(step):
            break
    return curve
