"""What a reparametrisation does to an optimiser's per-parameter state.

If a parameter's future gradients are multiplied by a factor f (per column or row, broadcast over the
parameter), every moment that is a running sum of g, g², |g| transforms exactly:
``m ← f·m`` (exp_avg, SGD's momentum_buffer), ``v ← f²·v`` (exp_avg_sq, max_exp_avg_sq, Adagrad's sum) and
``u ← |f|·u`` (Adamax's exp_inf). ScaLoRA uses this to keep AdamW's state across its rescaling; ReLoRA prunes
the same state when it restarts its factors.
"""

from __future__ import annotations

import torch

from scalora.errors import ConfigError

_LINEAR = ("exp_avg", "momentum_buffer")
_QUADRATIC = ("exp_avg_sq", "max_exp_avg_sq", "sum")
_ABSOLUTE = ("exp_inf",)
MOMENT_KEYS = _LINEAR + _QUADRATIC + _ABSOLUTE

#: optimisers whose whole per-parameter state is made of the moments above (plus step counters)
TRANSFORMABLE = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad")


def check_transformable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimisers whose state cannot be transformed exactly (e.g. factored Adafactor, 8-bit states)."""
    name = type(optimizer).__name__
    if type(optimizer).__module__.startswith("torch.optim") and name in TRANSFORMABLE:
        return
    raise ConfigError(
        f"{name} keeps optimiser state that cannot be rescaled exactly (ScaLoRA must transform the moments when it "
        f"rescales the factors). Use one of torch.optim.{', torch.optim.'.join(TRANSFORMABLE)}."
    )


@torch.no_grad()
def scale_moments(state: dict, factor: torch.Tensor) -> None:
    """Transform one parameter's optimiser state for gradients multiplied by `factor` (broadcastable)."""
    for key in _LINEAR:
        if isinstance(state.get(key), torch.Tensor):
            state[key].mul_(factor.to(state[key].dtype))
    for key in _QUADRATIC:
        if isinstance(state.get(key), torch.Tensor):
            state[key].mul_(factor.square().to(state[key].dtype))
    for key in _ABSOLUTE:
        if isinstance(state.get(key), torch.Tensor):
            state[key].mul_(factor.abs().to(state[key].dtype))


@torch.no_grad()
def prune_moments(state: dict, fraction: float) -> None:
    """Zero the `fraction` of entries with the smallest second moment (ReLoRA's optimiser reset).

    One mask serves every moment of the parameter: with independent masks an entry could keep its first moment m
    while losing its second v, and Adam's m / (√v + ε) would then explode.
    """
    moments = [state[key] for key in MOMENT_KEYS if isinstance(state.get(key), torch.Tensor)]
    if not moments or moments[0].numel() == 0:
        return
    if fraction >= 1.0:
        for value in moments:
            value.zero_()
        return
    k = int(fraction * moments[0].numel())
    if k == 0:
        return
    quadratic = [state[key] for key in _QUADRATIC if isinstance(state.get(key), torch.Tensor)]
    magnitude = (quadratic[0] if quadratic else moments[0]).abs()
    threshold = magnitude.flatten().kthvalue(k).values
    drop = magnitude <= threshold
    for value in moments:
        value.masked_fill_(drop, 0.0)
