"""The effective rank of what a run has changed so far, on a few layers, for any method."""

from __future__ import annotations

import torch
from torch import nn

from scalora.rank import effective_rank, effective_weight, rank_summary


def _weight_oi(model: nn.Module, name: str, fan_in_fan_out: bool) -> torch.Tensor:
    module = model.get_submodule(name)
    if hasattr(module, "lora_A"):
        return effective_weight(module)
    weight = module.weight.detach().double()
    return weight.t() if fan_in_fan_out else weight


class RankTracker:
    """Effective rank of the accumulated update W − W_pretrained on a few layers, for any method."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, bool]]) -> None:
        self.layers = layers
        self.start = {name: _weight_oi(model, name, fi).clone() for name, fi in layers}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """`rank_summary` of the tracked layers' accumulated updates (empty when none are tracked)."""
        return rank_summary([effective_rank(_weight_oi(model, name, fi) - self.start[name])
                             for name, fi in self.layers])
