"""ScaLoRA's scaling problem (docs/scalora.md) as a quadratic in r × r Gram products, batched over layers, in torch.

Notation (PEFT layout). A LoRA layer has ``lora_A`` (r × in), ``lora_B`` (out × r) and scale s, so ΔW = s·B·A.
With P = B, Q = Aᵀ, g_P = ∂ℓ/∂B and g_Q = (∂ℓ/∂A)ᵀ, ScaLoRA rescales P̃ = P diag(α) (the columns of ``lora_B``) and
Q̃ = Q diag(β) (the rows of ``lora_A``) so that one gradient step of size η from (P̃, Q̃) best matches the
L-smooth step −G/L:

    minimise over α, β   ‖G/L − η s² (G Q̃Q̃ᵀ + P̃P̃ᵀ G)‖²_F,     G = ∂ℓ/∂W.

Write v = c s² [α²; β²] with c = L·η. Because g_P = s G Q and g_Q = s Gᵀ P hold for any loss, the objective is an
exact quadratic in v that needs only r × r Gram products, never an out × in matrix:

    L² ‖G/L − η s² (G Q̃Q̃ᵀ + P̃P̃ᵀ G)‖²_F = ‖G‖²_F + (vᵀ H v − 2 λᵀ v) / s²,

    H = [ (PᵀP) ⊙ (g_Qᵀ g_Q)     (Pᵀ g_P) ⊙ (g_Qᵀ Q) ]      λ = [ colnorm²(g_Q) ; colnorm²(g_P) ].
        [ (g_Pᵀ P) ⊙ (Qᵀ g_Q)    (g_Pᵀ g_P) ⊙ (QᵀQ)  ]

H is positive semi-definite (a Schur product of two Gram matrices) and, for true gradients, λ lies in its range, so
the minimum over v ≥ 0 is finite. The scales are α = sqrt(v[:r] / (c s²)), β = sqrt(v[r:] / (c s²)).

**The optimiser-aware system** (``docs/scalora.md`` derives it). The paper's model assumes the next step is a plain
gradient step. The wrapped optimiser actually moves B̃ by −η U_B and Ã by −η U_A, where U is its own direction; with
the moments transformed, Adam's U is unchanged by the rescaling (m and √v scale alike), so the first-order change

    ΔW = −η s (U_B diag(β) A + B diag(α) U_A)

is *linear* in u = [α; β]. Fitting it to −G/L gives the same quadratic with the Gram blocks of the directions:

    H = [ (BᵀB) ⊙ (U_A U_Aᵀ)       (Bᵀ U_B) ⊙ (U_A Aᵀ) ]      λ = [ rowdot(grad_A, U_A) ; coldot(grad_B, U_B) ]
        [ (U_Bᵀ B) ⊙ (A U_Aᵀ)       (U_Bᵀ U_B) ⊙ (A Aᵀ)  ]

and u = v / (c s²) (power 1). With U = the gradient (plain SGD) it *is* the paper's system, whose variables are the
squared scales (power 2): one function builds both.

Everything here is batched over a leading layer dimension n and costs O(n (in + out) r²); :mod:`scalora.solver`
solves the quadratic for the scales (O(n r³)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "first_order_c",
    "lora_step_c",
    "batch_inputs",
    "compute_dtype",
    "objective",
    "on_device",
    "optimizer_system",
    "scales_from_v",
    "scaling_system",
    "v_from_scales",
]

# ----------------------------------------------------------------------------------------------------------------------
# inputs


def compute_dtype(dtype: torch.dtype | None, *tensors: Tensor) -> torch.dtype:
    """`dtype` (float32 or float64) if given, else float64 if any of `tensors` is, else float32."""
    if dtype is None:
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def batch_inputs(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """Add a leading layer dim to 2-D inputs and check shapes: A, grad_A (n, r, in); B, grad_B (n, out, r)."""
    if A.dim() not in (2, 3):
        raise ValueError(f"lora_A must be 2-D (r, in) or 3-D (n, r, in), got shape {tuple(A.shape)}")
    batched = A.dim() == 3
    if not batched:
        A, B, grad_A, grad_B = A.unsqueeze(0), B.unsqueeze(0), grad_A.unsqueeze(0), grad_B.unsqueeze(0)
    if B.dim() != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"lora_B shape {tuple(B.shape)} does not match lora_A shape {tuple(A.shape)}")
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradient shapes {tuple(grad_A.shape)}, {tuple(grad_B.shape)} differ from "
            f"parameter shapes {tuple(A.shape)}, {tuple(B.shape)}"
        )
    return A, B, grad_A, grad_B, batched


def on_device(x: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`x` as a tensor of `dtype` on `device`. A Python number is filled in on the device (`torch.full`) rather than
    copied from the host, so a scaling step on an accelerator never waits for a host-to-device transfer."""
    if isinstance(x, Tensor):
        return x.to(dtype=dtype, device=device)
    return torch.full((), x, dtype=dtype, device=device)


