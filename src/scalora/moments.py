"""What a reparametrisation does to an optimiser's per-parameter state.

If a parameter's future gradients are multiplied by a factor f (per column or row, broadcast over the
parameter), every moment that is a running sum of g, g², |g| transforms exactly:
``m ← f·m`` (exp_avg, SGD's momentum_buffer), ``v ← f²·v`` (exp_avg_sq, max_exp_avg_sq, Adagrad's sum) and
``u ← |f|·u`` (Adamax's exp_inf). ScaLoRA uses this to keep AdamW's state across its rescaling; ReLoRA prunes
the same state when it restarts its factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scalora.errors import ConfigError

_LINEAR = ("exp_avg", "momentum_buffer")
_QUADRATIC = ("exp_avg_sq", "max_exp_avg_sq", "sum")
_ABSOLUTE = ("exp_inf",)
MOMENT_KEYS = _LINEAR + _QUADRATIC + _ABSOLUTE

#: per-parameter counters that a rescaling leaves alone (NAdam's running product of its momentum schedule)
_COUNTERS = ("step", "mu_product")

#: torch optimisers, subclasses included, whose update rule is a function of the moments above
TRANSFORMABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                 torch.optim.Adamax, torch.optim.Adagrad)

_USE_INSTEAD = (f"Use one of torch.optim.{', torch.optim.'.join(cls.__name__ for cls in TRANSFORMABLE)} (or a "
                f"subclass): the LoRA factors' optimiser state is small (2·r·(in + out) numbers per layer), so 8-bit "
                f"or paged states would save almost nothing.")


def check_transformable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimisers whose state cannot be transformed exactly: any that is not one of `TRANSFORMABLE` (nor a
    subclass), with the reason for bitsandbytes' 8-bit (block-wise quantised) and paged optimisers.

    A subclass that keeps state of its own is refused by `check_moments` when that state appears.
    """
    if isinstance(optimizer, TRANSFORMABLE):
        return
    name = type(optimizer).__name__
    if getattr(getattr(optimizer, "args", None), "optim_bits", 32) == 8:
        reason = (f"{name} stores its moments in 8 bits, quantised block by block against a shared maximum: "
                  f"rescaling single rows or columns would re-quantise them, so the transfer could not be exact.")
    elif getattr(optimizer, "is_paged", False):
        reason = (f"{name} keeps its moments in paged memory under bitsandbytes' own names (state1, state2), whose "
                  f"meaning depends on the algorithm; ScaLoRA transforms only moments whose update rule it knows.")
    else:
        reason = (f"{name} keeps optimiser state that cannot be rescaled exactly by ScaLoRA, which transforms only the "
                  f"moments of optimisers whose update rule it knows.")
    raise ConfigError(f"{reason} {_USE_INSTEAD}")


def check_moments(state: dict) -> None:
    """Refuse (`ConfigError`) per-parameter state that `scale_moments` does not know, e.g. kept by a subclass."""
    unknown = [key for key, value in state.items()
               if isinstance(value, torch.Tensor) and key not in MOMENT_KEYS + _COUNTERS]
    if unknown:
        raise ConfigError(f"the optimiser keeps per-parameter state {unknown[0]!r}, which ScaLoRA cannot rescale "
                          f"exactly (it knows {', '.join(MOMENT_KEYS)}). {_USE_INSTEAD}")


@torch.no_grad()
def scale_moments(states: Sequence[dict], factors: Sequence[torch.Tensor]) -> None:
    """Transform the optimiser state of several parameters, ``states[i]`` for gradients multiplied by ``factors[i]``
    (broadcastable, in the moments' dtype): one multi-tensor multiplication per kind of moment. See `check_moments`
    for state it does not know."""
    for key in MOMENT_KEYS:
        pairs = [(state[key], factor) for state, factor in zip(states, factors, strict=True)
                 if isinstance(state.get(key), torch.Tensor)]
        if not pairs:
            continue
        moments, by = [moment for moment, _ in pairs], [factor for _, factor in pairs]
        if key in _QUADRATIC:
            by = torch._foreach_mul(by, by)
        elif key in _ABSOLUTE:
            by = torch._foreach_abs(by)
        torch._foreach_mul_(moments, by)


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
