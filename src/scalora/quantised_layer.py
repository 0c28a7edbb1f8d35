"""LoRA around a linear layer whose weight is quantised (4-bit or 8-bit): folds go to a bounded-rank side branch."""

from __future__ import annotations

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.finite import finite_in, require_finite
from scalora.layers import Linear
from scalora.quantised import dequantise, quantisation
from scalora.side_branch import DEFAULT_CAPACITY_PER_RANK, SideBranch


class QuantisedLinear(Linear):
    """LoRA around a linear layer whose weight is quantised (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, see
    `scalora.quantised`), which cannot take a fold:

        y = Wq x + P Q x + s · B A x

    Folds go to the side branch P Q (`scalora.side_branch`, in the adapter's dtype, capacity 4r by default), which
    belongs to the frozen part: disabling the adapter keeps it. `merged_module` builds a plain ``nn.Linear`` in the
    adapter's dtype with weight dequant(Wq) + P Q + s B A; merging in place is impossible.
    """

    merges_in_place = False

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **kwargs) -> None:
        super().__init__(base_layer, r, scaling, **kwargs)
        self.side_branch = SideBranch(self.out_features, self.in_features, DEFAULT_CAPACITY_PER_RANK * r,
                                      dtype=self.lora_A.dtype, device=self.lora_A.device)

    def base_weight_oi(self) -> torch.Tensor:
        raise ConfigError(f"the base weight of this layer is quantised ({quantisation(self.weight)}) and cannot be "
                          f"written or viewed in place; read it with base_weight_dense() (dequantised, with the "
                          f"side branch).")

    def base_weight_dense(self) -> torch.Tensor:
        """dequant(Wq) + P Q, (out, in), in the adapter's dtype."""
        return dequantise(self.base_layer).to(self.side_branch.P.dtype) + self.side_branch.weight()

    def base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.side_branch.rank == 0:
            return result
        return result + self.side_branch(x).to(result.dtype)

    def enable_compensation(self, dtype: torch.dtype | None = None) -> None:
        """Nothing to compensate: folds are kept exactly in the side branch's factors."""

    @torch.no_grad()
    def fold_(self, B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """P Q ← P Q + B A by appending the factors (exact; `scalora.side_branch.compress` bounds the rank). Nothing
        is rounded, so `generator` is not used."""
        self.side_branch.append_(B, A)

    def fold_finite(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: are B and A finite (the side branch keeps them as they are)?"""
        return finite_in(B, self.side_branch.P.dtype) & finite_in(A, self.side_branch.Q.dtype)

    def merged_weight(self) -> torch.Tensor:
        """diag(a) (dequant(Wq) + P Q) + s B A, (out, in), in the adapter's dtype."""
        weight = self.base_weight_dense()
        if self.alpha_vector is not None:
            weight = self.alpha_vector[:, None] * weight
        return weight + self.delta_weight()

    def merged_bias(self) -> torch.Tensor | None:
        """a ⊙ b in the adapter's dtype (None without a bias)."""
        bias = self.base_layer.bias
        if bias is None:
            return None
        bias = bias.to(self.lora_A.dtype)
        return bias if self.alpha_vector is None else bias * self.alpha_vector

    @torch.no_grad()
    def check_merge(self, where: str = "this layer") -> None:
        """Refuse (`NonFiniteError`) a merge whose weight or bias would hold NaN or inf."""
        dtype = self.lora_A.dtype
        require_finite(self.merged_weight(), dtype, f"merging the adapter and the side branch of {where}")
        bias = self.merged_bias()
        if bias is not None:
            require_finite(bias, dtype, f"merging the α vector into the bias of {where}")

    def merge(self) -> None:
        raise ConfigError("a quantised base weight cannot hold the merged update; merge(model) (unload=True) "
                          "replaces the layer by a plain nn.Linear instead.")

    @torch.no_grad()
    def merged_module(self) -> nn.Linear:
        """A frozen ``nn.Linear`` in the adapter's dtype with weight `merged_weight` and bias `merged_bias`."""
        bias = self.merged_bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=self.lora_A.device,
                           dtype=self.lora_A.dtype)
        linear.weight.copy_(self.merged_weight())
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.requires_grad_(False)
