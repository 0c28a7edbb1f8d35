"""The ScaLoRA scaling problem (docs/scalora.md), batched over layers of one shape, in pure torch.

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

Everything here is batched over a leading layer dimension n and costs O(n ((in + out) r² + r³)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "COLUMN",
    "DEFAULT_TAU",
    "IDENTITY",
    "MODES",
    "SCALAR",
    "Scales",
    "auto_c",
    "degenerate_mask",
    "objective",
    "optimizer_system",
    "scales_from_v",
    "scaling_system",
    "solve_scales",
    "solve_system",
    "v_from_scales",
]

COLUMN, SCALAR, IDENTITY = 0, 1, 2
"""Values of :attr:`Scales.kind`: column solution, scalar fallback, identity (α = β = 1)."""

MODES = ("column", "scalar")
"""Values of ``mode``: per-column scales (scalar fallback), or one scale per factor."""

DEFAULT_TAU = 0.3
"""The second- to first-order ratio of the next step that ``c="auto"`` allows (benchmarks/rank_decides.py)."""


@dataclass(frozen=True)
class Scales:
    """Per-layer ScaLoRA scales.

    alpha: (n, r) multiplies the columns of ``lora_B`` (P); beta: (n, r) multiplies the rows of ``lora_A`` (Qᵀ).
    kind: (n,) int64, one of COLUMN (0), SCALAR (1), IDENTITY (2). For unbatched (2-D) inputs the leading n is absent.
    """

    alpha: Tensor
    beta: Tensor
    kind: Tensor


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(dtype: torch.dtype | None, *tensors: Tensor) -> torch.dtype:
    if dtype is None:
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _batch(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
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


def _on_device(x: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`x` as a tensor of `dtype` on `device`. A Python number is filled in on the device (`torch.full`) rather than
    copied from the host, so a scaling step on an accelerator never waits for a host-to-device transfer."""
    if isinstance(x, Tensor):
        return x.to(dtype=dtype, device=device)
    return torch.full((), x, dtype=dtype, device=device)


def _cs2(c: float | Tensor, scaling: float | Tensor, like: Tensor) -> Tensor:
    """c s² in `like`'s dtype and device, with a trailing dim to broadcast over the 2r entries of v when batched."""
    cs2 = _on_device(c, like.dtype, like.device) * _on_device(scaling, like.dtype, like.device) ** 2
    return cs2.unsqueeze(-1) if cs2.dim() > 0 else cs2


