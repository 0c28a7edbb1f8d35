"""Tests of the ScaLoRA solver (docs/scalora.md) against brute-force constructions in float64.

The brute force builds the out × in matrices the solver avoids: with G = ∂ℓ/∂W and the bilinear loss
ℓ = ⟨G, s·B·A⟩ (whose autograd gradients are grad_B = s G Aᵀ, grad_A = s Bᵀ G),

    M_i = p_i (Gᵀ p_i)ᵀ,   N_j = (G q_j) q_jᵀ,   η s² (G Q̃Q̃ᵀ + P̃P̃ᵀ G) = (1/L) Σ_k v_k K_k,   K = [M; N],

so ‖G/L − η s² (…)‖² = ‖G − Σ_k v_k K_k‖² / L² with v = c s² [α²; β²], and the optimum over v ≥ 0 is an explicit
non-negative least-squares problem that scipy solves without ever seeing H or λ.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import nnls
from torch import Tensor

import scalora.solver as solver_module
from scalora.scaling_problem import objective, scales_from_v, scaling_system, v_from_scales
from scalora.solver import (
    COLUMN,
    IDENTITY,
    SCALAR,
    Scales,
    degenerate_mask,
    solve_scales,
    solve_system,
)

F64 = torch.float64


def _layer(
    r: int,
    n_in: int,
    n_out: int,
    s: float,
    *,
    rank_g: int | None = None,
    zero_b: bool = False,
    dup: bool = False,
    gen: torch.Generator,
) -> tuple[torch.Tensor, ...]:
    """One layer (A, B, grad_A, grad_B, G) in float64, gradients by autograd of ℓ = ⟨G, s·B·A⟩."""
    A = torch.randn(r, n_in, dtype=F64, generator=gen) / math.sqrt(n_in)
    B = torch.zeros(n_out, r, dtype=F64) if zero_b else torch.randn(n_out, r, dtype=F64, generator=gen)
    if dup and r >= 2:  # two identical rank-one terms: H exactly singular
        A[1] = A[0]
        B[:, 1] = B[:, 0]
    if rank_g is None:
        G = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    else:
        G = torch.randn(n_out, rank_g, dtype=F64, generator=gen) @ torch.randn(rank_g, n_in, dtype=F64, generator=gen)
    A.requires_grad_(True)
    B.requires_grad_(True)
    loss = (G * (s * B @ A)).sum()
    grad_A, grad_B = torch.autograd.grad(loss, (A, B))
    return A.detach(), B.detach(), grad_A, grad_B, G


def _terms(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """K (2r, out, in): M_i = p_i (Gᵀp_i)ᵀ for i < r, then N_j = (G q_j) q_jᵀ (explicit out × in matrices)."""
    P, Q = B, A.T
    M = [torch.outer(P[:, i], G.T @ P[:, i]) for i in range(P.shape[1])]
    N = [torch.outer(G @ Q[:, j], Q[:, j]) for j in range(Q.shape[1])]
    return torch.stack(M + N)


def _frobenius(A, B, G, scale_B, scale_A, s, L, eta) -> float:
    """‖G/L − η s² (G Q̃Q̃ᵀ + P̃P̃ᵀ G)‖²_F, written out with the rescaled PEFT factors."""
    B_t = B * scale_B  # columns of lora_B by α
    A_t = A * scale_A[:, None]  # rows of lora_A by β
    P_t, Q_t = B_t, A_t.T
    X = G @ Q_t @ Q_t.T + P_t @ P_t.T @ G
    return float(((G / L - eta * s**2 * X) ** 2).sum())


def _nnls_reduction(K: torch.Tensor, G: torch.Tensor) -> tuple[float, torch.Tensor]:
    """max over w ≥ 0 of ‖G‖² − ‖G − Σ w_k K_k‖² (explicit NNLS on vec(K_k)), and the arg max.

    With the thin QR vec(K) = Q R: ‖vec(K) w − g‖² = ‖R w − Qᵀg‖² + ‖g‖² − ‖Qᵀg‖², an exact identity that shrinks
    the NNLS to 2r rows (R may be singular; NNLS does not mind).
    """
    mat = K.reshape(K.shape[0], -1).T
    g = G.reshape(-1)
    Qm, R = torch.linalg.qr(mat)
    target = Qm.T @ g
    w, _ = nnls(R.numpy(), target.numpy(), maxiter=50 * R.shape[1])
    w = torch.from_numpy(w)
    return float(target @ target - ((R @ w - target) ** 2).sum()), w


def _reduction(K: torch.Tensor, G: torch.Tensor, w: torch.Tensor) -> float:
    resid = G - torch.einsum("k,kij->ij", w, K)
    return float((G**2).sum() - (resid**2).sum())


# ----------------------------------------------------------------------------------------------------------------------
# the system and its constants


@pytest.mark.parametrize("r,n_in,n_out", [(1, 5, 3), (3, 7, 11), (4, 20, 9)])
def test_system_equals_bruteforce_gram(r, n_in, n_out):
    gen = torch.Generator().manual_seed(r * 100 + n_in)
    s = 0.7
    A, B, gA, gB, G = _layer(r, n_in, n_out, s, gen=gen)
    H, lam = scaling_system(A, B, gA, gB)
    assert H.dtype == F64 and H.shape == (2 * r, 2 * r) and lam.shape == (2 * r,)
    K = _terms(A, B, G)
    flat = K.reshape(2 * r, -1)
    H_brute = s**2 * flat @ flat.T
    lam_brute = s**2 * flat @ G.reshape(-1)
    torch.testing.assert_close(H, H_brute, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lam, lam_brute, rtol=1e-10, atol=1e-12)
    # the METHODS block formulas, term by term (P = B, Q = Aᵀ, g_P = grad_B, g_Q = grad_Aᵀ)
    P, Q, gP, gQ = B, A.T, gB, gA.T
    H_methods = torch.cat(
        [
            torch.cat([(P.T @ P) * (gQ.T @ gQ), (P.T @ gP) * (gQ.T @ Q)], dim=1),
            torch.cat([(gP.T @ P) * (Q.T @ gQ), (gP.T @ gP) * (Q.T @ Q)], dim=1),
        ]
    )
    torch.testing.assert_close(H, H_methods, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam, torch.cat([(gQ**2).sum(0), (gP**2).sum(0)]), rtol=1e-12, atol=1e-12)
    # H ⪰ 0 and, for true gradients, λ ∈ range(H)
    assert torch.linalg.eigvalsh(H).min() >= -1e-10 * H.diagonal().max()
    v = torch.linalg.lstsq(H, lam.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    assert (H @ v - lam).norm() <= 1e-8 * lam.norm()


@pytest.mark.parametrize("seed", range(4))
def test_objective_constants_match_frobenius(seed):
    """L²‖G/L − η s²(G Q̃Q̃ᵀ + P̃P̃ᵀG)‖² = ‖G‖² + (vᵀHv − 2λᵀv)/s²  with  v = L η s² [α²; β²]."""
    gen = torch.Generator().manual_seed(seed)
    r, n_in, n_out = 1 + seed, 6 + 3 * seed, 13 - seed
    s, L, eta = [(0.5, 3.0, 0.2), (2.0, 0.7, 0.05), (1 / math.sqrt(3), 10.0, 1e-3), (1.3, 1.0, 1.0)][seed]
    A, B, gA, gB, G = _layer(r, n_in, n_out, s, rank_g=None if seed % 2 else 2, gen=gen)
    H, lam = scaling_system(A, B, gA, gB)
    for _ in range(3):
        scale_B = torch.rand(r, dtype=F64, generator=gen) * 3
        scale_A = torch.rand(r, dtype=F64, generator=gen) * 3
        lhs = L**2 * _frobenius(A, B, G, scale_B, scale_A, s, L, eta)
        v = v_from_scales(scale_B, scale_A, s, L * eta)
        rhs = float((G**2).sum() + objective(H, lam, v) / s**2)
        assert lhs == pytest.approx(rhs, rel=1e-10)


def test_first_order_step_in_peft_layout():
    """One exact SGD step from (B·diag(α), diag(β)·A) changes W by −η s²(G Q̃Q̃ᵀ + P̃P̃ᵀG) + η² s³ G Q̃ P̃ᵀ G."""
    gen = torch.Generator().manual_seed(7)
    r, n_in, n_out, s, eta = 3, 8, 5, 0.8, 0.03
    A, B, _, _, G = _layer(r, n_in, n_out, s, gen=gen)
    scale_B = torch.rand(r, dtype=F64, generator=gen) + 0.5
    scale_A = torch.rand(r, dtype=F64, generator=gen) + 0.5
    B_t = (B * scale_B).requires_grad_(True)
    A_t = (A * scale_A[:, None]).requires_grad_(True)
    gA_t, gB_t = torch.autograd.grad((G * (s * B_t @ A_t)).sum(), (A_t, B_t))
    dW = s * (B_t - eta * gB_t) @ (A_t - eta * gA_t) - s * B_t @ A_t
    P_t, Q_t = B_t.detach(), A_t.detach().T
    predicted = -eta * s**2 * (G @ Q_t @ Q_t.T + P_t @ P_t.T @ G) + eta**2 * s**3 * G @ Q_t @ P_t.T @ G
    torch.testing.assert_close(dW.detach(), predicted, rtol=1e-10, atol=1e-12)


def test_v_scale_maps():
    s, c = 0.25, 3e-3
    v = torch.full((3, 8), c * s**2, dtype=F64)
    scale_B, scale_A = scales_from_v(v, s, c)
    torch.testing.assert_close(scale_B, torch.ones(3, 4, dtype=F64), rtol=1e-14, atol=0)
    torch.testing.assert_close(scale_A, torch.ones(3, 4, dtype=F64), rtol=1e-14, atol=0)
    a, b = torch.rand(2, 5, dtype=F64), torch.rand(2, 5, dtype=F64)
    a2, b2 = scales_from_v(v_from_scales(a, b, s, c), s, c)
    torch.testing.assert_close((a2, b2), (a, b), rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------------
# optimality against explicit NNLS


def _cases():
    shapes = [(1, 3, 5), (1, 40, 17), (2, 9, 4), (2, 60, 130), (4, 25, 12), (4, 200, 150), (8, 30, 70), (8, 5, 3)]
    out = []
    for i, (r, n_in, n_out) in enumerate(shapes):
        for variant in ("full", "rank1", "rank2", "zero_b", "dup"):
            out.append(pytest.param(r, n_in, n_out, variant, i, id=f"r{r}-{n_in}x{n_out}-{variant}"))
    return out


@pytest.mark.parametrize("r,n_in,n_out,variant,seed", _cases())
def test_solver_matches_bruteforce_nnls(r, n_in, n_out, variant, seed):
    gen = torch.Generator().manual_seed(1000 + seed * 10 + len(variant))
    s, c = 1.0 / math.sqrt(r), 0.37
    n = 3
    layers = [
        _layer(
            r,
            n_in,
            n_out,
            s,
            rank_g={"rank1": 1, "rank2": 2}.get(variant),
            zero_b=variant == "zero_b",
            dup=variant == "dup",
            gen=gen,
        )
        for _ in range(n)
    ]
    A, B, gA, gB = (torch.stack([lay[k] for lay in layers]) for k in range(4))
    sc = solve_scales(A, B, gA, gB, s, c)
    H, lam = scaling_system(A, B, gA, gB)
    deg = degenerate_mask(H, lam)
    assert sc.scale_B.dtype == F64 and sc.scale_B.shape == (n, r) and sc.kind.shape == (n,)
    for k in range(n):
        Ak, Bk, _, _, G = layers[k]
        scale_B, scale_A, kind = sc.scale_B[k], sc.scale_A[k], int(sc.kind[k])
        assert torch.isfinite(scale_B).all() and torch.isfinite(scale_A).all()
        assert (scale_B >= 0).all() and (scale_A >= 0).all()
        if variant == "zero_b":
            assert deg[k, :r].all() and (scale_B == 1).all()
        assert kind in (COLUMN, SCALAR)
        free = ~deg[k]
        K = _terms(Ak, Bk, G)
        # explicit column optimum over all 2r indices (degenerate ones have K_i ≈ 0 or λ_i ≈ 0)
        best, w_best = _nnls_reduction(K, G)
        v = v_from_scales(scale_B, scale_A, s, c)
        w_solver = torch.where(free, v, torch.zeros_like(v))
        got = _reduction(K, G, w_solver)
        # the two forms of the objective agree for the solver's point
        assert got == pytest.approx(-float(objective(H[k], lam[k], w_solver)) / s**2, rel=1e-9, abs=1e-12)
        tol = 1e-8 * max(best, 1e-300) + 1e-12
        assert got <= best + tol, "solver beat the constrained optimum: the objective or the brute force is wrong"
        if kind == COLUMN:
            assert got >= best - tol
            assert (v[free] > 0).all()
        else:
            # scalar fallback: one scale per block on the free indices, optimal among such
            for blk, scale in ((0, scale_B), (1, scale_A)):
                f = free[blk * r : (blk + 1) * r]
                if f.any():
                    assert torch.allclose(scale[f], scale[f][0].expand(int(f.sum())), rtol=1e-12, atol=0)
            Ks = torch.stack([(K[:r][free[:r]]).sum(0), (K[r:][free[r:]]).sum(0)])
            best_s, _ = _nnls_reduction(Ks, G)
            assert got == pytest.approx(best_s, rel=1e-8, abs=1e-12)
            assert best_s <= best + tol
            # and the fallback was needed: for a well-conditioned reduced H the constrained optimum touches v = 0
            Hf = H[k][free][:, free]
            if torch.linalg.cond(Hf) < 1e8:
                assert (w_best[free] <= 1e-9 * w_best.max()).any()


def test_true_gradient_layers_give_both_kinds():
    """Rank-one gradients make negative column solutions common: the fallback is reachable from real layers."""
    s = 0.5
    A, B, gA, gB = _batch(24, 8, 100, 80, s, seed=17, rank_g=1)
    kinds = solve_scales(A, B, gA, gB, s, 1.0).kind
    assert (kinds == COLUMN).any() and (kinds == SCALAR).any() and not (kinds == IDENTITY).any()


@pytest.mark.parametrize("variant", ["full", "rank1", "zero_b"])
def test_scalar_mode_matches_bruteforce(variant):
    gen = torch.Generator().manual_seed(11)
    r, n_in, n_out, s, c = 4, 30, 22, 2.0, 0.01
    A, B, gA, gB, G = _layer(
        r, n_in, n_out, s, rank_g=1 if variant == "rank1" else None, zero_b=variant == "zero_b", gen=gen
    )
    sc = solve_scales(A, B, gA, gB, s, c, mode="scalar")
    assert int(sc.kind) == SCALAR
    H, lam = scaling_system(A, B, gA, gB)
    free = ~degenerate_mask(H, lam)
    K = _terms(A, B, G)
    Ks = torch.stack([K[:r][free[:r]].sum(0), K[r:][free[r:]].sum(0)])
    best_s, _ = _nnls_reduction(Ks, G)
    v = v_from_scales(sc.scale_B, sc.scale_A, s, c)
    assert _reduction(K, G, torch.where(free, v, torch.zeros_like(v))) == pytest.approx(best_s, rel=1e-8, abs=1e-12)
    if variant == "zero_b":
        assert (sc.scale_B == 1).all()
    # column mode is never worse than scalar mode
    col = solve_scales(A, B, gA, gB, s, c)
    vc = v_from_scales(col.scale_B, col.scale_A, s, c)
    assert objective(H, lam, torch.where(free, vc, 0 * vc)) <= objective(H, lam, torch.where(free, v, 0 * v)) + 1e-12


def test_explicit_frobenius_value_of_solution():
    """The scales, applied to lora_B's columns and lora_A's rows, give the optimal explicit Frobenius objective."""
    gen = torch.Generator().manual_seed(5)
    r, n_in, n_out, s, L, eta = 2, 12, 9, 0.5, 4.0, 0.1
    A, B, gA, gB, G = _layer(r, n_in, n_out, s, gen=gen)
    sc = solve_scales(A, B, gA, gB, s, L * eta)
    best, _ = _nnls_reduction(_terms(A, B, G), G)
    val = _frobenius(A, B, G, sc.scale_B, sc.scale_A, s, L, eta)
    assert val == pytest.approx((float((G**2).sum()) - best) / L**2, rel=1e-9)
    assert val < _frobenius(A, B, G, torch.ones(r, dtype=F64), torch.ones(r, dtype=F64), s, L, eta)


# ----------------------------------------------------------------------------------------------------------------------
# batching, dtypes, robustness


def _batch(n, r, n_in, n_out, s, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    layers = [_layer(r, n_in, n_out, s, gen=gen, **kw) for _ in range(n)]
    return tuple(torch.stack([lay[k] for lay in layers]) for k in range(4))


def test_batched_equals_per_layer():
    s, c = 0.5, 0.2
    A, B, gA, gB = _batch(6, 4, 33, 21, s, seed=3, rank_g=1)
    sc = solve_scales(A, B, gA, gB, s, c)
    for k in range(6):
        one = solve_scales(A[k], B[k], gA[k], gB[k], s, c)
        assert one.scale_B.shape == (4,) and one.kind.shape == ()
        assert int(one.kind) == int(sc.kind[k])
        torch.testing.assert_close(one.scale_B, sc.scale_B[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.scale_A, sc.scale_A[k], rtol=1e-9, atol=1e-12)


def test_per_layer_c_and_scaling_tensors():
    A, B, gA, gB = _batch(3, 2, 10, 8, 1.0, seed=4)
    c = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    sc = solve_scales(A, B, gA, gB, s, c)
    for k in range(3):
        one = solve_scales(A[k], B[k], gA[k], gB[k], float(s[k]), float(c[k]))
        torch.testing.assert_close(one.scale_B, sc.scale_B[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(one.scale_A, sc.scale_A[k], rtol=1e-12, atol=0)


def test_non_finite_layers_get_identity_and_leave_others_alone():
    s, c = 0.5, 0.2
    A, B, gA, gB = _batch(4, 3, 15, 12, s, seed=8)
    ref = solve_scales(A, B, gA, gB, s, c)
    gA, B, gB = gA.clone(), B.clone(), gB.clone()
    gA[1, 0, 3] = float("nan")
    B[2, 5, 1] = float("inf")
    gB[3] = float("-inf")
    sc = solve_scales(A, B, gA, gB, s, c)
    assert sc.kind.tolist()[1:] == [IDENTITY] * 3
    assert (sc.scale_B[1:] == 1).all() and (sc.scale_A[1:] == 1).all()
    assert int(sc.kind[0]) == int(ref.kind[0])
    torch.testing.assert_close(sc.scale_B[0], ref.scale_B[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(sc.scale_A[0], ref.scale_A[0], rtol=1e-12, atol=0)


def test_nothing_to_solve_is_identity():
    A, B, gA, gB = _batch(2, 3, 10, 7, 1.0, seed=9)
    sc = solve_scales(A, B, torch.zeros_like(gA), torch.zeros_like(gB), 1.0, 1.0)
    assert sc.kind.tolist() == [IDENTITY, IDENTITY]
    assert (sc.scale_B == 1).all() and (sc.scale_A == 1).all()
    # zero-initialised B: α stays 1, β is solved
    A, B, gA, gB = _batch(2, 3, 10, 7, 1.0, seed=9, zero_b=True)
    sc = solve_scales(A, B, gA, gB, 1.0, 1.0)
    assert (sc.kind != IDENTITY).all() and (sc.scale_B == 1).all() and (sc.scale_A != 1).all()


def test_scales_grow_as_inverse_sqrt_c():
    s = 0.8
    A, B, gA, gB = _batch(3, 4, 20, 30, s, seed=12, zero_b=False)
    B[0, :, 1] = 0  # one degenerate column (grad_A = s Bᵀ G then has a zero row): stays exactly 1 for every c
    gA[0, 1] = 0
    H, lam = scaling_system(A, B, gA, gB)
    ref = solve_scales(A, B, gA, gB, s, 1.0)
    for c in (1e-2, 1e-6, 1e-10):
        sc = solve_scales(A, B, gA, gB, s, c)
        assert torch.equal(sc.kind, ref.kind)
        deg = degenerate_mask(H, lam)
        expect = torch.cat([ref.scale_B, ref.scale_A], -1) / math.sqrt(c)
        got = torch.cat([sc.scale_B, sc.scale_A], -1)
        torch.testing.assert_close(got[~deg], expect[~deg], rtol=1e-12, atol=0)
        assert (got[deg] == 1).all()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(low):
    s, c = 0.5, 0.3
    A, B, gA, gB = (t.to(low) for t in _batch(4, 8, 64, 48, s, seed=13))
    sc = solve_scales(A, B, gA, gB, s, c)
    assert sc.scale_B.dtype == torch.float32 and sc.scale_A.dtype == torch.float32
    assert torch.isfinite(sc.scale_B).all() and torch.isfinite(sc.scale_A).all()
    assert (sc.kind != IDENTITY).all()
    up = solve_scales(*(t.float() for t in (A, B, gA, gB)), s, c)  # upcasting is exact: identical results
    assert torch.equal(sc.kind, up.kind)
    torch.testing.assert_close(sc.scale_B, up.scale_B, rtol=0, atol=0)
    # float32 agrees with float64 on the same inputs
    ref = solve_scales(*(t.double() for t in (A, B, gA, gB)), s, c)
    assert torch.equal(sc.kind, ref.kind)
    torch.testing.assert_close(sc.scale_B.double(), ref.scale_B, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(sc.scale_A.double(), ref.scale_A, rtol=1e-3, atol=1e-5)


def test_float32_on_singular_systems_is_finite_and_near_optimal():
    s, c = 0.5, 1.0
    A, B, gA, gB = _batch(5, 8, 40, 3, s, seed=21, rank_g=1, dup=True)  # out < r, rank-1 G, duplicated terms
    sc = solve_scales(A.float(), B.float(), gA.float(), gB.float(), s, c)
    assert torch.isfinite(sc.scale_B).all() and torch.isfinite(sc.scale_A).all()
    H, lam = scaling_system(A, B, gA, gB)
    free = ~degenerate_mask(H, lam)
    ref = solve_scales(A, B, gA, gB, s, c)
    v32 = torch.where(free, v_from_scales(sc.scale_B.double(), sc.scale_A.double(), s, c), 0.0)
    v64 = torch.where(free, v_from_scales(ref.scale_B, ref.scale_A, s, c), 0.0)
    f32, f64 = objective(H, lam, v32), objective(H, lam, v64)
    # f ≤ 0 (−f/s² is the reduction of the Frobenius objective): float32 is within 1e-3 of float64, or better
    assert (f32 <= f64 + 1e-3 * f64.abs()).all()


def test_never_forms_out_by_in():
    """in = out = 200 000: an out × in float32 matrix would need 160 GB."""
    gen = torch.Generator().manual_seed(0)
    d, r = 200_000, 2
    A, gA = torch.randn(1, r, d, generator=gen), torch.randn(1, r, d, generator=gen)
    B, gB = torch.randn(1, d, r, generator=gen), torch.randn(1, d, r, generator=gen)
    sc = solve_scales(A, B, gA, gB, 1.0, 1.0)
    assert isinstance(sc, Scales) and torch.isfinite(sc.scale_B).all()


def test_solve_system_identity_for_degenerate_everything():
    H = torch.zeros(2, 4, 4, dtype=F64)
    lam = torch.zeros(2, 4, dtype=F64)
    sc = solve_system(H, lam, 1.0, 1.0)
    assert sc.kind.tolist() == [IDENTITY, IDENTITY] and (sc.scale_B == 1).all()


def test_argument_checks():
    A, B, gA, gB = _batch(1, 2, 5, 4, 1.0, seed=1)
    with pytest.raises(ValueError, match="mode"):
        solve_scales(A, B, gA, gB, 1.0, 1.0, mode="rows")
    with pytest.raises(ValueError, match="c must be positive"):
        solve_scales(A, B, gA, gB, 1.0, 0.0)
    with pytest.raises(ValueError, match="scaling must be positive"):
        solve_scales(A, B, gA, gB, -1.0, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        solve_scales(A, B.mT, gA, gB.mT, 1.0, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        solve_scales(A, B, gA, gB, 1.0, 1.0, dtype=torch.bfloat16)


def _small_ill_scaled_batch(n, r, n_in, n_out, s, seed, spread):
    """n small layers whose columns of B and rows of A have log-normally spread norms (as in a trained adapter)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for k in range(n):
        A, B, _, _, G = _layer(r, n_in, n_out, s, rank_g=1 if k % 3 == 0 else None, gen=gen)
        A = A * torch.exp(spread * torch.randn(r, 1, dtype=F64, generator=gen))
        B = B * torch.exp(spread * torch.randn(r, dtype=F64, generator=gen))
        gA, gB = s * B.T @ G, s * G @ A.T
        layers.append((A, B, gA, gB, G))
    return layers


