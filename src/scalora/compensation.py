"""The fold compensation: what rounding a fold into a half-precision weight lost, kept until the next fold.

A fold W ← round(W + c + Δ) into a bf16 / fp16 weight keeps the rounding error c = (W + c + Δ) − W_new for the next
fold (Kahan summation), so thousands of folds far below the weight's spacing add up to the exact sum. Two buffers:

* **full**: c in the weight's own dtype (2 bytes per entry in bf16: the weights' memory again). c is at most half a
  spacing of W and is kept to the dtype's relative precision, far finer than W's spacing.
* **int8**: c in units of spacing(W) / 254, one byte per entry, so that ±half a spacing is ±127. The residual is
  rounded to those units *stochastically* (up with probability equal to the fraction of a unit), so nothing is lost
  on average: each fold adds a random error of at most 1/254 of W's spacing, whose sum over N folds grows like √N
  units rather than N (`benchmarks/bf16_drift.py`: 1.1× the rounding floor after 10 000 folds).

spacing(w) is the gap from |w| to the next larger value of w's dtype (one unit in the last place).
"""

from __future__ import annotations

import torch

INT8_UNITS = 254
"""Units of an int8 compensation per spacing of the weight: half a spacing is 127, the largest int8 that has a
negative twin, so every residual of a fold rounded to nearest fits."""


def spacing(weight: torch.Tensor) -> torch.Tensor:
    """The gap from |w| to the next larger value of w's dtype, per entry, in float32 (one unit in the last place)."""
    magnitude = weight.abs()
    return torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))).float() - magnitude.float()


def compensation_value(buffer: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The compensation c held by `buffer` for `weight` (the same entries), in `dtype` (float32 or wider)."""
    if buffer.dtype != torch.int8:
        return buffer.to(dtype)
    return buffer.to(dtype) * (spacing(weight).to(dtype) / INT8_UNITS)


def compensation_residual(exact: torch.Tensor, rounded: torch.Tensor, buffer_dtype: torch.dtype,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """What a buffer of `buffer_dtype` keeps after `exact` (float32 or wider) was rounded to `rounded`: exact − rounded,
    in that dtype; for int8, in units of spacing(rounded) / `INT8_UNITS`, rounded stochastically with `generator`
    (on exact's device), or to nearest without one. Residuals that are not finite (an overflowing fold) keep 0."""
    residual = exact - rounded.to(exact.dtype)
    if buffer_dtype != torch.int8:
        return residual.to(buffer_dtype)
    units = torch.nan_to_num(residual * (INT8_UNITS / spacing(rounded).to(exact.dtype)), nan=0.0, posinf=0.0,
                             neginf=0.0)
    if generator is None:
        units = units.round()
    else:
        units = (units + torch.rand(units.shape, generator=generator, dtype=units.dtype, device=units.device)).floor()
    half = INT8_UNITS // 2
    return units.clamp(-half, half).to(torch.int8)
