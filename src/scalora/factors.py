"""A pair of LoRA factors over the base weight they fold into: the one view of an adapter that ScaLoRA, ReLoRA and
the rank tools use, for scalora's layers and PEFT's alike.

    W = W0 + s · B A        A: r × in,  B: out × r,  W0 and B A in (out, in) layout

`lora_factors(model)` finds them: scalora's `LoraLayer`s, or else the LoRA layers of PEFT's active adapter
(``peft.get_peft_model``): ``lora_A[name].weight``, ``lora_B[name].weight`` and ``scaling[name]`` (rsLoRA's
α/√r included), ``lora_embedding_A/B[name]`` for embeddings, and GPT-2's ``Conv1D`` weight stored (in, out)
(PEFT's ``fan_in_fan_out``). The factors are the model's own parameters, so the optimiser that updates them
and the folds into W0 act on the model in place; dropout and `modules_to_save` live in the forward and the
optimiser and need nothing here.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from scalora.errors import ConfigError
from scalora.layers import Embedding, LoraLayer
from scalora.quantised import quantisation
from scalora.side_branch import SideBranch

#: set on a layer (scalora's or PEFT's) whose base weight an optimiser wrapper merges updates into
BASE_CHANGED = "scalora_base_changed"


class LoraFactors(ABC):
    """A (r × in), B (out × r), the scale s and the base weight W0 of one adapted layer."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    @abstractmethod
    def lora_A(self) -> torch.Tensor:
        """A, (r, in): the parameter itself."""

    @property
    @abstractmethod
    def lora_B(self) -> torch.Tensor:
        """B, (out, r): the parameter itself."""

    @property
    @abstractmethod
    def scaling(self) -> float:
        """s of the update s·B A."""

    @property
    @abstractmethod
    def active(self) -> bool:
        """True when the forward adds s·B A to W0 (the adapter is neither merged into W0 nor disabled)."""

    @property
    @abstractmethod
    def embedding(self) -> bool:
        """True for an embedding table (PEFT's files call its factors lora_embedding_A / _B)."""

    @property
    @abstractmethod
    def fan_in_fan_out(self) -> bool:
        """True when W0 is stored (in, out): GPT-2's Conv1D and embeddings."""

    @property
    @abstractmethod
    def base_in_state_dict(self) -> bool:
        """True when the model's checkpoints (its state dict) hold W0; PEFT's hold only the adapter."""

    @property
    def alpha_vector(self) -> torch.Tensor | None:
        """α-LoRA's row scaling a of the base output (scalora only)."""
        return None

    @property
    @abstractmethod
    def base_compensation(self) -> torch.Tensor | None:
        """The rounding error of folds into a half-precision W0 (see `fold_`), once `enable_compensation` ran."""

    @property
    @abstractmethod
    def weight(self) -> torch.Tensor:
        """W0 as stored: the base layer's weight parameter."""

    def base_weight_oi(self) -> torch.Tensor:
        """A view of W0 in (out, in) layout; writing to it writes the base weight."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def base_weight_dense(self) -> torch.Tensor:
        """W0 as the forward applies it, (out, in), for reading: a quantised W0 dequantised, with its side branch."""
        return self.base_weight_oi()

    @property
    def side_branch(self) -> SideBranch | None:
        """Where folds into a quantised W0 go (`scalora.side_branch`); None for a floating-point W0."""
        return None

    @abstractmethod
    def fold_(self, B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """W0 ← W0 + B A, Kahan-compensated once `enable_compensation` ran (an int8 buffer's residual rounded
        stochastically with `generator`), else rounded stochastically with `generator` when given
        (`LoraLayer.fold_`)."""

    @abstractmethod
    def fold_finite(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool device tensor: is `fold_(B, A)` finite in W0's dtype? (`scalora.finite.first_false`)"""

    @abstractmethod
    def enable_compensation(self, dtype: torch.dtype | None = None) -> None:
        """Keep `base_compensation` from now on, in W0's dtype (None) or int8 (`LoraLayer.enable_compensation`)."""

    @abstractmethod
    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform and B = 0 (embeddings: A = 0, B Gaussian): the adapter adds nothing (ReLoRA's restart)."""

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def base_changed(self) -> bool:
        """True once an optimiser wrapper (ScaLoRA, ReLoRA) took charge of merging updates into W0."""
        return bool(getattr(self.module, BASE_CHANGED, False))

    def mark_base_changed(self) -> None:
        setattr(self.module, BASE_CHANGED, True)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float64 (out, in): diag(a) W0 + s B A (W0 alone when not active)."""
        weight = self.base_weight_dense().detach().double()
        if not self.active:
            return weight
        if self.alpha_vector is not None:
            weight = self.alpha_vector.detach().double()[:, None] * weight
        return weight + self.scaling * (self.lora_B.detach().double() @ self.lora_A.detach().double())


class ScaloraFactors(LoraFactors):
    """The factors of scalora's `LoraLayer` (everything delegated to the layer)."""

    module: LoraLayer

    @property
    def lora_A(self) -> torch.Tensor:
        return self.module.lora_A

    @property
    def lora_B(self) -> torch.Tensor:
        return self.module.lora_B

    @property
    def scaling(self) -> float:
        return self.module.scaling

    @property
    def active(self) -> bool:
        return not (self.module.merged or self.module.disabled)

    @property
    def embedding(self) -> bool:
        return isinstance(self.module, Embedding)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.module.fan_in_fan_out

    @property
    def base_in_state_dict(self) -> bool:
        return True

    @property
    def alpha_vector(self) -> torch.Tensor | None:
        return self.module.alpha_vector

    @property
    def base_compensation(self) -> torch.Tensor | None:
        return self.module.base_compensation

    @property
    def weight(self) -> torch.Tensor:
        return self.module.base_layer.weight

    def base_weight_oi(self) -> torch.Tensor:
        return self.module.base_weight_oi()

    def base_weight_dense(self) -> torch.Tensor:
        return self.module.base_weight_dense()

    @property
    def side_branch(self) -> SideBranch | None:
        return getattr(self.module, "side_branch", None)

    def fold_(self, B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        self.module.fold_(B, A, generator)

    def fold_finite(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return self.module.fold_finite(B, A)

    def enable_compensation(self, dtype: torch.dtype | None = None) -> None:
        self.module.enable_compensation(dtype)

    def reset_lora_parameters(self) -> None:
        self.module.reset_lora_parameters()


class PeftFactors(LoraFactors):
    """The factors of one adapter of a PEFT LoRA layer (``peft.tuners.lora.Linear`` or ``Embedding``).

    Folds are scalora's own: `LoraLayer`'s fold and finite check read only `base_weight_oi`,
    `base_compensation` and `weight`. The compensation buffer lives on the PEFT layer, outside its state dict.
    """

    fold_ = LoraLayer.fold_
    fold_finite = LoraLayer.fold_finite
    folded_weight = LoraLayer.folded_weight
    enable_compensation = LoraLayer.enable_compensation

    def __init__(self, module: nn.Module, adapter: str) -> None:
        super().__init__(module)
        self.adapter = adapter

    @property
    def lora_A(self) -> torch.Tensor:
        if self.embedding:
            return self.module.lora_embedding_A[self.adapter]
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> torch.Tensor:
        if self.embedding:
            return self.module.lora_embedding_B[self.adapter]
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return self.module.scaling[self.adapter]

    @property
    def active(self) -> bool:
        return not (self.module.merged or self.module.disable_adapters)

    @property
    def embedding(self) -> bool:
        return self.adapter in self.module.lora_embedding_A

    @property
    def fan_in_fan_out(self) -> bool:
        return self.embedding or bool(self.module.fan_in_fan_out)

    @property
    def base_in_state_dict(self) -> bool:
        return False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.get_base_layer().weight

    @property
    def base_compensation(self) -> torch.Tensor | None:
        return getattr(self.module, "base_compensation", None)

    @base_compensation.setter
    def base_compensation(self, value: torch.Tensor) -> None:
        self.module.register_buffer("base_compensation", value, persistent=False)

    def reset_lora_parameters(self) -> None:
        self.module.reset_lora_parameters(self.adapter, True)


def lora_factors(model: nn.Module) -> list[tuple[str, LoraFactors]]:
    """(name, factors) of every adapted layer: scalora's layers, or else those of PEFT's active adapter.

    PEFT's names are those of the model PEFT wraps (``model.layers.0.self_attn.q_proj``), as in its adapter files.
    Raises `ConfigError` for PEFT layers whose update is not s·B A over a plain weight (DoRA and other variants,
    ``lora_bias``, quantised or convolutional bases) and for several active adapters at once.
    """
    found: list[tuple[str, LoraFactors]] = [
        (name, ScaloraFactors(module)) for name, module in model.named_modules() if isinstance(module, LoraLayer)
    ]
    return found or list(_peft_factors(model))


def as_factors(layer: LoraLayer | LoraFactors) -> LoraFactors:
    """`layer` itself if it is already factors, else the factors of scalora's layer."""
    return layer if isinstance(layer, LoraFactors) else ScaloraFactors(layer)


def peft_root(model: nn.Module) -> nn.Module:
    """The model PEFT wraps (``PeftModel.base_model.model``), or `model` itself when it holds no PEFT wrapper."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is not None:
        for module in model.modules():
            if isinstance(module, tuners.BaseTuner):
                return module.model
    return model


def _peft_factors(model: nn.Module) -> Iterator[tuple[str, LoraFactors]]:
    lora = sys.modules.get("peft.tuners.lora")  # a model can hold PEFT's layers only once PEFT is imported
    if lora is None:
        return
    for name, module in peft_root(model).named_modules():
        if not isinstance(module, lora.LoraLayer):
            continue
        adapters = list(module.active_adapters)
        if len(adapters) != 1:
            raise ConfigError(f"PEFT layer {name!r} has {len(adapters)} active adapters {adapters}; ScaLoRA and "
                              f"ReLoRA train one: choose it with model.set_adapter(name).")
        adapter = adapters[0]
        if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
            continue  # the active adapter does not target this layer
        _check_peft_layer(name, module, adapter, lora)
        yield name, PeftFactors(module, adapter)


def _check_peft_layer(name: str, module: nn.Module, adapter: str, lora: ModuleType) -> None:
    """Refuse what is not W0 + s·B A over a plain floating-point weight."""
    what = None
    kind = quantisation(getattr(module.get_base_layer(), "weight", None))
    if kind is not None:
        what = (f"a bitsandbytes {kind} base weight, which cannot take a fold (scalora.apply_lora adapts it with a "
                f"side branch that takes them)")
    elif not isinstance(module, (lora.Linear, lora.Embedding)):
        what = f"a PEFT {type(module).__name__} layer (only Linear, GPT-2's Conv1D and Embedding are supported)"
    elif adapter in getattr(module, "lora_variant", {}):
        what = f"PEFT's {type(module.lora_variant[adapter]).__name__} (DoRA or another LoRA variant)"
    elif module.lora_bias.get(adapter, False):
        what = "lora_bias=True (a trained bias beside B A)"
    else:
        weight = getattr(module.get_base_layer(), "weight", None)
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())  # ZeRO-3 keeps the whole in ds_shape
        if not isinstance(weight, torch.Tensor) or len(shape) != 2 or not weight.is_floating_point():
            what = "a quantised or non-matrix base weight"
    if what is not None:
        raise ConfigError(f"layer {name!r} uses {what}: ScaLoRA, ReLoRA and the rank tools need the plain update "
                          f"W0 + s·B A. Use a peft.LoraConfig without it, or scalora.apply_lora.")
