"""Finite or refuse: the checks that keep NaN and inf out of base weights, adapters and checkpoints."""

from __future__ import annotations

from collections.abc import Iterable

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


def require_finite(value: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise `NonFiniteError` when `value`, rounded to `dtype`, holds NaN or inf (overflow of `dtype` included).

    `what` names the write that is refused, e.g. "merging the adapter into the base weight of layer 'fc'".
    """
    if not bool(value.to(dtype).isfinite().all()):
        raise NonFiniteError(
            f"{what} would make it NaN or infinite in {str(dtype).removeprefix('torch.')}; nothing was changed. "
            f"The adapter holds NaN/inf or values too large for that dtype: retrain with a lower learning rate, "
            f"or load the base weights in float32."
        )
