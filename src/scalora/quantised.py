"""Quantised base weights: which ones scalora reads, and their value in floating point.

scalora reads bitsandbytes' 4-bit (``Linear4bit``: NF4 / FP4 blocks with their absmax) and 8-bit
(``Linear8bitLt`` with ``has_fp16_weights=False``: int8 rows with one scale each) weights; it matches them by class
name, so bitsandbytes stays optional. Layers with other quantised weights (non-floating-point tensors, torchao's
tensor subclasses) are refused by name: a fold cannot be written into them, and scalora cannot read them back.
"""

from __future__ import annotations

import torch
from torch import nn


def quantisation(weight: object) -> str | None:
    """bitsandbytes' format of a quantised `weight` (``"nf4"``, ``"fp4"`` or ``"int8"``), None for any other."""
    name = type(weight).__name__
    if name == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        return weight.quant_state.quant_type
    if name == "Int8Params" and weight.dtype == torch.int8:
        return "int8"
    return None


def unreadable(weight: object) -> str | None:
    """Why a layer with this weight cannot be adapted (a quantised weight scalora cannot read), None when it can."""
    if not isinstance(weight, torch.Tensor) or quantisation(weight) is not None:
        return None
    kind = f"{type(weight).__module__}.{type(weight).__name__} of dtype {str(weight.dtype).removeprefix('torch.')}"
    if type(weight).__name__ == "Params4bit":
        return (f"has a bitsandbytes 4-bit weight that is not quantised yet ({kind}): move the model to its device "
                f"(model.to(device)) before adding adapters")
    if not weight.is_floating_point() or type(weight).__module__.split(".")[0] == "torchao":
        return (f"has a quantised weight scalora cannot read ({kind}); scalora adapts plain floating-point weights "
                f"and bitsandbytes' Linear4bit and Linear8bitLt (has_fp16_weights=False). Leave the layer out of "
                f"target_modules, or quantise it with bitsandbytes")
    return None


def dequantise(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes layer computes with: 4-bit in its quantisation state's dtype, 8-bit as
    int8 · row scale / 127 in float32."""
    import bitsandbytes.functional as bnb_functional  # present: the weight is bitsandbytes'

    weight = layer.weight
    if quantisation(weight) == "int8":
        scale = weight.SCB if weight.SCB is not None else layer.state.SCB
        return bnb_functional.int8_vectorwise_dequant(weight.data, scale)
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
