"""Solving ScaLoRA's scaling problem (docs/scalora.md) for the scales, batched over layers of one shape, in torch.

The problem is the quadratic min over v ≥ 0 of vᵀ H v − 2 λᵀ v of :mod:`scalora.scaling_problem`, whose variable v
holds the scales of the columns of ``lora_B`` (the first r entries, α in the paper) and of the rows of ``lora_A``
(the last r, β). Per layer: the indices that cannot lower the objective are left out (:func:`degenerate_mask`); the
reduced system H_FF v_F = λ_F (the KKT point when it is positive) is solved by Cholesky with a minimum-norm
least-squares fallback (an eigendecomposition on the host, iterated Tikhonov regularisation on an accelerator, so
that nothing waits for the device); otherwise the 2-variable NNLS of one scale per factor is solved in closed form.
:func:`solve_scales` is the paper's rule from the factors and their gradients; :func:`solve_system` solves a given
system (the optimiser-aware one included, with c picked per layer by :func:`~scalora.scaling_problem.lora_step_c` or
:func:`~scalora.scaling_problem.first_order_c`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scalora.scaling_problem import (
    batch_inputs,
    compute_dtype,
    first_order_c,
    lora_step_c,
    on_device,
    scales_from_v,
    scaling_system,
)

__all__ = [
    "AUTO_RULES",
    "COLUMN",
    "DEFAULT_FACTOR_NORM",
    "DEFAULT_TAU",
    "IDENTITY",
    "MODES",
    "SCALAR",
    "Scales",
    "degenerate_mask",
    "solve_scales",
    "solve_system",
]

COLUMN, SCALAR, IDENTITY = 0, 1, 2
"""Values of :attr:`Scales.kind`: column solution, scalar fallback, identity (α = β = 1)."""

MODES = ("column", "scalar")
"""Values of ``mode``: per-column scales (scalar fallback), or one scale per factor."""

AUTO_RULES = ("lora-step", "first-order")
"""How c is chosen per layer and step when it is not a number: ``"lora-step"`` (:func:`lora_step_c`, the default:
LoRA's step size at the same learning rate) or ``"first-order"`` (:func:`first_order_c`: the smallest factors whose
step stays first-order accurate; the step then grows like η²)."""

DEFAULT_FACTOR_NORM = 3 ** -0.5
"""The factor norm ρ of ``c="lora-step"``: the norm of a row of LoRA's initial A (Kaiming-uniform, 1/√3)."""

DEFAULT_TAU = 0.3
"""The second- to first-order ratio of the next step that ``c="first-order"`` allows."""


@dataclass(frozen=True)
class Scales:
    """Per-layer ScaLoRA scales.

    scale_B: (n, r), α in the paper, multiplies the columns of ``lora_B`` (P); scale_A: (n, r), β in the paper,
    multiplies the rows of ``lora_A`` (Qᵀ). kind: (n,) int64, one of COLUMN (0), SCALAR (1), IDENTITY (2). For
    unbatched (2-D) inputs the leading n is absent.
    """

    scale_B: Tensor
    scale_A: Tensor
    kind: Tensor


