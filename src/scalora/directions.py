"""The step the wrapped optimiser is about to take, per parameter, read from its state before it takes it.

ScaLoRA's optimiser-aware rule fits the change of W that the *actual* next step makes. For a parameter p with
gradient g, `next_directions` returns U with ``p ← p − lr · U`` to first order (weight decay aside):

* Adam / AdamW (amsgrad too): U = m̂ / (sqrt(v̂) + ε), with m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g² and the
  bias corrections of the step about to be taken. Multiplying g and the moments by f leaves U unchanged (ε aside):
  the optimiser is *scale-invariant*, so the next change of W is linear in ScaLoRA's scales.
* SGD: U = buf ← μ buf + (1 − dampening) g (Nesterov: g + μ buf), or g without momentum. U scales with g, so the
  change of W is quadratic in the scales, as in the paper's derivation.

Both read only what the optimiser keeps (no step is taken, no state is changed); under FSDP2, only this rank's
shard of it.
"""

from __future__ import annotations

from collections.abc import Sequence

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
def next_directions(optimizer: torch.optim.Optimizer, group: dict, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """U of every parameter in `params` (one shape, one parameter group), stacked: the optimiser's next step moves
    ``params[i]`` by −lr·U[i] to first order (every ``.grad`` must be set).

    Computed on the stacked gradients and state, so a group of layers costs the same few operations as one layer.
    For parameters sharded by FSDP2, U of this rank's shards (plain tensors, without DTensor's per-operation
    overhead)."""
    grad = torch.stack([local(p.grad) for p in params])
    if group.get("maximize", False):
        grad = -grad
    states = [local_state(optimizer.state.get(p, {})) for p in params]
    if group["weight_decay"] and not (isinstance(optimizer, torch.optim.Adam)
                                      and group.get("decoupled_weight_decay", False)):
        grad = grad.add(torch.stack([local(p) for p in params]), alpha=group["weight_decay"])  # L2 enters the moments
    if isinstance(optimizer, torch.optim.Adam):
        return _adam_direction(group, states, grad)
    return _sgd_direction(group, states, grad)


def _stacked(states: list[dict], key: str, like: torch.Tensor) -> torch.Tensor | None:
    """The state `key` of every parameter, stacked (zeros where a parameter has none yet); None if none has it."""
    values = [state.get(key) for state in states]
    if all(value is None for value in values):
        return None
    return torch.stack([torch.zeros_like(like[i]) if value is None else value for i, value in enumerate(values)])


def _adam_direction(group: dict, states: list[dict], grad: torch.Tensor) -> torch.Tensor:
    """m̂ / (sqrt(v̂) + ε) of the step about to be taken, per parameter (the bias corrections of each one's step)."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = _stacked(states, "exp_avg", grad), _stacked(states, "exp_avg_sq", grad)
    m = grad * (1.0 - beta1) if exp_avg is None else exp_avg * beta1 + grad * (1.0 - beta1)
    v = (torch.zeros_like(grad) if exp_avg_sq is None else exp_avg_sq * beta2).addcmul_(grad, grad, value=1.0 - beta2)
    max_sq = _stacked(states, "max_exp_avg_sq", grad) if group.get("amsgrad", False) else None
    if max_sq is not None:
        v = torch.maximum(v, max_sq)
    steps = [state.get("step", 0.0) for state in states]
    if all(not isinstance(step, torch.Tensor) or step.device.type == "cpu" for step in steps):
        # float32 on the host (the bias corrections need float64): read without a device sync
        steps = [float(step) + 1.0 for step in steps]
        if len(set(steps)) == 1:
            m_hat, v_hat = m / (1.0 - beta1 ** steps[0]), v / (1.0 - beta2 ** steps[0])
        else:  # parameters at different steps (some had no gradient before): per parameter
            m_hat = torch.stack([m[i] / (1.0 - beta1**t) for i, t in enumerate(steps)])
            v_hat = torch.stack([v[i] / (1.0 - beta2**t) for i, t in enumerate(steps)])
    else:  # step counters on the device (capturable / fused Adam): stacked there, no sync
        step = torch.stack([torch.as_tensor(t, device=grad.device) for t in steps]).to(torch.float64) + 1.0
        shape = (-1,) + (1,) * (grad.dim() - 1)
        m_hat = m / (1.0 - beta1**step).to(grad.dtype).view(shape)
        v_hat = v / (1.0 - beta2**step).to(grad.dtype).view(shape)
    return m_hat.div_(v_hat.sqrt_().add_(group["eps"]))


def _sgd_direction(group: dict, states: list[dict], grad: torch.Tensor) -> torch.Tensor:
    """SGD's step direction: the gradient, or the momentum buffer about to be formed (Nesterov: g + μ buf)."""
    momentum = group.get("momentum", 0.0)
    if not momentum:
        return grad
    dampening = group.get("dampening", 0.0)
    bufs = [state.get("momentum_buffer") for state in states]
    if any(b is None for b in bufs):  # a parameter's first momentum step starts its buffer at g (no dampening)
        buf = torch.stack([grad[i] if b is None else b * momentum + grad[i] * (1.0 - dampening)
                           for i, b in enumerate(bufs)])
    else:
        buf = torch.stack(bufs) * momentum + grad * (1.0 - dampening)
    return grad + buf * momentum if group.get("nesterov", False) else buf
