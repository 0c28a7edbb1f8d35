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
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.layers import LoraLayer
from scalora.model import lora_layers
from scalora.moments import check_transformable, scale_moments
from scalora.solver import COLUMN, IDENTITY, SCALAR, solve_scales

MODES = ("column", "scalar")


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


class ScaLoRA(torch.optim.Optimizer):
    """ScaLoRA around an existing optimiser: ``ScaLoRA(model, torch.optim.AdamW(...), interval=1, c=1.0)``.

    Args:
        model: the model with LoRA layers (``scalora.apply_lora``), possibly wrapped in DDP.
        optimizer: the optimiser over the model's trainable parameters (SGD or an Adam-family torch optimiser:
            their moments transform exactly; others are refused).
        interval: rescale every `interval` optimiser steps (ScaLoRA-I); steps are counted from 1, so a run shorter
            than `interval` is plain LoRA.
        c: the hyperparameter c = L·η of the scaling problem (larger c → smaller scales).
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
        c: float = 1.0,
        mode: str = "column",
        transfer_moments: bool = True,
        compensate: bool | None = None,
    ) -> None:
        if isinstance(optimizer, ScaLoRA):
            raise ConfigError("the optimiser is already wrapped in ScaLoRA.")
        check_transformable(optimizer)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be a positive integer, got {interval!r}.")
        if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
            raise ConfigError(f"c must be a positive number, got {c!r}.")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        self.layers: list[tuple[str, LoraLayer]] = list(lora_layers(model))
        if not self.layers:
            raise ConfigError("the model has no LoRA layers: call scalora.apply_lora(model, config) first.")
        for name, layer in self.layers:
            if layer.alpha_vector is not None:
                raise ConfigError(f"layer {name!r} has an α vector: ScaLoRA and α-LoRA cannot be combined.")
        optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers if id(layer.lora_A) not in optimised
                   or id(layer.lora_B) not in optimised]
        if missing:
            raise ConfigError(f"the optimiser does not update the LoRA factors of {missing[0]!r}; build it over "
                              f"model.parameters() (or every lora_A / lora_B).")
        self.optimizer = optimizer
        self.interval = interval
        self.c = float(c)
        self.mode = mode
        self.transfer_moments = transfer_moments
        self.num_steps = 0
        self.identity_total = 0
        self.last_stats = ScalingStats()
        for _, layer in self.layers:
            half = layer.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
            if compensate if compensate is not None else half:
                layer.enable_compensation()
        # torch.optim.Optimizer's bookkeeping (hooks, step profiling), without a second copy of the state.
        self.__setstate__({})

    # The wrapped optimiser owns the parameter groups, state and defaults.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __repr__(self) -> str:
        return (f"ScaLoRA(interval={self.interval}, c={self.c}, mode={self.mode!r}, "
                f"transfer_moments={self.transfer_moments}, optimizer={self.optimizer!r})")

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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimiser step: (every `interval` steps) solve, merge, rescale; then the wrapped step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.num_steps += 1
        if self.num_steps % self.interval == 0:
            self.rescale()
        self.optimizer.step()
        return loss

    @torch.no_grad()
    def rescale(self) -> ScalingStats:
        """Solve α, β for every layer with gradients, merge the residual, rescale factors, gradients, moments."""
        groups: dict[tuple, list[LoraLayer]] = defaultdict(list)
        for _, layer in self.layers:
            if layer.lora_A.grad is None or layer.lora_B.grad is None:
                continue
            key = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.lora_A.dtype, layer.lora_A.device)
            groups[key].append(layer)
        kinds, alphas, betas = [], [], []
        for layers in groups.values():
            scales = solve_scales(
                torch.stack([layer.lora_A for layer in layers]),
                torch.stack([layer.lora_B for layer in layers]),
                torch.stack([layer.lora_A.grad for layer in layers]),
                torch.stack([layer.lora_B.grad for layer in layers]),
                scaling=torch.tensor([layer.scaling for layer in layers], dtype=torch.float64),
                c=self.c,
                mode=self.mode,
            )
            for i, layer in enumerate(layers):
                if int(scales.kind[i]) != IDENTITY:
                    self._apply(layer, scales.alpha[i], scales.beta[i])
            kinds.append(scales.kind)
            alphas.append(scales.alpha.flatten())
            betas.append(scales.beta.flatten())
        self.last_stats = self._stats(kinds, alphas, betas)
        return self.last_stats

    def _apply(self, layer: LoraLayer, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """Merge s·B diag(1 − α⊙β) A into W0, then B ← B diag(α), A ← diag(β) A, and their gradients and moments."""
        A, B = layer.lora_A, layer.lora_B
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
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimiser's state plus ScaLoRA's step counter (compensation buffers live in the model)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scalora": {"num_steps": self.num_steps, "identity_total": self.identity_total,
                        "interval": self.interval, "c": self.c, "mode": self.mode,
                        "transfer_moments": self.transfer_moments},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if "scalora" not in state_dict or "optimizer" not in state_dict:
            raise ConfigError("this is not a ScaLoRA optimiser state (expected keys 'optimizer' and 'scalora').")
        ours = state_dict["scalora"]
        settings = {"interval": self.interval, "c": self.c, "mode": self.mode,
                    "transfer_moments": self.transfer_moments}
        for key, value in settings.items():
            if key in ours and ours[key] != value:
                raise ConfigError(f"the saved ScaLoRA state has {key}={ours[key]!r} but this optimiser has {value!r}.")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.num_steps = int(ours["num_steps"])
        self.identity_total = int(ours.get("identity_total", 0))
