"""The update a run has accumulated, ΔW = W − W_pretrained: its rank, and its rank-k export as a PEFT adapter.

LoRA's cumulative update telescopes to s·B_T A_T and never exceeds rank r; ScaLoRA merges a residual into the base
at every step, so its ΔW can grow far beyond r. `effective_rank` measures that two ways: the number of singular
values above a tolerance, and the entropy-based effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ (Roy & Vetterli).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalora.config import LoraConfig
from scalora.errors import ConfigError
from scalora.layers import Embedding, LoraLayer, check_rank
from scalora.model import get_config, lora_layers
from scalora.peft_format import factor_keys, modules_to_save_params, write_adapter


@dataclass(frozen=True)
class RankInfo:
    """Numerical rank (σᵢ > rtol·σ_max) and entropy effective rank of one matrix."""

    rank: int
    entropy_rank: float
    frobenius: float


def effective_rank(matrix: torch.Tensor, rtol: float = 1e-3) -> RankInfo:
    """Rank of `matrix` counted as singular values above ``rtol · σ_max``, and exp(entropy of σ / Σσ)."""
    sigma = torch.linalg.svdvals(matrix.detach().double())
    total = float(sigma.sum())
    if total == 0.0:
        return RankInfo(0, 0.0, 0.0)
    p = sigma / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    return RankInfo(int((sigma > rtol * sigma[0]).sum()), float(torch.exp(torch.tensor(entropy))),
                    float(sigma.square().sum().sqrt()))


def snapshot_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every LoRA layer's base weight, (out, in) layout, keyed by module name: take one before training."""
    return {name: layer.base_weight_oi().detach().clone() for name, layer in lora_layers(model)}


def effective_weight(layer: LoraLayer) -> torch.Tensor:
    """The weight the layer computes with, (out, in): diag(a) W0 + s B A (W0 alone once merged or disabled)."""
    weight = layer.base_weight_oi().detach().double()
    if layer.merged or layer.disabled:
        return weight
    if layer.alpha_vector is not None:
        weight = layer.alpha_vector.detach().double()[:, None] * weight
    return weight + layer.delta_weight().detach().double()


def accumulated_updates(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = W − W_pretrained (float64, (out, in)) for every LoRA layer, given `snapshot_base_weights` from before."""
    updates = {}
    for name, layer in lora_layers(model):
        if name not in pretrained:
            raise ConfigError(f"no pre-trained weight for {name!r}: take snapshot_base_weights(model) before training.")
        updates[name] = effective_weight(layer) - pretrained[name].to(layer.base_layer.weight.device).double()
    return updates


def update_ranks(model: nn.Module, pretrained: dict[str, torch.Tensor], rtol: float = 1e-3) -> dict[str, RankInfo]:
    """`effective_rank` of every layer's accumulated update."""
    return {name: effective_rank(delta, rtol) for name, delta in accumulated_updates(model, pretrained).items()}


@dataclass(frozen=True)
class ExportReport:
    """Per-layer relative residual ‖ΔW − B A‖_F / ‖ΔW‖_F of the rank-k export, and the folder written."""

    folder: Path
    rank: int
    residuals: dict[str, float]

    @property
    def max_residual(self) -> float:
        return max(self.residuals.values(), default=0.0)


def export_lora(
    model: nn.Module,
    pretrained: dict[str, torch.Tensor],
    rank: int,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> ExportReport:
    """Compress every layer's accumulated update into a rank-k PEFT adapter by truncated SVD.

    ΔW ≈ U_k Σ_k V_kᵀ, stored as B = U_k Σ_k^½, A = Σ_k^½ V_kᵀ with lora_alpha = r = k (s = 1); loaded onto the
    pre-trained model (PEFT or scalora) it gives W_pretrained + B A. The model's `modules_to_save` (e.g. a trained
    classification head) are stored in full beside the factors. Changes to biases (α-LoRA's a ⊙ b) are not
    representable in a LoRA adapter: export such models with `scalora.merge` instead.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}.")
    layers = dict(lora_layers(model))
    state: dict[str, torch.Tensor] = {}
    residuals: dict[str, float] = {}
    for name, delta in accumulated_updates(model, pretrained).items():
        layer = layers[name]
        check_rank(rank, layer.in_features, layer.out_features, f"module {name!r}")
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[:rank].sqrt()
        B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
        norm = float(delta.norm())
        residuals[name] = float(S[rank:].square().sum().sqrt()) / norm if norm > 0 else 0.0
        key_a, key_b = factor_keys(name, isinstance(layer, Embedding))
        dtype = layer.lora_A.dtype
        state[key_a], state[key_b] = A.to(dtype), B.to(dtype)
    trained = get_config(model)
    state.update(modules_to_save_params(model, trained))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers), modules_to_save=trained.modules_to_save,
                        base_model_name_or_path=base_model_name_or_path)
    fan_in_fan_out = all(layer.fan_in_fan_out for layer in layers.values())
    out = write_adapter(folder, config, state, model, fan_in_fan_out=fan_in_fan_out)
    return ExportReport(out, rank, residuals)
