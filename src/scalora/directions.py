"""The step the wrapped optimiser is about to take, per parameter, read from its state before it takes it.

ScaLoRA's optimiser-aware rule fits the change of W that the *actual* next step makes. For a parameter p with
gradient g, `next_direction` returns U with ``p ← p − lr · U`` to first order (weight decay aside):

* Adam / AdamW (amsgrad too): U = m̂ / (sqrt(v̂) + ε), with m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g² and the
  bias corrections of the step about to be taken. Multiplying g and the moments by f leaves U unchanged (ε aside):
  the optimiser is *scale-invariant*, so the next change of W is linear in ScaLoRA's scales.
* SGD: U = buf ← μ buf + (1 − dampening) g (Nesterov: g + μ buf), or g without momentum. U scales with g, so the
  change of W is quadratic in the scales, as in the paper's derivation.

Both read only what the optimiser keeps (no step is taken, no state is changed); under FSDP2, only this rank's
shard of it.
"""

from __future__ import annotations

import torch

from scalora.errors import ConfigError
from scalora.sharded import local, local_state


def scale_invariant(optimizer: torch.optim.Optimizer) -> bool:
    """True for Adam-type optimisers (U unchanged when g and the moments scale), False for SGD; else refused."""
    if isinstance(optimizer, torch.optim.Adam):
        return True
    if isinstance(optimizer, torch.optim.SGD):
        return False
    raise ConfigError(
        f"ScaLoRA's optimiser-aware rule reads the next step of Adam, AdamW or SGD, not of {type(optimizer).__name__}."
        f" Use one of those, or ScaLoRA(..., rule='paper')."
    )


@torch.no_grad()
def next_direction(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> torch.Tensor:
    """U such that the optimiser's next step moves `param` by −lr·U (first order; `param.grad` must be set).

    For a parameter sharded by FSDP2, U of this rank's shard (computed on plain tensors, without DTensor's
    per-operation overhead)."""
    grad = local(param.grad)
    if group.get("maximize", False):
        grad = -grad
    state = local_state(optimizer.state.get(param, {}))
    param = local(param)
    if isinstance(optimizer, torch.optim.Adam):
        if group["weight_decay"] and not group.get("decoupled_weight_decay", False):
            grad = grad.add(param, alpha=group["weight_decay"])  # Adam's L2 term enters the moments
        beta1, beta2 = group["betas"]
        step = state.get("step", 0.0)
        if isinstance(step, torch.Tensor):  # float32 on the host (bias corrections need float64), or on the device
            step = float(step) if step.device.type == "cpu" else step.to(torch.float64)  # no device sync
        step = step + 1.0
        m = state["exp_avg"] * beta1 + grad * (1.0 - beta1) if "exp_avg" in state else grad * (1.0 - beta1)
        v = (state["exp_avg_sq"] * beta2 if "exp_avg_sq" in state else torch.zeros_like(grad)).addcmul_(
            grad, grad, value=1.0 - beta2)
        if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            v = torch.maximum(v, state["max_exp_avg_sq"])
        denom = (v / (1.0 - beta2**step)).sqrt_().add_(group["eps"])
        return (m / (1.0 - beta1**step)).div_(denom)
    if group["weight_decay"]:
        grad = grad.add(param, alpha=group["weight_decay"])
    momentum = group.get("momentum", 0.0)
    if not momentum:
        return grad
    buf = state.get("momentum_buffer")
    buf = grad.clone() if buf is None else buf * momentum + grad * (1.0 - group.get("dampening", 0.0))
    return grad + buf * momentum if group.get("nesterov", False) else buf