@pytest.mark.parametrize("r,n_in,n_out", [(2, 5, 4), (3, 6, 7), (4, 3, 8)])
def test_many_small_layers_column_and_scalar_against_nnls(r, n_in, n_out):
    """Batched solves on many small ill-scaled layers: column and scalar modes both equal explicit NNLS optima."""
    s, c, n = 0.9, 2.0, 60
    layers = _small_ill_scaled_batch(n, r, n_in, n_out, s, seed=r, spread=1.5)
    A, B, gA, gB = (torch.stack([lay[k] for lay in layers]) for k in range(4))
    col = solve_scales(A, B, gA, gB, s, c)
    sca = solve_scales(A, B, gA, gB, s, c, mode="scalar")
    H, lam = scaling_system(A, B, gA, gB)
    deg = degenerate_mask(H, lam)
    for k in range(n):
        G = layers[k][4]
        K = _terms(layers[k][0], layers[k][1], G)
        free = ~deg[k]
        Ks = torch.stack([K[:r][free[:r]].sum(0), K[r:][free[r:]].sum(0)])
        best, _ = _nnls_reduction(K, G)
        best_s, _ = _nnls_reduction(Ks, G)
        scale = max(best, 1e-300)
        assert int(sca.kind[k]) == SCALAR
        v = torch.where(free, v_from_scales(sca.scale_B[k], sca.scale_A[k], s, c), 0.0)
        assert _reduction(K, G, v) == pytest.approx(best_s, rel=1e-7, abs=1e-10 * scale)
        v = torch.where(free, v_from_scales(col.scale_B[k], col.scale_A[k], s, c), 0.0)
        target = best if int(col.kind[k]) == COLUMN else best_s
        assert int(col.kind[k]) in (COLUMN, SCALAR)
        assert _reduction(K, G, v) == pytest.approx(target, rel=1e-7, abs=1e-10 * scale)