def _cs2(c: float | Tensor, scaling: float | Tensor, like: Tensor) -> Tensor:
    """c s² in `like`'s dtype and device, with a trailing dim to broadcast over the 2r entries of v when batched."""
    cs2 = on_device(c, like.dtype, like.device) * on_device(scaling, like.dtype, like.device) ** 2
    return cs2.unsqueeze(-1) if cs2.dim() > 0 else cs2



# ----------------------------------------------------------------------------------------------------------------------
# the system


def optimizer_system(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    dir_A: Tensor,
    dir_B: Tensor,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """H (n, 2r, 2r), λ (n, 2r), ‖dir_B dir_A‖²_F (n,) and the factors' squared norms [colnorm²(B); rownorm²(A)]
    (n, 2r) of the optimiser-aware fit, from r × r Gram products only.

    A, grad_A, dir_A: (n, r, in); B, grad_B, dir_B: (n, out, r) (2-D inputs give unbatched results). The optimiser
    will move B by −η·dir_B and A by −η·dir_A; with seven batched r × r Gram products

        H = [ (BᵀB) ⊙ (dir_A dir_Aᵀ)        (Bᵀ dir_B) ⊙ (dir_A Aᵀ) ]     λ = [ rowdot(grad_A, dir_A) ;
            [ (dir_Bᵀ B) ⊙ (A dir_Aᵀ)   (dir_Bᵀ dir_B) ⊙ (A Aᵀ)     ]           coldot(grad_B, dir_B) ],

    and ‖dir_B dir_A‖²_F = Σ (dir_Bᵀ dir_B) ⊙ (dir_A dir_Aᵀ), the size of the second-order term s η² dir_B dir_A.
    Cost O(n (in + out) r²); never an out × in matrix. H is symmetrised, ½(H + Hᵀ). Computed in ``dtype``: float64
    if any input is float64, else float32 (bf16 / fp16 inputs are upcast).
    """
    A, B, grad_A, grad_B, batched = batch_inputs(A, B, grad_A, grad_B)
    dir_A, dir_B, _, _, _ = batch_inputs(dir_A, dir_B, dir_A, dir_B)
    if dir_A.shape != A.shape or dir_B.shape != B.shape:
        raise ValueError(f"direction shapes {tuple(dir_A.shape)}, {tuple(dir_B.shape)} differ from "
                         f"parameter shapes {tuple(A.shape)}, {tuple(B.shape)}")
    dt = compute_dtype(dtype, A, B, grad_A, grad_B, dir_A, dir_B)
    A, B, grad_A, grad_B = A.to(dt), B.to(dt), grad_A.to(dt), grad_B.to(dt)
    dir_A, dir_B = dir_A.to(dt), dir_B.to(dt)
    BB, BuB, uBuB = B.mT @ B, B.mT @ dir_B, dir_B.mT @ dir_B
    AA, AuA, uAuA = A @ A.mT, A @ dir_A.mT, dir_A @ dir_A.mT
    H12 = BuB * AuA.mT
    H = torch.cat([torch.cat([BB * uAuA, H12], dim=-1), torch.cat([H12.mT, uBuB * AA], dim=-1)], dim=-2)
    H = 0.5 * (H + H.mT)
    lam = torch.cat([(grad_A * dir_A).sum(-1), (grad_B * dir_B).sum(-2)], dim=-1)
    second = (uBuB * uAuA).sum((-2, -1))
    norms = torch.cat([BB.diagonal(dim1=-2, dim2=-1), AA.diagonal(dim1=-2, dim2=-1)], dim=-1)
    if not batched:
        return H[0], lam[0], second[0], norms[0]
    return H, lam, second, norms


def scaling_system(
    A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """H (n, 2r, 2r) and λ (n, 2r) of the paper's rule: :func:`optimizer_system` with the gradients as directions.

    In PEFT layout (P = B, Q = Aᵀ, g_P = grad_B, g_Q = grad_Aᵀ):

        H = [ (BᵀB) ⊙ (grad_A grad_Aᵀ)        (Bᵀ grad_B) ⊙ (grad_A Aᵀ) ]     λ = [ diag(grad_A grad_Aᵀ) ;
            [ (grad_Bᵀ B) ⊙ (A grad_Aᵀ)   (grad_Bᵀ grad_B) ⊙ (A Aᵀ)     ]           diag(grad_Bᵀ grad_B) ].

    Six products on the factors as they are: concatenating [B, grad_B] and [A; grad_A] into one Gram each costs a
    copy of every factor and a third more multiply-adds, and measured slower (benchmarks/solver_cost.py).
    """
    H, lam, _, _ = optimizer_system(A, B, grad_A, grad_B, grad_A, grad_B, dtype=dtype)
    return H, lam


def _c_or_inf(numerator: Tensor, per_s2: Tensor, scaling: float | Tensor) -> Tensor:
    """c = numerator / (s² · per_s2) per layer, the form both automatic rules take; inf where either is 0 (the
    bound says nothing there: the caller maps the layer to the identity)."""
    s2 = scaling**2 if isinstance(scaling, (int, float)) else scaling.to(numerator.dtype).square()
    denom = s2 * per_s2
    ok = (denom > 0) & (numerator > 0)
    return torch.where(ok, numerator / torch.where(ok, denom, torch.ones_like(denom)), float("inf"))


def _quad(H: Tensor, x: Tensor) -> Tensor:
    """xᵀ H x over the trailing dims (batched), clamped at 0 (H is PSD up to rounding)."""
    return (x.unsqueeze(-2) @ H @ x.unsqueeze(-1)).squeeze(-1).squeeze(-1).clamp_min(0.0)


def lora_step_c(H: Tensor, v: Tensor, norms: Tensor, scaling: float | Tensor, factor_norm: float) -> Tensor:
    """c at which the fitted step is as large as LoRA's step from factors of norm ``factor_norm``: (n,) per layer.

    Under Adam the first-order change of W is −η s Σ_k u_k K_k with u = v / (c s²), of norm (η / (c s))·sqrt(vᵀHv).
    LoRA's own step from the same directions, with every column of B and row of A rescaled to norm ρ, is
    −η s Σ_k d_k K_k with d_k = ρ / ‖factor k‖, of norm η s·sqrt(dᵀHd). Equal sizes give

        c = sqrt(vᵀ H v) / (s² sqrt(dᵀ H d)),

    which does not depend on η: the step grows like the learning rate, as LoRA's does, so LoRA's learning rate
    serves ScaLoRA, while the scales choose its direction and how much of the adapter is handed to W0. The default
    ρ = 1/√3 is the norm of a row of LoRA's initial A (Kaiming-uniform). A zero factor (B = 0 at the first step)
    contributes nothing; layers where either norm is 0 get c = inf: the caller maps them to the identity.
    """
    if not (0 < factor_norm < float("inf")):
        raise ValueError(f"factor_norm must be positive and finite, got {factor_norm}")
    dt = v.dtype
    norms = norms.to(dt).clamp_min(0.0).sqrt()
    d = torch.where(norms > 0, factor_norm / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
    return _c_or_inf(_quad(H, v).sqrt(), _quad(H, d).sqrt(), scaling)


def objective(H: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """vᵀ H v − 2 λᵀ v over the trailing dims (batched): ``s²·(L²·‖G/L − η s²(…)‖² − ‖G‖²)`` of docs/scalora.md."""
    return (v.unsqueeze(-2) @ H @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1) - 2.0 * (lam * v).sum(-1)


def v_from_scales(scale_B: Tensor, scale_A: Tensor, scaling: float | Tensor, c: float | Tensor) -> Tensor:
    """v = c s² [α²; β²] (…, 2r): the variable of the quadratic for the scales α = `scale_B` of the columns of
    ``lora_B`` and β = `scale_A` of the rows of ``lora_A``."""
    cs2 = _cs2(c, scaling, scale_B)
    return cs2 * torch.cat([scale_B.square(), scale_A.square()], dim=-1)


def scales_from_v(
    v: Tensor, scaling: float | Tensor, c: float | Tensor, power: int = 2
) -> tuple[Tensor, Tensor]:
    """The scales from v (…, 2r) ≥ 0: [α; β] = (v / (c s²))^(1/power) (the inverse of :func:`v_from_scales`).

    ``power=2``: the paper's rule, whose variables are the squared scales; ``power=1``: the optimiser-aware rule
    for scale-invariant optimisers (Adam), whose step is linear in the scales. ``c`` may also be a tensor (…,).
    """
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    cs2 = _cs2(c, scaling, v)
    r = v.shape[-1] // 2
    w = v / cs2
    if power == 2:
        w = torch.sqrt(w)
    return w[..., :r], w[..., r:]


def first_order_c(H: Tensor, v: Tensor, second: Tensor, scaling: float | Tensor, lr: float | Tensor, tau: float
                  ) -> Tensor:
    """The largest c at which the next step stays first-order accurate: (n,) per layer, optimiser-aware rule.

    Under Adam the first-order change of W is −η s Σ_k u_k K_k with u = v / (c s²), of norm (η / (c s))·sqrt(vᵀHv);
    the second-order term s η² U_B U_A does not depend on the scales: its norm is s η² ‖U_B U_A‖_F = s η² sqrt(second).
    Smaller factors (larger c) hand more of the adapter to W0 each step, until the second-order term
    dominates. Holding its ratio to the first-order term at ``tau`` gives

        c = tau · sqrt(vᵀ H v) / (η s² ‖U_B U_A‖_F),

    so the factors keep the smallest size at which the step is still the one that was fitted. Layers where the
    bound says nothing (‖U_B U_A‖ = 0, e.g. B = 0 at the first step, or vᵀHv = 0) get c = inf: the caller maps
    them to the identity.
    """
    if not (0 < tau < float("inf")):
        raise ValueError(f"tau must be positive and finite, got {tau}")
    eta = lr if isinstance(lr, (int, float)) else lr.to(v.dtype)
    return _c_or_inf(tau * _quad(H, v).sqrt(), eta * second.to(v.dtype).clamp_min(0.0).sqrt(), scaling)

