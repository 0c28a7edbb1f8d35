"""The optimiser-aware ScaLoRA rule against brute force: explicit out × in matrices, real optimiser steps, NNLS.

With directions U (the optimiser moves B by −η U_B and A by −η U_A) the first-order change of W after rescaling is
−η s Σ_k u_k K_k, K_i = b_i u_A,iᵀ (i < r) and K_r+j = u_B,j a_jᵀ, u = [α; β]; the fit to −G/L is an explicit
non-negative least-squares problem in u that scipy solves without ever seeing H or λ.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import nnls
from torch import nn

from scalora import LoraConfig, apply_lora
from scalora.directions import next_directions, scale_invariant
from scalora.errors import ConfigError
from scalora.optim import ScaLoRA
from scalora.scaling_problem import first_order_c, lora_step_c, optimizer_system, scaling_system
from scalora.solver import COLUMN, IDENTITY, solve_system

F64 = torch.float64


def _layer(r: int, n_in: int, n_out: int, s: float, seed: int):
    """(A, B, grad_A, grad_B, U_A, U_B, G) in float64; gradients by autograd of ℓ = ⟨G, s·B·A⟩."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, n_in, dtype=F64, generator=gen) / math.sqrt(n_in)).requires_grad_(True)
    B = torch.randn(n_out, r, dtype=F64, generator=gen).requires_grad_(True)
    G = torch.randn(n_out, n_in, dtype=F64, generator=gen)
    grad_A, grad_B = torch.autograd.grad((G * (s * B @ A)).sum(), (A, B))
    U_A = torch.sign(grad_A) * (0.5 + torch.rand(r, n_in, dtype=F64, generator=gen))  # Adam-like directions
    U_B = torch.sign(grad_B) * (0.5 + torch.rand(n_out, r, dtype=F64, generator=gen))
    return A.detach(), B.detach(), grad_A, grad_B, U_A, U_B, G


def _terms(A, B, U_A, U_B) -> torch.Tensor:
    """K (2r, out, in): b_i u_A,iᵀ, then u_B,j a_jᵀ (explicit out × in matrices)."""
    r = A.shape[0]
    return torch.stack([torch.outer(B[:, i], U_A[i]) for i in range(r)]
                       + [torch.outer(U_B[:, j], A[j]) for j in range(r)])


@pytest.mark.parametrize("r,n_in,n_out", [(1, 5, 3), (3, 7, 11), (4, 20, 9)])
def test_system_equals_explicit_gram(r, n_in, n_out):
    s = 0.7
    A, B, gA, gB, UA, UB, G = _layer(r, n_in, n_out, s, seed=r + n_in)
    H, lam, second, norms = optimizer_system(A, B, gA, gB, UA, UB)
    flat = _terms(A, B, UA, UB).reshape(2 * r, -1)
    torch.testing.assert_close(H, flat @ flat.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lam, s * flat @ G.reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, (UB @ UA).square().sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norms, torch.cat([B.square().sum(0), A.square().sum(1)]), rtol=1e-10, atol=1e-12)