@pytest.mark.parametrize("r", [1, 2, 3])
def test_general_psd_systems_against_nnls(r):
    """solve_system on H = XᵀX, λ = Xᵀy (any consistent PSD system, λ > 0): min_v≥0 vᵀHv − 2λᵀv is the explicit
    NNLS min ‖Xv − y‖² − ‖y‖². Correlated columns make negative unconstrained solutions common, so both the column
    fallback and the boundary branch of the 2-variable closed form are exercised (and counted)."""
    gen = torch.Generator().manual_seed(40 + r)
    n, m, dim = 150, 2 * r, 6
    y = torch.randn(n, dim, dtype=F64, generator=gen)
    coef = torch.rand(n, 1, m, dtype=F64, generator=gen) + 1.0
    X = y.unsqueeze(-1) * coef + 0.5 * torch.randn(n, dim, m, dtype=F64, generator=gen)
    X = X * torch.exp(torch.randn(n, 1, m, dtype=F64, generator=gen))  # spread column scales
    lam = (X.mT @ y.unsqueeze(-1)).squeeze(-1)
    keep = (lam > 0.05 * lam.abs().amax(-1, keepdim=True)).all(-1)
    X, y, lam = X[keep], y[keep], lam[keep]
    H = X.mT @ X
    s, c = 1.3, 0.5
    col = solve_system(H, lam, s, c)
    sca = solve_system(H, lam, s, c, mode="scalar")
    assert not degenerate_mask(H, lam).any()
    counts = {"column": 0, "fallback": 0, "boundary": 0}
    for k in range(X.shape[0]):
        Xk, yk = X[k].numpy(), y[k].numpy()
        w, _ = nnls(Xk, yk)
        f_col = float(objective(H[k], lam[k], torch.from_numpy(w)))
        Xs = torch.stack([X[k][:, :r].sum(-1), X[k][:, r:].sum(-1)], -1).numpy()
        ws, _ = nnls(Xs, yk)
        f_sca = float(objective(H[k], lam[k], torch.from_numpy(ws).repeat_interleave(r)))
        counts["boundary"] += int((ws == 0).any())
        tol = 1e-9 * abs(f_col) + 1e-12
        v = v_from_scales(sca.scale_B[k], sca.scale_A[k], s, c)
        assert int(sca.kind[k]) == SCALAR
        assert float(objective(H[k], lam[k], v)) == pytest.approx(f_sca, rel=1e-9, abs=1e-12)
        v = v_from_scales(col.scale_B[k], col.scale_A[k], s, c)
        f = float(objective(H[k], lam[k], v))
        if int(col.kind[k]) == COLUMN:
            counts["column"] += 1
            assert f == pytest.approx(f_col, rel=1e-9, abs=1e-12)
        else:
            counts["fallback"] += 1
            assert int(col.kind[k]) == SCALAR
            assert f == pytest.approx(f_sca, rel=1e-9, abs=1e-12)
            assert f >= f_col - tol
            assert (w == 0).any()  # H is non-singular here: the fallback is needed only when NNLS is on the boundary
    assert counts["boundary"] >= 3 and counts["fallback"] >= 3 and counts["column"] >= 3, counts