def _per_layer(x: float | Tensor, n: int, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    """A positive float (checked) or a tensor broadcastable to (n,) (not checked: no host sync), as (n, 1)."""
    if isinstance(x, (int, float)) and not (0 < x < float("inf")):
        raise ValueError(f"{name} must be positive and finite, got {x}")
    return _on_device(x, dtype, device).reshape(-1, 1).expand(n, 1)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """H (n, 2r, 2r), λ (n, 2r) and ‖dir_B dir_A‖²_F (n,) of the optimiser-aware fit, from r × r Gram products only.

    A, grad_A, dir_A: (n, r, in); B, grad_B, dir_B: (n, out, r) (2-D inputs give unbatched results). The optimiser
    will move B by −η·dir_B and A by −η·dir_A; with seven batched r × r Gram products

        H = [ (BᵀB) ⊙ (dir_A dir_Aᵀ)        (Bᵀ dir_B) ⊙ (dir_A Aᵀ) ]     λ = [ rowdot(grad_A, dir_A) ;
            [ (dir_Bᵀ B) ⊙ (A dir_Aᵀ)   (dir_Bᵀ dir_B) ⊙ (A Aᵀ)     ]           coldot(grad_B, dir_B) ],

    and ‖dir_B dir_A‖²_F = Σ (dir_Bᵀ dir_B) ⊙ (dir_A dir_Aᵀ), the size of the second-order term s η² dir_B dir_A.
    Cost O(n (in + out) r²); never an out × in matrix. H is symmetrised, ½(H + Hᵀ). Computed in ``dtype``: float64
    if any input is float64, else float32 (bf16 / fp16 inputs are upcast).
    """
    A, B, grad_A, grad_B, batched = _batch(A, B, grad_A, grad_B)
    dir_A, dir_B, _, _, _ = _batch(dir_A, dir_B, dir_A, dir_B)
    if dir_A.shape != A.shape or dir_B.shape != B.shape:
        raise ValueError(f"direction shapes {tuple(dir_A.shape)}, {tuple(dir_B.shape)} differ from "
                         f"parameter shapes {tuple(A.shape)}, {tuple(B.shape)}")
    dt = _compute_dtype(dtype, A, B, grad_A, grad_B, dir_A, dir_B)
    A, B, grad_A, grad_B = A.to(dt), B.to(dt), grad_A.to(dt), grad_B.to(dt)
    dir_A, dir_B = dir_A.to(dt), dir_B.to(dt)
    BB, BuB, uBuB = B.mT @ B, B.mT @ dir_B, dir_B.mT @ dir_B
    AA, AuA, uAuA = A @ A.mT, A @ dir_A.mT, dir_A @ dir_A.mT
    H12 = BuB * AuA.mT
    H = torch.cat([torch.cat([BB * uAuA, H12], dim=-1), torch.cat([H12.mT, uBuB * AA], dim=-1)], dim=-2)
    H = 0.5 * (H + H.mT)
    lam = torch.cat([(grad_A * dir_A).sum(-1), (grad_B * dir_B).sum(-2)], dim=-1)
    second = (uBuB * uAuA).sum((-2, -1))
    if not batched:
        return H[0], lam[0], second[0]
    return H, lam, second


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
    H, lam, _ = optimizer_system(A, B, grad_A, grad_B, grad_A, grad_B, dtype=dtype)
    return H, lam


def objective(H: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """vᵀ H v − 2 λᵀ v over the trailing dims (batched): ``s²·(L²·‖G/L − η s²(…)‖² − ‖G‖²)`` of docs/scalora.md."""
    return (v.unsqueeze(-2) @ H @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1) - 2.0 * (lam * v).sum(-1)


def v_from_scales(alpha: Tensor, beta: Tensor, scaling: float | Tensor, c: float | Tensor) -> Tensor:
    """v = c s² [α²; β²] (…, 2r): the variable of the quadratic for given scales."""
    cs2 = _cs2(c, scaling, alpha)
    return cs2 * torch.cat([alpha.square(), beta.square()], dim=-1)


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


def auto_c(H: Tensor, v: Tensor, second: Tensor, scaling: float | Tensor, lr: float | Tensor, tau: float) -> Tensor:
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
    dt = v.dtype
    first = (v.unsqueeze(-2) @ H @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1).clamp_min(0.0).sqrt()
    s2 = scaling**2 if isinstance(scaling, (int, float)) else scaling.to(dt).square()
    eta = lr if isinstance(lr, (int, float)) else lr.to(dt)
    denom = second.to(dt).clamp_min(0.0).sqrt() * s2 * eta
    ok = (denom > 0) & (first > 0)
    inf = torch.full_like(first, float("inf"))
    return torch.where(ok, tau * first / torch.where(ok, denom, torch.ones_like(denom)), inf)


def degenerate_mask(H: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """(n, 2r) bool: the indices left out of the system (their scale stays 1), per layer.

    Index i is degenerate when H_ii or λ_i is zero (or below the dtype's smallest normal number), or when
    λ_i² / H_ii ≤ eps · max_j λ_j² / H_jj. Here λ_i² / H_ii = s²·⟨G, K_i⟩² / ‖K_i‖² is the reduction of the objective
    that index i alone can achieve (K_i the rank-one term it scales; for true gradients it equals ‖g_Q,i‖² / ‖p_i‖²
    for the α block and ‖g_P,j‖² / ‖q_j‖² for the β block). Unlike a threshold on H_ii itself, this is invariant to
    the rebalancing (P t, Q / t), which multiplies H's α block by t⁴ and its β block by t⁻⁴: at B ≈ 0 early in
    training the α block is legitimately tiny, not degenerate. At init B = 0 makes the α rows of H and λ exactly
    zero; those are degenerate. Since H ⪰ 0, |H_ij| ≤ sqrt(H_ii H_jj), so a zero diagonal entry means a zero row.
    """
    d = H.diagonal(dim1=-2, dim2=-1)
    finfo = torch.finfo(H.dtype)
    nonzero = (d > finfo.tiny) & (lam > finfo.tiny)
    score = torch.where(nonzero, lam * (lam / torch.where(nonzero, d, torch.ones_like(d))), torch.zeros_like(d))
    score = score.clamp_max(finfo.max)  # an infinite ratio would otherwise make every other index "degenerate"
    return ~nonzero | (score <= eps * score.amax(-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------------------
# solvers


def _column_solve(H: Tensor, lam: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the reduced system H_FF v_F = λ_F (F = free indices); degenerate entries of v are 0.

    Degenerate rows/columns are replaced by identity rows with target 0, then the system is Jacobi-scaled
    (D H D with D = diag(H)^(-1/2), unit diagonal) and solved by Cholesky with a ridge of 1e-2·sqrt(ε_dtype), followed
    by two steps of iterative refinement against the unridged matrix.
    Layers where the factorisation fails or the residual ‖H v − λ‖ exceeds sqrt(ε_dtype)·‖λ‖ (in the scaled system)
    are re-solved with an eigendecomposition pseudo-inverse (minimum-norm least squares, eigenvalues below
    2r·10·ε_dtype·max eigenvalue dropped). Returns v (n, 2r) and a per-layer flag "residual small".
    """
    n, m = lam.shape
    dt = H.dtype
    eps_dt = torch.finfo(dt).eps
    fm = free.to(dt)
    eye = torch.eye(m, dtype=dt, device=H.device)
    Hr = H * fm.unsqueeze(-1) * fm.unsqueeze(-2) + torch.diag_embed(1.0 - fm)
    dinv = Hr.diagonal(dim1=-2, dim2=-1).rsqrt()
    Hs = Hr * dinv.unsqueeze(-1) * dinv.unsqueeze(-2)
    ls = lam * fm * dinv

    ridge = 1e-2 * eps_dt**0.5
    L, info = torch.linalg.cholesky_ex(Hs + ridge * eye)
    inv = torch.cholesky_inverse(L)  # (Hs + ridge·I)⁻¹; garbage where info ≠ 0, caught below
    u = (inv @ ls.unsqueeze(-1)).squeeze(-1)
    for _ in range(2):  # iterative refinement undoes the ridge for all but the tiniest eigenvalues
        res = ls - (Hs @ u.unsqueeze(-1)).squeeze(-1)
        u = u + (inv @ res.unsqueeze(-1)).squeeze(-1)

    tol = eps_dt**0.5

    def residual_ok(u: Tensor) -> Tensor:
        res = (Hs @ u.unsqueeze(-1)).squeeze(-1) - ls
        return torch.isfinite(u).all(-1) & (res.norm(dim=-1) <= tol * ls.norm(dim=-1))

    bad = ~((info == 0) & residual_ok(u))
    if H.device.type == "cpu":  # rare: (near-)singular H. The flags are in host memory: reading them costs nothing
        idx = bad.nonzero().squeeze(-1)
        if idx.numel():
            u = u.index_copy(0, idx, _pseudo_inverse_solve(Hs[idx], ls[idx]))
    else:  # on an accelerator, solve every layer both ways rather than wait for the flags
        u = torch.where(bad.unsqueeze(-1), _pseudo_inverse_solve(Hs, ls), u)
    return u * dinv * fm, residual_ok(u)


def _pseudo_inverse_solve(Hs: Tensor, ls: Tensor) -> Tensor:
    """The minimum-norm least-squares solution of Hs u = ls (batched, Hs symmetric): eigendecomposition, eigenvalues
    below 2r·10·ε_dtype·max eigenvalue dropped."""
    w, U = torch.linalg.eigh(Hs)
    cutoff = 10.0 * Hs.shape[-1] * torch.finfo(Hs.dtype).eps * w.amax(-1, keepdim=True).clamp_min(0.0)
    winv = torch.where(w > cutoff, 1.0 / w, torch.zeros_like(w))
    return (U @ (winv * (U.mT @ ls.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)


def _scalar_solve(H: Tensor, lam: Tensor, free: Tensor) -> Tensor:
    """Scalar scaling: one scale per block. With E = blockdiag(1_r, 1_r) restricted to the free indices,
    minimise wᵀ H_s w − 2 λ_sᵀ w over w ≥ 0 (H_s = EᵀHE, λ_s = Eᵀλ, 2 × 2), in closed form:
    the unconstrained solution when it is ≥ 0 (and H_s is non-singular), else the better of the two one-variable
    solutions w_k = λ_s,k / H_s,kk (objective −λ_s,k² / H_s,kk). A block with no free index is fixed (w = 0 here,
    scale 1 later) and the problem is 1-D. Returns w broadcast back to (n, 2r) on the free indices (0 elsewhere);
    entries are non-finite when the scalar problem is unbounded (caller maps that to identity).
    """
    n, m = lam.shape
    r = m // 2
    dt = H.dtype
    eps_dt = torch.finfo(dt).eps
    fm = free.to(dt)
    Hm = H * fm.unsqueeze(-1) * fm.unsqueeze(-2)
    Hs = Hm.reshape(n, 2, r, 2, r).sum(dim=(2, 4))  # (n, 2, 2)
    ls = (lam * fm).reshape(n, 2, r).sum(-1)  # (n, 2)
    active = free.reshape(n, 2, r).any(-1)  # (n, 2)
    # inactive block: identity row, zero target
    act = active.to(dt)
    Hs = Hs * act.unsqueeze(-1) * act.unsqueeze(-2) + torch.diag_embed(1.0 - act)
    ls = ls * act

    a, b, d = Hs[:, 0, 0], Hs[:, 0, 1], Hs[:, 1, 1]
    l0, l1 = ls[:, 0], ls[:, 1]
    # a diagonal that is ~0 relative to the block's own trace means the 1-D problem is unbounded (or void)
    tr0 = (Hm.diagonal(dim1=-2, dim2=-1)[:, :r]).sum(-1)
    tr1 = (Hm.diagonal(dim1=-2, dim2=-1)[:, r:]).sum(-1)
    nan = torch.full_like(a, float("nan"))
    a = torch.where(active[:, 0] & (a <= m * eps_dt * tr0), nan, a)
    d = torch.where(active[:, 1] & (d <= m * eps_dt * tr1), nan, d)

    det = a * d - b * b
    x0 = (d * l0 - b * l1) / det
    x1 = (a * l1 - b * l0) / det
    unc_ok = (det > 10.0 * eps_dt * a * d) & (x0 >= 0) & (x1 >= 0)
    y0 = l0.clamp_min(0) / a
    y1 = l1.clamp_min(0) / d
    f0 = -l0.clamp_min(0).square() / a
    f1 = -l1.clamp_min(0).square() / d
    pick0 = f0 <= f1
    zero = torch.zeros_like(a)
    w0 = torch.where(unc_ok, x0, torch.where(pick0, y0, zero))
    w1 = torch.where(unc_ok, x1, torch.where(pick0, zero, y1))
    # if either diagonal was flagged (NaN), the comparison above is False: propagate non-finiteness explicitly
    bad = torch.isnan(a) | torch.isnan(d)
    w0 = torch.where(bad, nan, w0)
    w1 = torch.where(bad, nan, w1)
    w = torch.stack([w0, w1], dim=-1)  # (n, 2)
    return w.repeat_interleave(r, dim=-1) * fm


def solve_system(
    H: Tensor,
    lam: Tensor,
    scaling: float | Tensor,
    c: float | Tensor | str,
    mode: str = "column",
    eps: float = 1e-6,
    *,
    power: int = 2,
    second: Tensor | None = None,
    lr: float | Tensor | None = None,
    tau: float = DEFAULT_TAU,
) -> Scales:
    """Scales from a given system (H (n, 2r, 2r), λ (n, 2r)); see :func:`solve_scales` for the rules.

    ``power`` maps v to the scales (:func:`scales_from_v`). ``c="auto"`` picks c per layer with :func:`auto_c`
    from ``second`` (n,) = ‖dir_B dir_A‖²_F, the learning rate ``lr`` and ``tau``; a layer where it is undefined
    keeps the identity.
    """
    auto = isinstance(c, str)
    if auto and (c != "auto" or second is None or lr is None):
        raise ValueError(f"c must be a positive number or 'auto' (with second= and lr=), got {c!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    batched = H.dim() == 3
    if not batched:
        H, lam = H.unsqueeze(0), lam.unsqueeze(0)
    if H.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"H must be float32 or float64, got {H.dtype}")
    n, m = lam.shape
    if m % 2 or H.shape != (n, m, m):
        raise ValueError(f"H {tuple(H.shape)} and λ {tuple(lam.shape)} are not (n, 2r, 2r) and (n, 2r)")
    r = m // 2
    dt, dev = H.dtype, H.device
    s = _per_layer(scaling, n, dt, dev, "scaling").squeeze(-1)

    finite = torch.isfinite(H).all(-1).all(-1) & torch.isfinite(lam).all(-1)
    eye = torch.eye(m, dtype=dt, device=dev)
    H = torch.where(finite[:, None, None], H, eye)
    lam = torch.where(finite[:, None], lam, torch.zeros_like(lam))

    deg = degenerate_mask(H, lam, eps) | ~finite[:, None]
    free = ~deg
    any_free = free.any(-1)

    v_s = _scalar_solve(H, lam, free)
    if mode == "column":
        v_c, res_ok = _column_solve(H, lam, free)
        col_ok = res_ok & any_free & torch.isfinite(v_c).all(-1) & ((v_c > 0) | deg).all(-1)
        v = torch.where(col_ok[:, None], v_c, v_s)
    else:
        col_ok = torch.zeros(n, dtype=torch.bool, device=dev)
        v = v_s

    c_n = auto_c(H, v, second.reshape(n), s, lr, tau) if auto else _per_layer(c, n, dt, dev, "c").squeeze(-1)
    alpha, beta = scales_from_v(v, s, c_n, power=power)
    ones = torch.ones_like(alpha)
    alpha = torch.where(deg[:, :r], ones, alpha)
    beta = torch.where(deg[:, r:], ones, beta)
    ident = ~finite | ~any_free | ~torch.isfinite(c_n) | ~(torch.isfinite(alpha).all(-1) & torch.isfinite(beta).all(-1))
    alpha = torch.where(ident[:, None], ones, alpha)
    beta = torch.where(ident[:, None], ones, beta)
    kind = torch.full((n,), SCALAR, dtype=torch.int64, device=dev)
    kind = torch.where(col_ok, torch.full_like(kind, COLUMN), kind)
    kind = torch.where(ident, torch.full_like(kind, IDENTITY), kind)
    if not batched:
        return Scales(alpha[0], beta[0], kind[0])
    return Scales(alpha, beta, kind)


def solve_scales(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scaling: float | Tensor,
    c: float | Tensor,
    mode: str = "column",
    eps: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> Scales:
    """ScaLoRA scales for a batch of n LoRA layers of one shape (docs/scalora.md).

    A = lora_A, grad_A: (n, r, in); B = lora_B, grad_B: (n, out, r) (or 2-D, unbatched: then the result is too).
    ``scaling`` is the LoRA scale s, ``c = L·η`` the hyperparameter; either a float or a tensor of n values.
    Computed in ``dtype`` (float32 or float64; default: float64 if any input is float64, else float32, so bf16 and
    fp16 inputs are upcast); the scales come back in that dtype. Never forms an out × in matrix.

    Steps, per layer (all batched):
      1. H, λ from :func:`scaling_system`. A layer with non-finite inputs gets the identity (kind IDENTITY).
      2. Indices with H_ii = 0, λ_i = 0 or λ_i²/H_ii ≤ eps·max_j λ_j²/H_jj are degenerate (:func:`degenerate_mask`):
         their scale is 1 and they are left out. No free index at all → identity.
      3. ``mode="column"``: solve the reduced system H_FF v_F = λ_F (Jacobi-scaled Cholesky with a tiny ridge, an
         eigendecomposition pseudo-inverse where that fails or leaves a residual). If the solution is finite, strictly
         positive and solves the system, it is the NNLS optimum: kind COLUMN. (When H_FF is singular the solve
         returns a near-minimum-norm solution in the Jacobi-scaled variables; if that one is not positive the layer
         falls back to step 4 even if another, positive, solution exists.)
      4. Otherwise (or ``mode="scalar"``), scalar scaling: one scale per block on the free indices, the exact
         2-variable NNLS of EᵀHE, Eᵀλ in closed form: kind SCALAR. Scales may be exactly 0 there (a negative
         unconstrained entry means that scale is 0).
      5. α = sqrt(v[:r] / (c s²)), β = sqrt(v[r:] / (c s²)); degenerate indices 1. Any non-finite result → identity.

    α multiplies the columns of ``lora_B``, β the rows of ``lora_A``.
    """
    A, B, grad_A, grad_B, batched = _batch(A, B, grad_A, grad_B)
    dt = _compute_dtype(dtype, A, B, grad_A, grad_B)
    H, lam = scaling_system(A, B, grad_A, grad_B, dtype=dt)
    out = solve_system(H, lam, scaling, c, mode=mode, eps=eps)
    if not batched:
        return Scales(out.alpha[0], out.beta[0], out.kind[0])
    return out
