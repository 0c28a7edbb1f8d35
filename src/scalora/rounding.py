"""Stochastic rounding: how folds into a half-precision base weight add up without a compensation buffer.

Rounding x to the nearest value of a low-precision dtype loses every addition smaller than half its spacing: ten
thousand tiny ScaLoRA folds into a bf16 weight vanish. Stochastic rounding picks one of the two neighbours
lo ≤ x ≤ hi of the dtype at random,

    round(x) = hi with probability (x − lo) / (hi − lo), else lo,

so E[round(x)] = x: the additions survive on average, with a random error of about sqrt(|update| · spacing) per
entry instead of a systematic loss, and nothing is stored between folds (`benchmarks/bf16_drift.py` compares it
with the compensated fold, which keeps the exact sum in a buffer the size of the weight).
"""

from __future__ import annotations

import torch


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """`x` (float32 or wider) rounded stochastically to `dtype`, with random numbers from `generator` (on x's device).

    Values of `dtype` (x exactly representable), inf and NaN come back unchanged; values beyond the dtype's range
    become inf as under rounding to nearest.
    """
    nearest = x.to(dtype)
    up = nearest.to(x.dtype) < x
    toward = torch.where(up, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(nearest, toward)  # the neighbour on x's other side
    low, high = nearest.to(x.dtype), other.to(x.dtype)
    p_other = (x - low) / (high - low)  # in [0, ½]: 0 when x is representable, NaN for inf/NaN (never taken)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.where(u < p_other, other, nearest)