def test_gradients_as_directions_give_the_paper_system():
    A, B, gA, gB, _, _, _ = _layer(3, 8, 6, 0.5, seed=1)
    H, lam, _, _ = optimizer_system(A, B, gA, gB, gA, gB)
    H_p, lam_p = scaling_system(A, B, gA, gB)
    torch.testing.assert_close((H, lam), (H_p, lam_p), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_solution_is_the_nnls_optimum_of_the_fit(seed):
    """u = v / (c s²) minimises ‖G/L − η s Σ u_k K_k‖² over u ≥ 0 (c = L η), checked against scipy's NNLS."""
    r, n_in, n_out, s, c = 1 + seed % 4, 9 + seed, 14 - seed, 0.8, 0.37
    A, B, gA, gB, UA, UB, G = _layer(r, n_in, n_out, s, seed=100 + seed)
    H, lam, second, norms = optimizer_system(A, B, gA, gB, UA, UB)
    scales = solve_system(H, lam, s, c, power=1)
    u = torch.cat([scales.scale_B, scales.scale_A])
    eta = 1e-2
    L = c / eta
    K = _terms(A, B, UA, UB)
    mat = (eta * s * K).reshape(2 * r, -1).T.numpy()
    u_best, _ = nnls(mat, (G / L).reshape(-1).numpy(), maxiter=100 * r)

    def fit(x) -> float:
        return float(((G / L - eta * s * torch.einsum("k,kij->ij", torch.as_tensor(x), K)) ** 2).sum())

    if int(scales.kind) == COLUMN:  # the unconstrained solution is positive: it is the NNLS optimum
        assert fit(u) <= fit(u_best) + 1e-9 * fit(torch.zeros(2 * r, dtype=F64))
        torch.testing.assert_close(u, torch.as_tensor(u_best), rtol=1e-6, atol=1e-9)
    else:  # the scalar fallback still improves on handing everything to W0 (u = 0)
        assert fit(u) < fit(torch.zeros(2 * r, dtype=F64))


def test_first_order_c_holds_the_second_order_ratio_at_tau():
    """With c = first_order_c, ‖s η² U_B U_A‖ / ‖first-order change‖ = τ, both computed as explicit matrices."""
    r, n_in, n_out, s, eta, tau = 3, 12, 10, 1.5, 3e-3, 0.3
    A, B, gA, gB, UA, UB, _ = _layer(r, n_in, n_out, s, seed=7)
    H, lam, second, norms = optimizer_system(A, B, gA, gB, UA, UB)
    scales = solve_system(H, lam, s, "first-order", power=1, second=second, lr=eta, tau=tau)
    assert int(scales.kind) != IDENTITY
    first = eta * s * (UB @ torch.diag(scales.scale_A) @ A + B @ torch.diag(scales.scale_B) @ UA)
    second_order = s * eta**2 * UB @ UA
    assert float(second_order.norm() / first.norm()) == pytest.approx(tau, rel=1e-9)
    v = torch.cat([scales.scale_B, scales.scale_A])
    assert torch.isfinite(v * first_order_c(H, v, second, s, eta, tau) * s**2).all()


@pytest.mark.parametrize("seed", range(3))
def test_lora_step_c_matches_loras_step_from_factors_of_norm_rho(seed):
    """With c = lora_step_c, the fitted first-order change has the norm of LoRA's step −η s (U_B Â + B̂ U_A) whose
    columns of B̂ and rows of Â are those of B and A rescaled to norm ρ; both as explicit matrices, any η."""
    r, n_in, n_out, s, rho = 2 + seed, 11, 9 + seed, 1.5, 0.4
    A, B, gA, gB, UA, UB, _ = _layer(r, n_in, n_out, s, seed=20 + seed)
    H, lam, second, norms = optimizer_system(A, B, gA, gB, UA, UB)
    scales = solve_system(H, lam, s, "lora-step", power=1, norms=norms, factor_norm=rho)
    assert int(scales.kind) != IDENTITY
    B_hat, A_hat = B * (rho / B.norm(dim=0)), A * (rho / A.norm(dim=1, keepdim=True))
    for eta in (1e-4, 1e-2):
        fitted = eta * s * (UB @ torch.diag(scales.scale_A) @ A + B @ torch.diag(scales.scale_B) @ UA)
        lora = eta * s * (UB @ A_hat + B_hat @ UA)
        assert float(fitted.norm() / lora.norm()) == pytest.approx(1.0, rel=1e-9)
    v = torch.cat([scales.scale_B, scales.scale_A])
    assert float(lora_step_c(H, v, norms, s, rho)) > 0


def test_lora_step_c_ignores_a_zero_factor():
    """At B = 0 (the first step) only the U_B A terms move W: c matches LoRA's step from A alone."""
    A, B, gA, gB, UA, UB, _ = _layer(2, 6, 5, 1.0, seed=4)
    zero = torch.zeros_like(B)
    H, lam, _, norms = optimizer_system(A, zero, gA, gB, UA, UB)
    v = torch.ones(4, dtype=F64)
    c = lora_step_c(H, v, norms, 1.0, 0.5)
    A_hat = A * (0.5 / A.norm(dim=1, keepdim=True))
    expected = float((UB @ A).norm() / (UB @ A_hat).norm())
    assert float(c) == pytest.approx(expected, rel=1e-9)


def test_first_order_c_is_identity_when_the_bound_says_nothing():
    """At B = 0 (the first step) U_A = 0, so the second-order term vanishes: the layer keeps its factors."""
    A, B, gA, gB, UA, UB, _ = _layer(2, 6, 5, 1.0, seed=3)
    H, lam, second, _ = optimizer_system(A, torch.zeros_like(B), torch.zeros_like(gA), gB, torch.zeros_like(UA), UB)
    scales = solve_system(H, lam, 1.0, "first-order", power=1, second=second, lr=1e-3)
    assert int(scales.kind) == IDENTITY and torch.equal(scales.scale_B, torch.ones(2, dtype=F64))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-30, weight_decay=0.0),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-30, amsgrad=True, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
], ids=["adamw", "adam-amsgrad-l2", "sgd-nesterov"])
def test_next_direction_is_the_step_the_optimiser_takes(make):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 4, dtype=F64))
    opt = make([p])
    for i in range(3):
        p.grad = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(i))
        before = p.detach().clone()
        U = next_directions(opt, opt.param_groups[0], [p])[0]
        opt.step()
        torch.testing.assert_close(p.detach() - before, -1e-2 * U, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-30, weight_decay=0.0),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-30, amsgrad=True, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1),
], ids=["adamw", "adam-amsgrad-l2", "sgd-momentum-l2"])
def test_next_directions_of_parameters_at_different_steps(make):
    """Stacked over parameters whose optimiser states differ (one had no gradient at the first two steps, so its
    moments and step count lag), each direction is still the step the optimiser takes for that parameter."""
    ps = [nn.Parameter(torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(k))) for k in range(3)]
    opt = make(ps)
    for i in range(4):
        for k, p in enumerate(ps):
            lagging = k == 1 and i < 2
            p.grad = None if lagging else torch.randn(5, 4, dtype=F64,
                                                      generator=torch.Generator().manual_seed(10 * i + k))
        if i < 3:
            opt.step()
    before = [p.detach().clone() for p in ps]
    U = next_directions(opt, opt.param_groups[0], ps)
    assert U.shape == (3, 5, 4)
    opt.step()
    for p, b, u in zip(ps, before, U, strict=True):
        torch.testing.assert_close(p.detach() - b, -1e-2 * u, rtol=1e-10, atol=1e-14)


