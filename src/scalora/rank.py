"""The update a run has accumulated, ΔW = W − W_pretrained: its rank, and its rank-k export as a PEFT adapter.

LoRA's cumulative update telescopes to s·B_T A_T and never exceeds rank r; ScaLoRA merges a residual into the base
at every step, so its ΔW can grow far beyond r. `effective_rank` measures that two ways: the number of singular
values above a tolerance, and the entropy-based effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ (Roy & Vetterli).
Everything here works on scalora's layers and on PEFT's (the active adapter of ``peft.get_peft_model``), through
`scalora.factors`.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalora.config import LoraConfig
from scalora.errors import ConfigError
from scalora.factors import LoraFactors, as_factors, lora_factors, peft_root
from scalora.layers import LoraLayer, check_rank
from scalora.model import get_config
from scalora.peft_config import base_model_name_or_path as model_source
from scalora.peft_config import peft_task_type
from scalora.peft_format import PREFIX, factor_keys, modules_to_save_params, write_adapter


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


def rank_summary(infos: Sequence[RankInfo]) -> dict[str, float]:
    """``rank/mean``, ``rank/max`` and ``rank/entropy_mean`` over some layers' ranks, as the logs carry them (empty
    for no layers)."""
    if not infos:
        return {}
    return {"rank/mean": statistics.fmean(i.rank for i in infos), "rank/max": float(max(i.rank for i in infos)),
            "rank/entropy_mean": statistics.fmean(i.entropy_rank for i in infos)}


def snapshot_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every LoRA layer's base weight, (out, in) layout, keyed by module name: take one before training."""
    return {name: layer.base_weight_dense().detach().clone() for name, layer in lora_factors(model)}


def effective_weight(layer: LoraLayer | LoraFactors) -> torch.Tensor:
    """The weight the layer computes with, float64 (out, in): diag(a) W0 + s B A (W0 alone once merged or disabled)."""
    return as_factors(layer).effective_weight()


def accumulated_updates(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = W − W_pretrained (float64, (out, in)) for every LoRA layer, given `snapshot_base_weights` from before."""
    updates = {}
    for name, layer in lora_factors(model):
        if name not in pretrained:
            raise ConfigError(f"no pre-trained weight for {name!r}: take snapshot_base_weights(model) before training.")
        weight = layer.effective_weight()
        updates[name] = weight - pretrained[name].to(weight.device).double()
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

    The config names the base model (`base_model_name_or_path`, by default where the model was loaded from) and
    its ``task_type``, so that ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` (or its sibling for the
    task) rebuilds the whole model.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}.")
    layers = dict(lora_factors(model))
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
        key_a, key_b = factor_keys(name, layer.embedding)
        dtype = layer.lora_A.dtype
        state[key_a], state[key_b] = A.to(dtype), B.to(dtype)
    modules_to_save, full = _trained_modules(model)
    state.update(full)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers), modules_to_save=modules_to_save,
                        base_model_name_or_path=base_model_name_or_path or model_source(model),
                        task_type=peft_task_type(model))
    fan_in_fan_out = all(layer.fan_in_fan_out for layer in layers.values())
    out = write_adapter(folder, config, state, peft_root(model), fan_in_fan_out=fan_in_fan_out)
    return ExportReport(out, rank, residuals)


def _trained_modules(model: nn.Module) -> tuple[list[str] | None, dict[str, torch.Tensor]]:
    """The modules trained in full beside the factors (`modules_to_save`): their names, and their parameters under
    PEFT's keys (for a PEFT model, those of the active adapter's trained copy)."""
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        config = get_config(model)
        return config.modules_to_save, dict(modules_to_save_params(model, config))
    names, params = [], {}
    for name, module in peft_root(model).named_modules():
        copies = getattr(module, "modules_to_save", None)  # PEFT's ModulesToSaveWrapper
        if not isinstance(copies, nn.ModuleDict) or module.active_adapters[0] not in copies:
            continue
        names.append(name.rpartition(".")[2])
        for p_name, p in copies[module.active_adapters[0]].named_parameters():
            params[f"{PREFIX}{name}.{p_name}"] = p
    return sorted(set(names)) or None, params