def test_ill_conditioned_system_is_solved_to_the_optimum():
    """Normalised eigenvalues far below the Cholesky ridge: ridge + refinement still reach the optimum (COLUMN)."""
    gen = torch.Generator().manual_seed(3)
    m, dim = 8, 30
    X = torch.rand(dim, m, dtype=F64, generator=gen)  # non-negative: H ≥ 0 entrywise, so λ = H x > 0 for x > 0
    X[:, -1] = X[:, :-1].mean(-1) + 1e-7 * torch.rand(dim, dtype=F64, generator=gen)  # nearly dependent column
    H = X.T @ X
    x = torch.rand(m, dtype=F64, generator=gen) + 0.5
    lam = H @ x
    Hn = H / H.diagonal().sqrt().outer(H.diagonal().sqrt())
    assert torch.linalg.eigvalsh(Hn).min() < 1e-11  # below the ridge 1e-2·sqrt(ε) ≈ 1.5e-10
    sc = solve_system(H, lam, 1.0, 1.0, eps=0.0)
    assert int(sc.kind) == COLUMN
    v = v_from_scales(sc.scale_B, sc.scale_A, 1.0, 1.0)
    assert float(objective(H, lam, v)) == pytest.approx(float(objective(H, lam, x)), rel=1e-12)


