"""LoRA layers: a frozen base layer plus a scaled low-rank update and an optional α vector.

    y = a ⊙ base(x) + s · B (A x)        A: r × in,  B: out × r,  a ∈ R^out (α-LoRA; 1 when absent)

Every layer type shares that maths in :class:`LoraLayer`; the subclasses only say how the adapter reads its
input (a matrix product for ``nn.Linear`` and GPT-2's ``Conv1D``, a table look-up for ``nn.Embedding``) and how
the base weight is laid out (``(out, in)`` for ``nn.Linear``; ``(in, out)`` for ``Conv1D`` and ``nn.Embedding``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scalora.compensation import compensation_residual, compensation_value
from scalora.errors import ConfigError
from scalora.finite import finite_in, nonfinite_error, require_finite
from scalora.quantised import quantisation
from scalora.rounding import stochastic_round
from scalora.sharded import local

#: size of one float32 temporary of a fold into a half-precision weight: folds work in row chunks of at most this
#: many bytes and hold at most eight such temporaries at once (≤ 64 MiB whatever the layer's size)
FOLD_CHUNK_BYTES = 8 * 2**20


def row_chunks(rows: int, cols: int) -> list[slice]:
    """Slices of consecutive rows of a rows × cols matrix whose float32 copy fits `FOLD_CHUNK_BYTES` (≥ 1 row)."""
    step = max(1, FOLD_CHUNK_BYTES // (4 * max(1, cols)))
    return [slice(start, start + step) for start in range(0, rows, step)]


class LoraLayer(nn.Module):
    """Base of the LoRA layers. ``delta_weight() = s · B A`` in ``(out, in)`` layout.

    Args:
        base_layer: the frozen layer being adapted.
        in_features / out_features: sizes of the adapted map (for an embedding: vocabulary and dimension).
        r: rank; lora_alpha, use_rslora: give the scale s (see `scalora.config.lora_scaling`).
        lora_dropout: dropout on the adapter's input.
        alpha_vector: add α-LoRA's learned row scaling `a` of the base output (initialised to 1).
        init_lora_weights: True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r²), B = 0), False (random).
    """

    #: the base weight is stored as (in, out) instead of (out, in)
    fan_in_fan_out: bool = False
    #: `merge` writes the update into the base weight (else only `merged_module` can merge)
    merges_in_place: bool = True

    def __init__(
        self,
        base_layer: nn.Module,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        *,
        lora_dropout: float = 0.0,
        alpha_vector: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        check_rank(r, in_features, out_features, "this layer")
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.scaling = scaling
        weight = base_layer.weight
        # Half-precision and quantised bases get float32 adapters (as PEFT does): the low-rank factors are tiny.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kwargs = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kwargs))
        self.alpha_vector = nn.Parameter(torch.ones(out_features, **kwargs)) if alpha_vector else None
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        # Rounding error of repeated folds into a half-precision base weight (see `fold_`); None until enabled.
        self.register_buffer("base_compensation", None)
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """A Kaiming-uniform (a = √5) or N(0, 1/r²), B = 0: the layer starts as its base."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------ weights in (out, in) layout
    @property
    def weight(self) -> torch.Tensor:
        """The base weight as stored (so code that reads `.weight` of the wrapped layer keeps working)."""
        return self.base_layer.weight

    def base_weight_oi(self) -> torch.Tensor:
        """A view of the frozen base weight in (out, in) layout; writing to it writes the base weight."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def base_weight_dense(self) -> torch.Tensor:
        """W0 as the forward applies it, (out, in), for reading (a view of the base weight here)."""
        return self.base_weight_oi()

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B * self.scaling) @ self.lora_A

    def enable_compensation(self, dtype: torch.dtype | None = None) -> None:
        """Keep a buffer, in (out, in) layout, of what folds into the base lost to rounding (`scalora.compensation`):
        in the weight's dtype (None), or ``torch.int8`` (in fractions of the weight's spacing, half the bytes)."""
        if self.base_compensation is None:
            self.base_compensation = torch.zeros_like(self.base_weight_oi(), dtype=dtype,
                                                      memory_format=torch.contiguous_format)

    @torch.no_grad()
    def fold_(self, B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """W0 ← W0 + B A (in (out, in) layout), the base of ScaLoRA's and ReLoRA's merges.

        A weight of another dtype than B (bf16, fp16) is written in row chunks (`row_chunks`), so no temporary is
        larger than `FOLD_CHUNK_BYTES`. With `enable_compensation`, each chunk of W0 + c + B A is formed in float32
        and the part lost when it is rounded back to W0's dtype is kept in c (Kahan summation: thousands of tiny
        folds add up, at the cost of a buffer the size of W0, or half of it in int8, whose residual is rounded
        stochastically with `generator`: `scalora.compensation`). Else, with a `generator`, the sum is rounded
        stochastically (`scalora.rounding.stochastic_round`: exact on average, no buffer); else to nearest.
        A W0 sharded by FSDP2 is folded on this rank's rows, which B (its local rows too) must match.
        """
        weight = local(self.base_weight_oi())
        if weight.dtype == B.dtype and self.base_compensation is None:
            weight.addmm_(B, A)
            return
        for rows in row_chunks(*weight.shape):
            if self.base_compensation is None and generator is None:
                weight[rows].add_((B[rows] @ A).to(weight.dtype))
                continue
            exact = self.folded_weight(B, A, rows=rows)
            if self.base_compensation is None:
                weight[rows].copy_(stochastic_round(exact, weight.dtype, generator))
                continue
            weight[rows].copy_(exact)
            self.base_compensation[rows].copy_(
                compensation_residual(exact, weight[rows], self.base_compensation.dtype, generator))

    # ------------------------------------------------------------------ forward
    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s · B (A x) for the layer's input x (overridden for embeddings)."""
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """W0 x (+ bias): the frozen part of the layer."""
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_output(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        if self.alpha_vector is not None:
            result = result * self.alpha_vector.to(result.dtype)
        return result + self.lora_output(x).to(result.dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def folded_weight(self, B: torch.Tensor, A: torch.Tensor, row_scale: torch.Tensor | None = None,
                      rows: slice = slice(None)) -> torch.Tensor:
        """The `rows` of what `fold_(B, A)` rounds into W0 (after W0's rows are scaled by `row_scale`), computed at
        float32 or wider: diag(row_scale) W0 + c + B A, with c the fold compensation when kept. Nothing is written."""
        weight = local(self.base_weight_oi())[rows]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        base = (weight if row_scale is None else weight * row_scale[rows, None]).to(dtype)
        if self.base_compensation is not None:
            base = base + compensation_value(self.base_compensation[rows], weight, dtype)
        return torch.addmm(base, B[rows].to(dtype), A.to(dtype))

    def fold_finite(self, B: torch.Tensor, A: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """A 0-dim bool tensor on W0's device, nothing read back: is a `fold_(B, A)` (after W0's rows are scaled by
        `row_scale`) rounded to nearest finite in the weight's dtype? Checked in row chunks (`row_chunks`), so no
        temporary is the size of W0; `scalora.finite.first_false` reads many at once."""
        weight = local(self.base_weight_oi())
        return torch.stack([finite_in(self.folded_weight(B, A, row_scale, rows=rows), weight.dtype)
                            for rows in row_chunks(*weight.shape)]).all()

    def check_merge(self, where: str = "this layer") -> None:
        """Refuse (`NonFiniteError`) a `merge` that would write NaN or inf into the base weight or bias."""
        if self.merged:
            return
        weight, bias = self.base_weight_oi(), getattr(self.base_layer, "bias", None)
        a = None if self.alpha_vector is None else self.alpha_vector.to(weight.dtype)
        if not bool(self.fold_finite(self.lora_B * self.scaling, self.lora_A, a)):
            raise nonfinite_error(weight.dtype, f"merging the adapter into the base weight of {where}")
        if a is not None and bias is not None:
            require_finite(bias * a.to(bias.dtype), bias.dtype, f"merging the α vector into the bias of {where}")

    def check_unmerge(self, where: str = "this layer") -> None:
        """Refuse an `unmerge` that cannot restore the base: α entries of 0 (`ConfigError`), or a result that is
        NaN or inf in the weight's dtype (`NonFiniteError`)."""
        if not self.merged:
            return
        weight, bias = self.base_weight_oi(), getattr(self.base_layer, "bias", None)
        if self.alpha_vector is not None and bool((self.alpha_vector == 0).any()):
            raise ConfigError(f"cannot unmerge {where}: some entries of its α vector are 0, so the base weight is "
                              f"lost; reload the base model instead.")
        restored = self.folded_weight(self.lora_B * -self.scaling, self.lora_A).to(weight.dtype)
        if self.alpha_vector is not None:
            a = self.alpha_vector.to(weight.dtype)
            restored = restored / a[:, None]
            if bias is not None:
                require_finite(bias / a.to(bias.dtype), bias.dtype, f"unmerging the α vector from the bias of {where}")
        require_finite(restored, weight.dtype, f"unmerging the adapter from the base weight of {where}")

    @torch.no_grad()
    def merge(self) -> None:
        """W ← diag(a) W + s B A and b ← a ⊙ b, in place; the forward then uses the base layer alone.

        Refused, with nothing written, if the result would be NaN or inf in the weight's dtype (`check_merge`).
        """
        if self.merged:
            return
        self.check_merge()
        weight = self.base_weight_oi()
        if self.alpha_vector is not None:
            a = self.alpha_vector.to(weight.dtype)
            weight.mul_(a[:, None])
            if getattr(self.base_layer, "bias", None) is not None:
                self.base_layer.bias.mul_(a.to(self.base_layer.bias.dtype))
        self.fold_(self.lora_B * self.scaling, self.lora_A)
        self.merged = True

    def merged_module(self) -> nn.Module:
        """`merge` the layer and return the plain module that computes what it computed: its base layer."""
        self.merge()
        return self.base_layer

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W ← diag(1/a)(W − s B A), b ← b / a (exact up to rounding; refused, with nothing written,
        if some a = 0 or the result would be NaN or inf: `check_unmerge`)."""
        if not self.merged:
            return
        self.check_unmerge()
        weight = self.base_weight_oi()
        self.fold_(self.lora_B * -self.scaling, self.lora_A)
        if self.alpha_vector is not None:
            a = self.alpha_vector.to(weight.dtype)
            weight.div_(a[:, None])
            if getattr(self.base_layer, "bias", None) is not None:
                self.base_layer.bias.div_(a.to(self.base_layer.bias.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        alpha = ", alpha_vector=True" if self.alpha_vector is not None else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:.4g}{alpha}"


class Linear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight (out, in))."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **kwargs) -> None:
        super().__init__(base_layer, base_layer.in_features, base_layer.out_features, r, scaling, **kwargs)


class Conv1D(LoraLayer):
    """LoRA around transformers' GPT-2 ``Conv1D`` (y = x W + b with W stored (in, out))."""

    fan_in_fan_out = True

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, **kwargs) -> None:
        in_features, out_features = base_layer.weight.shape
        super().__init__(base_layer, in_features, out_features, r, scaling, **kwargs)


class Embedding(LoraLayer):
    """LoRA around ``nn.Embedding`` (table (num_embeddings, dim) = (in, out)); ΔW = s (B A)ᵀ.

    As in PEFT, A (r × num_embeddings) starts at 0 and B (dim × r) is Gaussian, and no dropout is applied.
    """

    fan_in_fan_out = True

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, **kwargs) -> None:
        kwargs["lora_dropout"] = 0.0
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim, r, scaling, **kwargs)

    def reset_lora_parameters(self, init: bool | str = True) -> None:
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(
            x, self.lora_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
            norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )
        return F.linear(after_a * self.scaling, self.lora_B)


def check_rank(r: int, in_features: int, out_features: int, where: str) -> None:
    """A rank-r update of an out × in weight needs r ≤ min(in, out)."""
    if r > min(in_features, out_features):
        raise ConfigError(
            f"r={r} is larger than {where} allows: its weight is {out_features} × {in_features}, so the rank can "
            f"be at most {min(in_features, out_features)}. Lower r, or give it its own rank with rank_pattern."
        )


def lora_layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class that wraps `module`, or None if its type is not supported."""
    if isinstance(module, nn.Linear):
        if quantisation(module.weight) is None:
            return Linear
        from scalora.quantised_layer import QuantisedLinear  # it builds on Linear

        return QuantisedLinear
    if isinstance(module, nn.Embedding):
        return Embedding
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return Conv1D  # transformers.pytorch_utils.Conv1D, matched by name so transformers stays optional
    return None
