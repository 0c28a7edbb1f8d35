"""The side branch of a layer whose base weight is quantised: the folds that weight cannot take, kept as a product of
two thin factors beside it.

    W = dequant(Wq) + P Q + s·B A        P: out × k,  Q: k × in  (float32, or the adapter's dtype)

Each fold `B A` (B: out × r, A: r × in) appends r columns to P and r rows to Q, so the branch holds the exact sum of
the folds while k ≤ `capacity`. Above it, `compress` replaces P Q by its best rank-`capacity` approximation in the
Frobenius norm (Eckart–Young), computed from thin QRs of both factors and an SVD of the small core, never the out × in
product; the norm of what is cut is added to `SideBranch.dropped`.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: the capacity of a side branch, in multiples of the adapter's rank r: four times r costs as much memory as the
#: adapter with its gradient and AdamW's two moments, (out + in)·4r numbers
DEFAULT_CAPACITY_PER_RANK = 4

_FULL = ("a quantised layer's side branch reached its capacity: from now on every fold is followed by a truncated "
         "SVD back to it, and what is cut is recorded (ScaLoRA's last_stats.side_residual, "
         "layer.side_branch.residual()). Raise side_rank for an exact sum of the folds.")


def recompress(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], rank: int
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For every (P, Q): factors P' (out × k), Q' (k × in) whose product is the best rank-k approximation of P Q
    (k = min(`rank`, the rank P Q can have)), and the singular values σ of P Q (descending, float32 or wider).

    P = U_P R_P and Qᵀ = U_Q R_Q (thin QR), R_P R_Qᵀ = U Σ Vᵀ, so P Q = (U_P U) Σ (U_Q V)ᵀ;
    P' = U_P U_k Σ_k^½ and Q' = Σ_k^½ V_kᵀ U_Qᵀ. What is cut has Frobenius norm sqrt(Σ_{i>k} σ_i²). The SVDs of
    cores of one shape run as one batched call. Computed in float32 or wider, returned in the factors' dtypes.
    """
    bases, groups = [], defaultdict(list)
    for index, (P, Q) in enumerate(pairs):
        dtype = torch.promote_types(P.dtype, torch.float32)
        U_P, R_P = torch.linalg.qr(P.to(dtype))
        U_Q, R_Q = torch.linalg.qr(Q.to(dtype).T)
        bases.append((U_P, U_Q))
        core = R_P @ R_Q.T
        groups[(tuple(core.shape), core.dtype, core.device)].append((index, core))
    results: list = [None] * len(pairs)
    for members in groups.values():
        U, sigma, Vh = torch.linalg.svd(torch.stack([core for _, core in members]), full_matrices=False)
        k = min(rank, sigma.shape[-1])
        root = sigma[:, :k].sqrt()
        for j, (index, _) in enumerate(members):
            (U_P, U_Q), (P, Q) = bases[index], pairs[index]
            results[index] = ((U_P @ (U[j, :, :k] * root[j])).to(P.dtype),
                              ((root[j, :, None] * Vh[j, :k]) @ U_Q.T).to(Q.dtype), sigma[j])
    return results


class SideBranch(nn.Module):
    """P Q, the sum of the folds into a quantised weight (module docstring), added to the base layer's output.

    Buffers (in the model's state dict): P (out × k) and Q (k × in) in `dtype`, k growing from 0 to `capacity`, and
    `dropped` (float64): Σ over recompressions of ‖what was cut‖_F, a bound on ‖Σ folds − P Q‖_F.
    """

    def __init__(self, out_features: int, in_features: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.register_buffer("P", torch.zeros(out_features, 0, dtype=dtype, device=device))
        self.register_buffer("Q", torch.zeros(0, in_features, dtype=dtype, device=device))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.float64, device=device))
        self.capacity = capacity

    @property
    def rank(self) -> int:
        """k, the number of columns of P (known on the host)."""
        return self.P.shape[1]

    @property
    def capacity(self) -> int:
        """The largest rank kept after `compress` (at most min(out, in), where the branch is exact)."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = min(value, *self.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.P.shape[0], self.Q.shape[1]

    def nbytes(self) -> int:
        """Memory of the branch at its capacity: (out + in)·capacity numbers of its dtype."""
        return sum(self.shape) * self.capacity * self.P.element_size()

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}, rank={self.rank}, capacity={self.capacity}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """P (Q x) for the layer's input x, in the branch's dtype."""
        return F.linear(F.linear(x.to(self.P.dtype), self.Q), self.P)

    def weight(self) -> torch.Tensor:
        """P Q, (out, in)."""
        return self.P @ self.Q

    def append_(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """P ← [P B], Q ← [Q; A]: the branch now adds B A too (exactly; `compress` bounds the rank)."""
        self.P = torch.cat([self.P, B.to(self.P.dtype)], dim=1)
        self.Q = torch.cat([self.Q, A.to(self.Q.dtype)], dim=0)

    def frobenius_norm(self) -> torch.Tensor:
        """‖P Q‖_F from the k × k Grams: ‖P Q‖²_F = Σ (PᵀP) ⊙ (Q Qᵀ)."""
        return ((self.P.T @ self.P) * (self.Q @ self.Q.T)).sum().clamp_min(0.0).sqrt()

    def residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(`dropped`, `dropped` / ‖P Q‖_F): what recompressions cut, absolute and relative to what the branch holds
        (0-dim float64 tensors on the branch's device; 0 while nothing was cut)."""
        norm = self.frobenius_norm().double()
        return self.dropped, torch.where(self.dropped > 0, self.dropped / norm, 0.0)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # P and Q grow with the folds: take the saved rank before the values are copied in
        for name in ("P", "Q"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.dim() == 2:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def compress(branches: Iterable[SideBranch]) -> None:
    """Bring every branch above its capacity back to it (`recompress`, one batched SVD per core shape and capacity)
    and add the norm of what was cut to its `dropped`. Which branches are full is known on the host; nothing is read
    back (on an accelerator torch's SVD itself waits for its convergence flag, once per batch)."""
    by_capacity = defaultdict(list)
    for branch in branches:
        if branch.rank > branch.capacity:
            by_capacity[branch.capacity].append(branch)
    if by_capacity:
        warnings.warn(_FULL, RuntimeWarning, stacklevel=2)
    for capacity, full in by_capacity.items():
        for branch, (P, Q, sigma) in zip(full, recompress([(b.P, b.Q) for b in full], capacity), strict=True):
            branch.P, branch.Q = P, Q
            branch.dropped += sigma[capacity:].square().sum().sqrt().to(branch.dropped.dtype)