def test_inconsistent_layer_takes_pseudo_inverse_path_alone(monkeypatch):
    """λ outside range(H) (impossible for true gradients): the residual check sends that layer, and only it, to the
    eigendecomposition path; it stays unsolved there, so it falls back to the (consistent) scalar problem."""
    gen = torch.Generator().manual_seed(4)
    r, dim, n = 2, 6, 3
    X = torch.rand(n, dim, 2 * r, dtype=F64, generator=gen) + 0.1
    X[1, :, 3] = X[1, :, 2]  # layer 1: two identical β columns, H singular
    y = torch.rand(n, dim, dtype=F64, generator=gen)
    H = X.mT @ X
    lam = (X.mT @ y.unsqueeze(-1)).squeeze(-1)
    d = 0.1 * lam[1, 2]
    lam[1, 2] += d  # λ += d (e_2 − e_3): outside range(H), invisible to the scalar problem (Eᵀλ is unchanged)
    lam[1, 3] -= d
    calls = []
    eigh = torch.linalg.eigh

    def counting_eigh(A, *args, **kwargs):
        calls.append(A.shape[0])
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    sc = solve_system(H, lam, 1.0, 1.0)
    assert calls == [1], "exactly one layer should have gone to the pseudo-inverse"
    assert int(sc.kind[1]) == SCALAR
    for k in (0, 2):
        one = solve_system(H[k], lam[k], 1.0, 1.0)
        assert int(one.kind) == int(sc.kind[k])
        torch.testing.assert_close(one.scale_B, sc.scale_B[k], rtol=1e-12, atol=0)
    # the scalar answer of layer 1 is the 2-variable NNLS optimum (Eᵀλ = X_sᵀ y, so scipy can solve it explicitly)
    Xs = torch.stack([X[1][:, :r].sum(-1), X[1][:, r:].sum(-1)], -1)
    ws, _ = nnls(Xs.numpy(), y[1].numpy())
    f_best = float(objective(H[1], lam[1], torch.from_numpy(ws).repeat_interleave(r)))
    v = v_from_scales(sc.scale_B[1], sc.scale_A[1], 1.0, 1.0)
    assert float(objective(H[1], lam[1], v)) == pytest.approx(f_best, rel=1e-10)