def _per_layer(x: float | Tensor, n: int, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    """A positive float (checked) or a tensor broadcastable to (n,) (not checked: no host sync), as (n, 1)."""
    if isinstance(x, (int, float)) and not (0 < x < float("inf")):
        raise ValueError(f"{name} must be positive and finite, got {x}")
    return on_device(x, dtype, device).reshape(-1, 1).expand(n, 1)


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
    are solved again as minimum-norm least squares: by an eigendecomposition pseudo-inverse on the host (eigenvalues
    below 2r·10·ε_dtype·max eigenvalue dropped), by :func:`_regularised_solve` on an accelerator. Nothing here waits
    for the device: no factorisation whose error codes torch checks on the host (``cholesky_inverse``, ``eigh``) runs
    on an accelerator. Returns v (n, 2r) and a per-layer flag "residual small".
    """
    n, m = lam.shape
    dt = H.dtype
    eps_dt = torch.finfo(dt).eps
    fm = free.to(dt)
    Hr = H * fm.unsqueeze(-1) * fm.unsqueeze(-2) + torch.diag_embed(1.0 - fm)
    dinv = Hr.diagonal(dim1=-2, dim2=-1).rsqrt()
    Hs = Hr * dinv.unsqueeze(-1) * dinv.unsqueeze(-2)
    ls = lam * fm * dinv

    # two steps of iterative refinement after the first undo the ridge for all but the tiniest eigenvalues
    u, factored = _iterated_solve(Hs, ls, 1e-2 * eps_dt**0.5, steps=3)

    tol = eps_dt**0.5

    def residual_ok(u: Tensor) -> Tensor:
        res = (Hs @ u.unsqueeze(-1)).squeeze(-1) - ls
        return torch.isfinite(u).all(-1) & (res.norm(dim=-1) <= tol * ls.norm(dim=-1))

    bad = ~(factored & residual_ok(u))
    if _on_host(H):  # rare: (near-)singular H. The flags are in host memory: reading them costs nothing
        idx = bad.nonzero().squeeze(-1)
        if idx.numel():
            u = u.index_copy(0, idx, _pseudo_inverse_solve(Hs[idx], ls[idx]))
    else:  # on an accelerator, solve every layer both ways rather than wait for the flags
        u = torch.where(bad.unsqueeze(-1), _regularised_solve(Hs, ls), u)
    return u * dinv * fm, residual_ok(u)


def _on_host(t: Tensor) -> bool:
    """Whether `t` lives in host memory, where reading a flag back costs no wait for a device."""
    return t.device.type == "cpu"


def _iterated_solve(Hs: Tensor, ls: Tensor, ridge: float | Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """`steps` steps of u_{k+1} = u_k + (Hs + ridge·I)⁻¹ (ls − Hs u_k) from u₀ = 0 (batched; `ridge` a number or
    (n, 1, 1)), and a per-matrix flag "Hs + ridge·I factored".

    (Hs + ridge·I)⁻¹ = L⁻ᵀ L⁻¹ from its Cholesky factor L, with L⁻¹ from a triangular solve, which checks no error
    codes, where ``torch.cholesky_inverse`` checks them on the host (a wait for the device on an accelerator) and
    raises on a zero pivot. Where the factorisation failed, I stands in for L: u is then meaningless and the flag
    says so.
    """
    eye = torch.eye(Hs.shape[-1], dtype=Hs.dtype, device=Hs.device)
    L, info = torch.linalg.cholesky_ex(Hs + ridge * eye)
    factored = info == 0
    L = torch.where(factored.unsqueeze(-1).unsqueeze(-1), L, eye)
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    inv = L_inv.mT @ L_inv
    u = (inv @ ls.unsqueeze(-1)).squeeze(-1)
    for _ in range(steps - 1):
        u = u + (inv @ (ls - (Hs @ u.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)
    return u, factored


def _pseudo_inverse_solve(Hs: Tensor, ls: Tensor) -> Tensor:
    """The minimum-norm least-squares solution of Hs u = ls (batched, Hs symmetric): eigendecomposition, eigenvalues
    below 2r·10·ε_dtype·max eigenvalue dropped."""
    w, U = torch.linalg.eigh(Hs)
    cutoff = 10.0 * Hs.shape[-1] * torch.finfo(Hs.dtype).eps * w.amax(-1, keepdim=True).clamp_min(0.0)
    winv = torch.where(w > cutoff, 1.0 / w, torch.zeros_like(w))
    return (U @ (winv * (U.mT @ ls.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)


REGULARISED_ITERATIONS = 20
"""Steps of iterated Tikhonov regularisation in :func:`_regularised_solve`."""


def _regularised_solve(Hs: Tensor, ls: Tensor) -> Tensor:
    """The minimum-norm least-squares solution of Hs u = ls (batched, Hs symmetric PSD), without waiting for the
    device: iterated Tikhonov regularisation,

        u₀ = 0,   u_{k+1} = u_k + (Hs + δI)⁻¹ (ls − Hs u_k),   δ = sqrt(ε_dtype)·‖Hs‖_F.

    Along an eigenvector of Hs with eigenvalue w the error shrinks by δ / (w + δ) per step, so after k steps the
    components with w ≥ δ are solved (to 2⁻ᵏ or better) and those with w ≪ δ are left near 0: the pseudo-inverse
    solution with a soft cutoff at δ, which changes the objective by at most about δ·‖v‖². What rounding puts in
    ls outside Hs's range grows by k/δ, so δ is sqrt(ε) rather than :func:`_pseudo_inverse_solve`'s 2r·10·ε (relative
    to the largest eigenvalue): it keeps that growth at about k·sqrt(ε) of the solution. A matrix that Hs + δI does
    not make definite (not PSD up to rounding) gets u = 0.
    """
    delta = torch.finfo(Hs.dtype).eps ** 0.5 * torch.linalg.matrix_norm(Hs).unsqueeze(-1).unsqueeze(-1)
    u, factored = _iterated_solve(Hs, ls, delta, REGULARISED_ITERATIONS)
    return torch.where(factored.unsqueeze(-1), u, torch.zeros_like(u))


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
    norms: Tensor | None = None,
    factor_norm: float = DEFAULT_FACTOR_NORM,
) -> Scales:
    """Scales from a given system (H (n, 2r, 2r), λ (n, 2r)); see :func:`solve_scales` for the rules.

    ``power`` maps v to the scales (:func:`scales_from_v`). A string ``c`` picks c per layer (:data:`AUTO_RULES`):
    ``"lora-step"`` with :func:`lora_step_c` from ``norms`` (n, 2r), the factors' squared norms, and
    ``factor_norm``; ``"first-order"`` with :func:`first_order_c` from ``second`` (n,) = ‖dir_B dir_A‖²_F, the
    learning rate ``lr`` and ``tau``. A layer where c is undefined keeps the identity.
    """
    auto = isinstance(c, str)
    needs = {"lora-step": norms is not None, "first-order": second is not None and lr is not None}
    if auto and not needs.get(c, False):
        raise ValueError(f"c must be a positive number, 'lora-step' (with norms=) or 'first-order' (with second= "
                         f"and lr=), got {c!r}")
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

    if c == "lora-step":
        c_n = lora_step_c(H, v, norms.reshape(n, m), s, factor_norm)
    elif c == "first-order":
        c_n = first_order_c(H, v, second.reshape(n), s, lr, tau)
    else:
        c_n = _per_layer(c, n, dt, dev, "c").squeeze(-1)
    scale_B, scale_A = scales_from_v(v, s, c_n, power=power)
    ones = torch.ones_like(scale_B)
    scale_B = torch.where(deg[:, :r], ones, scale_B)
    scale_A = torch.where(deg[:, r:], ones, scale_A)
    ident = (~finite | ~any_free | ~torch.isfinite(c_n)
             | ~(torch.isfinite(scale_B).all(-1) & torch.isfinite(scale_A).all(-1)))
    scale_B = torch.where(ident[:, None], ones, scale_B)
    scale_A = torch.where(ident[:, None], ones, scale_A)
    kind = torch.full((n,), SCALAR, dtype=torch.int64, device=dev)
    kind = torch.where(col_ok, torch.full_like(kind, COLUMN), kind)
    kind = torch.where(ident, torch.full_like(kind, IDENTITY), kind)
    if not batched:
        return Scales(scale_B[0], scale_A[0], kind[0])
    return Scales(scale_B, scale_A, kind)


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

    α (``Scales.scale_B``) multiplies the columns of ``lora_B``, β (``Scales.scale_A``) the rows of ``lora_A``.
    """
    A, B, grad_A, grad_B, batched = batch_inputs(A, B, grad_A, grad_B)
    dt = compute_dtype(dtype, A, B, grad_A, grad_B)
    H, lam = scaling_system(A, B, grad_A, grad_B, dtype=dt)
    out = solve_system(H, lam, scaling, c, mode=mode, eps=eps)
    if not batched:
        return Scales(out.scale_B[0], out.scale_A[0], out.kind[0])
    return out
