"""Finite or refuse: the checks that keep NaN and inf out of base weights, adapters and checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from scalora.errors import ScaloraError


class NonFiniteError(ScaloraError, ValueError):
    """A tensor holds NaN or inf, or writing a result would put NaN or inf into a weight (which is left unchanged)."""


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor that holds a NaN or an infinity; None when all are finite."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            return name
    return None


def finite_in(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim bool tensor on `value`'s device (nothing is read back): is `value`, rounded to `dtype`, free of NaN
    and inf (overflow of `dtype` included)?"""
    return value.to(dtype).isfinite().all()


def first_false(flags: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first of `flags` (name, 0-dim bool tensor) that is False, None when all are True: one
    host–device synchronisation for all of them."""
    if not flags:
        return None
    device = flags[0][1].device
    values = torch.stack([flag.to(device) for _, flag in flags]).tolist()
    return next((name for (name, _), ok in zip(flags, values, strict=True) if not ok), None)


def nonfinite_error(dtype: torch.dtype, what: str) -> NonFiniteError:
    """The error that refuses a write: `what` names it, e.g. "merging the adapter into the base weight of layer
    'fc'", which would make the weight NaN or infinite in `dtype`."""
    return NonFiniteError(
        f"{what} would make it NaN or infinite in {str(dtype).removeprefix('torch.')}; nothing was changed. "
        f"The adapter holds NaN/inf or values too large for that dtype: retrain with a lower learning rate, "
        f"or load the base weights in float32."
    )


def require_finite(value: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise `NonFiniteError` (`nonfinite_error`) when `value`, rounded to `dtype`, holds NaN or inf."""
    if not bool(finite_in(value, dtype)):
        raise nonfinite_error(dtype, what)