def test_failed_factorisation_with_a_zero_pivot_does_not_raise(monkeypatch):
    """Where Cholesky fails, LAPACK may leave an exact zero on L's diagonal (seen on a rank-2 system of a layer whose
    factor columns had collapsed), on which `cholesky_inverse` raises. That layer must go to the pseudo-inverse path,
    and the answer of every layer must equal the one a successful factorisation gives."""
    gen = torch.Generator().manual_seed(7)
    r, dim, n = 2, 9, 3
    X = torch.rand(n, dim, 2 * r, dtype=torch.float32, generator=gen) + 0.1
    H = X.mT @ X
    lam = (X.mT @ torch.rand(n, dim, 1, dtype=torch.float32, generator=gen)).squeeze(-1)
    expected = solve_system(H, lam, 1.0, 1.0)
    cholesky_ex = torch.linalg.cholesky_ex

    def failing_on_layer_1(A, *args, **kwargs):
        L, info = cholesky_ex(A, *args, **kwargs)
        L, info = L.clone(), info.clone()
        L[1, -1, -1] = 0.0  # what LAPACK leaves when the last pivot comes out exactly 0
        info[1] = L.shape[-1]
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_on_layer_1)
    got = solve_system(H, lam, 1.0, 1.0)
    assert got.kind.tolist() == expected.kind.tolist()
    torch.testing.assert_close(got.scale_B, expected.scale_B, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.scale_A, expected.scale_A, rtol=1e-4, atol=1e-6)


