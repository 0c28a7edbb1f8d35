"""`ScaLoRA`: wraps any Adam-family optimiser with ScaLoRA's optimally scaled, accumulated low-rank steps.

Before the wrapped optimiser's ordinary step, every `interval` steps and for every LoRA layer (METHODS §3):

1. solve the optimal column scales α (columns of B) and β (rows of A) from A, B and their gradients
   (`scalora.solver`, batched over layers of one shape);
2. merge the residual into the frozen weight, W0 ← W0 + s B diag(1 − α⊙β) A, so W is unchanged;
3. rescale B ← B diag(α), A ← diag(β) A, their gradients g_B ← g_B diag(β), g_A ← diag(α) g_A, and the
   optimiser's moments the same way (`scalora.moments`): no reset, no warm-up.

With α = β = 1 this is exactly LoRA; over many steps the merged residuals add up to a high-rank update.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from scalora.directions import next_direction, scale_invariant
from scalora.errors import ConfigError
from scalora.factors import LoraFactors
from scalora.moments import check_moments, check_transformable, scale_moments
from scalora.solver import COLUMN, IDENTITY, SCALAR, Scales, optimizer_system, solve_scales, solve_system
from scalora.wrapper import OptimizerWrapper

MODES = ("column", "scalar")
RULES = ("optimizer", "paper")
#: second- to first-order ratio of the next step that ``c="auto"`` allows (benchmarks/rank_decides.py measures it)
DEFAULT_TAU = 0.3


@dataclass
class ScalingStats:
    """What the last scaling step did: fractions of layers by solution kind and the spread of the scales."""

    step: int = 0
    layers: int = 0
    column: float = 0.0
    scalar: float = 0.0
    identity: float = 0.0
    alpha_mean: float = 1.0
    alpha_std: float = 0.0
    beta_mean: float = 1.0
    beta_std: float = 0.0

    def as_dict(self, prefix: str = "scalora/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


class ScaLoRA(OptimizerWrapper):
    """ScaLoRA around an existing optimiser: ``ScaLoRA(model, torch.optim.AdamW(...), interval=1, c=1.0)``.

    Args:
        model: the model with LoRA layers, scalora's (``scalora.apply_lora``) or PEFT's (``peft.get_peft_model``,
            its active adapter), possibly wrapped in DDP.
        optimizer: the optimiser over the model's trainable parameters (SGD or an Adam-family torch optimiser, or a
            subclass: their moments transform exactly; others, bitsandbytes' 8-bit and paged ones included, are
            refused with the reason).
        interval: rescale every `interval` optimiser steps (ScaLoRA-I); steps are counted from 1, so a run shorter
            than `interval` is plain LoRA.
        rule: ``"optimizer"`` (default) fits the step the wrapped optimiser will actually take (Adam's step is
            linear in the scales); ``"paper"`` is the published closed form, which assumes a plain gradient step.
        c: c = L·η of the scaling problem (larger c → smaller scales), or ``"auto"``: per layer and step, the largest
            c at which the next step's second-order term stays ``tau`` times its first-order term
            (`scalora.solver.auto_c`). Default: ``"auto"`` for the optimiser-aware rule with Adam-type optimisers,
            1.0 otherwise (the paper's setting).
        tau: the ratio of second- to first-order change that ``c="auto"`` allows.
        mode: ``"column"`` (per-column scales, scalar fallback) or ``"scalar"`` (one scale per factor).
        transfer_moments: transform the optimiser's moments with the scales (the paper's ablation turns it off).
        compensate: carry rounding error of folds into half-precision base weights (default: when the base is
            bf16/fp16).

    Behaves as a torch optimiser (`param_groups`, `zero_grad`, `state_dict`, LR schedulers, GradScaler,
    ``transformers.Trainer``); `last_stats` tells what the latest scaling step did.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        interval: int = 1,
        rule: str = "optimizer",
        c: float | str | None = None,
        tau: float = DEFAULT_TAU,
        mode: str = "column",
        transfer_moments: bool = True,
        compensate: bool | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be a positive integer, got {interval!r}.")
        if rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {rule!r}.")
        if not (c is None or c == "auto" or (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
                                             and math.isfinite(c))):
            raise ConfigError(f"c must be a positive number or 'auto', got {c!r}.")
        if not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ConfigError(f"tau must be a positive number, got {tau!r}.")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        super().__init__(model, optimizer)
        check_transformable(optimizer)
        self.power = 2
        if rule == "optimizer":
            self.power = 1 if scale_invariant(optimizer) else 2
        if c is None:
            c = "auto" if self.power == 1 else 1.0
        if c == "auto" and self.power != 1:
            raise ConfigError("c='auto' needs the optimiser-aware rule with an Adam-type optimiser (its step does not "
                              "depend on the size of the factors); pass a number c.")
        for name, layer in self.layers:
            if layer.alpha_vector is not None:
                raise ConfigError(f"layer {name!r} has an α vector: ScaLoRA and α-LoRA cannot be combined.")
        self.interval = interval
        self.rule = rule
        self.c: float | str = c if c == "auto" else float(c)
        self.tau = float(tau)
        self.mode = mode
        self.transfer_moments = transfer_moments
        self.identity_total = 0
        self.last_stats = ScalingStats()
        for _, layer in self.layers:
            half = layer.base_weight_oi().dtype in (torch.float16, torch.bfloat16)
            if compensate if compensate is not None else half:
                layer.enable_compensation()

    def __repr__(self) -> str:
        return (f"ScaLoRA(interval={self.interval}, rule={self.rule!r}, c={self.c!r}, tau={self.tau}, "
                f"mode={self.mode!r}, "
                f"transfer_moments={self.transfer_moments}, optimizer={self.optimizer!r})")

    def before_step(self) -> None:
        if self.num_steps % self.interval == 0:
            self.rescale()

    @torch.no_grad()
    def rescale(self) -> ScalingStats:
        """Solve α, β for every layer with gradients, merge the residual, rescale factors, gradients, moments."""
        groups: dict[tuple, list[LoraFactors]] = defaultdict(list)
        for _, layer in self.layers:
            if layer.lora_A.grad is None or layer.lora_B.grad is None:
                continue
            key = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.lora_A.dtype, layer.lora_A.device)
            groups[key].append(layer)
        kinds, alphas, betas = [], [], []
        for layers in groups.values():
            scales = self._solve(layers)
            for i, layer in enumerate(layers):
                if int(scales.kind[i]) != IDENTITY:
                    self._apply(layer, scales.alpha[i], scales.beta[i])
            kinds.append(scales.kind)
            alphas.append(scales.alpha.flatten())
            betas.append(scales.beta.flatten())
        self.last_stats = self._stats(kinds, alphas, betas)
        return self.last_stats

    def _solve(self, layers: list[LoraFactors]) -> Scales:
        """The scales of layers of one shape, by the paper's rule or from the wrapped optimiser's next step."""
        A = torch.stack([layer.lora_A for layer in layers])
        B = torch.stack([layer.lora_B for layer in layers])
        grad_A = torch.stack([layer.lora_A.grad for layer in layers])
        grad_B = torch.stack([layer.lora_B.grad for layer in layers])
        scaling = torch.tensor([layer.scaling for layer in layers], dtype=torch.float64)
        if self.rule == "paper":
            return solve_scales(A, B, grad_A, grad_B, scaling=scaling, c=self.c, mode=self.mode)
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        dirs_A, dirs_B, lrs = [], [], []
        for layer in layers:
            group_A, group_B = group_of[id(layer.lora_A)], group_of[id(layer.lora_B)]
            dirs_A.append(next_direction(self.optimizer, group_A, layer.lora_A))
            # U_B in units of lora_A's learning rate, so that one η serves the layer (LoRA+ has two)
            ratio = group_B["lr"] / group_A["lr"] if group_A["lr"] else 1.0
            dirs_B.append(next_direction(self.optimizer, group_B, layer.lora_B) * ratio)
            lrs.append(group_A["lr"])
        H, lam, second = optimizer_system(A, B, grad_A, grad_B, torch.stack(dirs_A), torch.stack(dirs_B))
        lr = lrs[0] if all(x == lrs[0] for x in lrs) else torch.tensor(lrs, dtype=H.dtype, device=H.device)
        return solve_system(H, lam, scaling, self.c, self.mode, power=self.power, second=second, lr=lr,
                            tau=self.tau)

    def _apply(self, layer: LoraFactors, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Merge s·B diag(1 − α⊙β) A into W0, then B ← B diag(α), A ← diag(β) A, and their gradients and moments."""
        A, B = layer.lora_A, layer.lora_B
        if self.transfer_moments:  # before anything changes
            check_moments(self.optimizer.state.get(B, {}))
            check_moments(self.optimizer.state.get(A, {}))
        layer.fold_(B * (layer.scaling * (1.0 - alpha * beta)).to(B.dtype), A)
        alpha_b, beta_a = alpha.to(B.dtype), beta.to(A.dtype)
        B.mul_(alpha_b)
        A.mul_(beta_a[:, None])
        B.grad.mul_(beta_a)  # ∂ℓ/∂B̃ = g_B diag(β)
        A.grad.mul_(alpha_b[:, None])  # ∂ℓ/∂Ã = diag(α) g_A
        if self.transfer_moments:
            scale_moments(self.optimizer.state.get(B, {}), beta_a)
            scale_moments(self.optimizer.state.get(A, {}), alpha_b[:, None])

    def _stats(self, kinds: list[torch.Tensor], alphas: list[torch.Tensor], betas: list[torch.Tensor]) -> ScalingStats:
        if not kinds:
            return ScalingStats(step=self.num_steps)
        kind = torch.cat(kinds)
        alpha, beta = torch.cat(alphas).double(), torch.cat(betas).double()
        n = kind.numel()
        identity = int((kind == IDENTITY).sum())
        self.identity_total += identity
        return ScalingStats(
            step=self.num_steps, layers=n, column=int((kind == COLUMN).sum()) / n,
            scalar=int((kind == SCALAR).sum()) / n, identity=identity / n,
            alpha_mean=float(alpha.mean()), alpha_std=float(alpha.std(unbiased=False)),
            beta_mean=float(beta.mean()), beta_std=float(beta.std(unbiased=False)),
        )

    # ------------------------------------------------------------------ checkpoints
    def settings(self) -> dict[str, Any]:
        return {"interval": self.interval, "rule": self.rule, "c": self.c, "tau": self.tau, "mode": self.mode,
                "transfer_moments": self.transfer_moments}

    def extra_state(self) -> dict[str, Any]:
        return {"identity_total": self.identity_total}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.identity_total = int(state.get("identity_total", 0))