def test_adam_step_after_rescaling_is_linear_in_the_scales():
    """An exact AdamW step from the rescaled factors (moments transferred) changes W by
    −η s (U_B diag(β) A + B diag(α) U_A) + s η² U_B U_A, with U read before the rescaling."""
    torch.manual_seed(1)
    model = apply_lora(nn.Sequential(nn.Linear(9, 7, dtype=F64)),
                       LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    eta = 1e-2
    inner = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=eta, eps=1e-30, weight_decay=0.0)
    opt = ScaLoRA(model, inner, interval=1000)
    for step in range(4):
        x = torch.randn(16, 9, dtype=F64, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        if step < 3:
            opt.step()
            opt.zero_grad()
    U_A = next_directions(inner, inner.param_groups[0], [layer.lora_A])[0]
    U_B = next_directions(inner, inner.param_groups[0], [layer.lora_B])[0]
    A, B, s = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling
    opt.interval = 1
    w_before = layer.base_layer.weight.detach().clone() + s * B @ A
    base_before = layer.base_layer.weight.detach().clone()
    opt.rescale()
    scale_B = layer.lora_B.detach()[0] / B[0]
    scale_A = layer.lora_A.detach()[:, 0] / A[:, 0]
    inner.step()
    w_after = layer.base_layer.weight.detach() + s * layer.lora_B.detach() @ layer.lora_A.detach()
    predicted = -eta * s * (U_B @ torch.diag(scale_A) @ A + B @ torch.diag(scale_B) @ U_A) + s * eta**2 * U_B @ U_A
    torch.testing.assert_close(w_after - w_before, predicted, rtol=1e-8, atol=1e-12)
    assert not torch.equal(layer.base_layer.weight.detach(), base_before)  # something was handed to W0


def test_rules_and_arguments():
    model = apply_lora(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert ScaLoRA(model, torch.optim.AdamW(params)).c == "lora-step"
    assert ScaLoRA(model, torch.optim.AdamW(params), c="auto").c == "lora-step"
    assert ScaLoRA(model, torch.optim.AdamW(params), c="first-order").c == "first-order"
    assert ScaLoRA(model, torch.optim.AdamW(params), rule="paper").c == 1.0
    assert ScaLoRA(model, torch.optim.SGD(params, lr=0.1)).c == 1.0
    assert scale_invariant(torch.optim.AdamW(params)) and not scale_invariant(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ConfigError, match="pass a number c"):
        ScaLoRA(model, torch.optim.SGD(params, lr=0.1), c="auto")
    with pytest.raises(ConfigError, match="rule='paper'"):
        ScaLoRA(model, torch.optim.Adagrad(params))
    with pytest.raises(ConfigError, match="rule must be"):
        ScaLoRA(model, torch.optim.AdamW(params), rule="fast")
    with pytest.raises(ConfigError, match="tau"):
        ScaLoRA(model, torch.optim.AdamW(params), tau=0)
    with pytest.raises(ConfigError, match="factor_norm"):
        ScaLoRA(model, torch.optim.AdamW(params), factor_norm=-1.0)
    with pytest.raises(ConfigError, match="'auto'"):
        ScaLoRA(model, torch.optim.AdamW(params), c="big")


def test_command_line_defaults_follow_the_rule():
    from scalora.train.config import TrainConfig

    assert TrainConfig(method="scalora").learning_rate == 5e-4  # 'lora-step': LoRA's learning rate serves
    # the first-order c's step grows like lr²: at LoRA's 5e-4 it barely trains
    assert TrainConfig(method="scalora", scalora_auto_c="first-order").learning_rate == 2e-3
    assert TrainConfig(method="scalora-i", scalora_rule="paper").learning_rate == 5e-4
    assert TrainConfig(method="lora").learning_rate == 5e-4
    assert TrainConfig(method="scalora", lr=1e-3).learning_rate == 1e-3


def test_runs_written_before_the_rule_existed_keep_their_fingerprint():
    """Such a run saved no scalora_rule / scalora_tau; resumed with the paper rule it must match its old identity."""
    from scalora.train.config import TrainConfig

    old = TrainConfig(method="scalora", scalora_rule="paper", scalora_c=1.0)
    identity = old.identity()
    assert "scalora_rule" not in identity and "scalora_tau" not in identity and identity["scalora_c"] == 1.0
    assert "scalora_rule" in TrainConfig(method="scalora").identity()  # the new default is part of the identity


def test_runs_of_the_first_order_default_resume_only_under_it():
    """Before 'lora-step', c='auto' meant the first-order rule: such runs keep their fingerprint under
    --scalora-auto-c first-order and differ from a default run; a saved optimiser state says c='auto' and is refused
    by a 'lora-step' ScaLoRA, accepted by a 'first-order' one."""
    from scalora.train.config import TrainConfig

    old = TrainConfig(method="scalora", scalora_auto_c="first-order").identity()
    assert "scalora_auto_c" not in old and "scalora_factor_norm" not in old
    assert TrainConfig(method="scalora").identity()["scalora_auto_c"] == "lora-step"
    model = apply_lora(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    state = ScaLoRA(model, torch.optim.AdamW(params), c="first-order").state_dict()
    state["scalora"]["c"] = "auto"  # as written then
    with pytest.raises(ConfigError, match="c='first-order'"):
        ScaLoRA(model, torch.optim.AdamW(params)).load_state_dict(state)
    ScaLoRA(model, torch.optim.AdamW(params), c="first-order").load_state_dict(state)