def _singular_systems(dtype: torch.dtype, seed: int = 5) -> tuple[Tensor, Tensor]:
    """Consistent systems H v = λ (λ = H x) whose H = XᵀX has rank 2, 3, …: duplicated and dependent columns."""
    gen = torch.Generator().manual_seed(seed)
    m, dim, n = 8, 30, 5
    basis = torch.rand(n, dim, m, dtype=F64, generator=gen)
    mix = torch.rand(n, m, m, dtype=F64, generator=gen)
    for k in range(n):
        mix[k, :, k + 2:] = 0.0  # layer k's X spans k + 2 directions
    X = basis @ mix.mT
    H = X.mT @ X
    lam = (H @ (torch.rand(n, m, 1, dtype=F64, generator=gen) + 0.5)).squeeze(-1)
    return H.to(dtype), lam.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_regularised_solve_is_the_minimum_norm_solution(dtype):
    """The accelerator's fallback (iterated Tikhonov) reaches what the host's eigendecomposition pseudo-inverse
    gives, on singular consistent systems and on non-singular ones."""
    H, lam = _singular_systems(dtype)
    Hs = H / H.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-1) / H.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2)
    ls = lam / H.diagonal(dim1=-2, dim2=-1).sqrt()
    exact = solver_module._pseudo_inverse_solve(Hs, ls).double()
    got = solver_module._regularised_solve(Hs, ls).double()
    # the two cutoffs differ (soft at sqrt(ε), hard at 2r·10·ε), so the vectors agree to about sqrt(ε)·k
    tol = 1e-2 if dtype == torch.float32 else 1e-6
    assert ((got - exact).norm(dim=-1) <= tol * exact.norm(dim=-1)).all()
    Hd, ld = Hs.double(), ls.double()
    residual = (Hd @ got.unsqueeze(-1)).squeeze(-1) - ld
    assert (residual.norm(dim=-1) <= torch.finfo(dtype).eps ** 0.5 * ld.norm(dim=-1)).all()
    f_got, f_exact = objective(Hd, ld, got), objective(Hd, ld, exact)
    assert (f_got <= f_exact + 10 * torch.finfo(dtype).eps * f_exact.abs()).all()
    eye = torch.eye(8, dtype=dtype)
    well = Hs + eye
    torch.testing.assert_close(solver_module._regularised_solve(well, ls).double(),
                               torch.linalg.solve(well.double(), ls.double().unsqueeze(-1)).squeeze(-1),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_accelerator_path_waits_for_nothing_and_matches_the_host(monkeypatch, dtype):
    """On an accelerator the solver must not call what checks error codes on the host (a device sync):
    ``torch.cholesky_inverse`` and ``torch.linalg.eigh``. Run the accelerator path on CPU with both made to fail,
    on singular, ill-conditioned and ordinary systems: the same kinds, and objectives as good as the host path's."""
    H, lam = _singular_systems(dtype)
    gen = torch.Generator().manual_seed(9)
    X = torch.rand(3, 40, 8, dtype=F64, generator=gen)
    X[0, :, -1] = X[0, :, :-1].mean(-1) + 1e-7 * torch.rand(40, dtype=F64, generator=gen)  # ill-conditioned
    H2 = X.mT @ X
    lam2 = (H2 @ (torch.rand(3, 8, 1, dtype=F64, generator=gen) + 0.5)).squeeze(-1)
    H, lam = torch.cat([H, H2.to(dtype)]), torch.cat([lam, lam2.to(dtype)])
    host = solve_system(H, lam, 1.0, 1.0)

    def waits(*args, **kwargs):
        raise AssertionError("a call that waits for the device ran on the accelerator path")

    monkeypatch.setattr(solver_module, "_on_host", lambda t: False)
    monkeypatch.setattr(torch, "cholesky_inverse", waits)
    monkeypatch.setattr(torch.linalg, "eigh", waits)
    device = solve_system(H, lam, 1.0, 1.0)
    assert device.kind.tolist() == host.kind.tolist()
    f_host = objective(H.double(), lam.double(), v_from_scales(host.scale_B, host.scale_A, 1.0, 1.0).double())
    f_device = objective(H.double(), lam.double(), v_from_scales(device.scale_B, device.scale_A, 1.0, 1.0).double())
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert (f_device <= f_host + tol * f_host.abs()).all(), (f_device, f_host)


def test_unbounded_inconsistent_system_is_identity():
    """λ outside the range of H (impossible for true gradients) with 1ᵀH1 = 0 in a block: no finite minimiser."""
    H = torch.tensor(
        [[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.5, 1.0]], dtype=F64
    )
    lam = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    sc = solve_system(H, lam, 1.0, 1.0)
    assert int(sc.kind) == IDENTITY
    assert (sc.scale_B == 1).all() and (sc.scale_A == 1).all()
