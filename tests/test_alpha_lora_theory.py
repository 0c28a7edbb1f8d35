"""Checks of the α-LoRA closed-form theory in benchmarks/alpha_lora_theory.py against simulation."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "alpha_lora_theory.py"
_SPEC = importlib.util.spec_from_file_location("alpha_lora_theory", _PATH)
alt = importlib.util.module_from_spec(_SPEC)
sys.modules["alpha_lora_theory"] = alt
_SPEC.loader.exec_module(alt)

# Theory vs Monte Carlo: mean exact accuracy over SEEDS draws at dimension P must match within ACC_TOL.
P, SEEDS, ACC_TOL = 300, 4, 0.025


@pytest.fixture(scope="module")
def sources():
    """One source ridge classifier per seed (p = P, N = P / BASE.p_over_N), shared by the MC tests."""
    _, mu_s = alt.class_means(P, alt.BASE)
    n_src = round(P / alt.BASE.p_over_N)
    return [
        alt.ridge_classifier(
            *alt.gaussian_mixture(n_src, mu_s, np.random.default_rng(100 + k)), alt.BASE.gamma_s
        )
        for k in range(SEEDS)
    ]


@pytest.fixture(scope="module")
def aligned_mc(sources):
    """MC at p/n = 2, β = 0.9 with the accuracy curve on a fine α grid."""
    s = replace(alt.BASE, p_over_n=2.0, beta=0.9)
    return s, alt.monte_carlo(s, P, [1.0], list(range(SEEDS)), np.linspace(-1.0, 5.0, 1201), sources)


def test_mp_delta_solves_its_equation_and_derivative():
    for c, g in [(0.5, 1.0), (2.0, 0.3), (25.0, 1.0)]:
        d, dd = alt.mp_delta(c, g)
        assert d > 0
        assert g * d**2 + (1 + g - c) * d - c == pytest.approx(0.0, abs=1e-10)
        h = 1e-6
        fd = (alt.mp_delta(c, g + h)[0] - alt.mp_delta(c, g - h)[0]) / (2 * h)
        assert dd == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize(("ratio", "beta"), [(2.0, 0.6), (0.5, 1.0), (2.0, 0.0)])
def test_closed_form_accuracy_matches_monte_carlo(ratio, beta, sources):
    s = replace(alt.BASE, p_over_n=ratio, beta=beta)
    alphas = np.array([-1.0, 0.0, 1.0, 2.0, 3.0])
    mc = alt.monte_carlo(s, P, alphas, list(range(SEEDS)), sources=sources)
    theory = alt.theory_accuracy(alphas, s)
    np.testing.assert_allclose(mc["acc_mean"], theory, atol=ACC_TOL)


def test_deterministic_equivalents_of_mean_and_norm(aligned_mc):
    """μᵀw and ‖w‖² (numerator and squared denominator of the accuracy) within 10 % at p = 300, 4 seeds."""
    s, mc = aligned_mc
    a0, a1, b0, b1, b2 = alt.accuracy_coefficients(s)
    e0, e1, f0, f1, f2 = mc["coefs_mean"]
    for alpha in (0.0, 1.0, 3.0):
        assert e0 + e1 * alpha == pytest.approx(a0 + a1 * alpha, rel=0.10)
        assert f0 + f1 * alpha + f2 * alpha**2 == pytest.approx(b0 + b1 * alpha + b2 * alpha**2, rel=0.10)


def test_exact_accuracy_matches_a_test_set():
    rng = np.random.default_rng(0)
    p = 50
    mean = np.zeros(p)
    mean[0] = 1.0
    w = rng.standard_normal(p) * 0.2 + mean
    x, y = alt.gaussian_mixture(200_000, mean, rng)
    empirical = np.mean(np.sign(w @ x) == y)
    assert alt.exact_accuracy(w, mean)[0] == pytest.approx(empirical, abs=0.005)


@pytest.mark.parametrize(
    "setting",
    [
        replace(alt.BASE, p_over_n=r, beta=b, p_over_N=src)
        for r in (0.5, 2.0)
        for b in (0.0, 0.3, 0.9, 1.0)
        for src in (0.1, 1.0)
    ]
    + [alt.paper_setting(b) for b in alt.PAPER["betas"]],
)
def test_alpha_star_maximises_the_closed_form_curve(setting):
    a_star = alt.optimal_alpha(setting)
    assert math.isfinite(a_star)
    grid = np.linspace(a_star - 20.0, a_star + 20.0, 400_001)
    curve = alt.theory_accuracy(grid, setting)
    best = alt.theory_accuracy(a_star, setting)
    assert best >= curve.max() - 1e-12
    assert abs(grid[curve.argmax()] - a_star) < 1e-3 or curve.max() - best < 1e-12


def test_alpha_star_sign_pattern():
    # aligned source trained on 10x more samples: scale the frozen base up
    assert alt.optimal_alpha(replace(alt.BASE, p_over_n=0.5, beta=1.0)) > 1.0
    assert alt.optimal_alpha(replace(alt.BASE, p_over_n=2.0, beta=0.9)) > 1.0
    # unrelated source: drop it
    assert alt.optimal_alpha(replace(alt.BASE, p_over_n=2.0, beta=0.0)) == pytest.approx(0.0, abs=1e-12)
    # α* grows with alignment
    stars = [alt.optimal_alpha(replace(alt.BASE, p_over_n=2.0, beta=b)) for b in np.linspace(0, 1, 11)]
    assert np.all(np.diff(stars) > 0)
    # a source no better than the target (p/N = p/n): α* < 1 even for identical tasks
    assert alt.optimal_alpha(replace(alt.BASE, p_over_n=0.5, p_over_N=1.0, beta=1.0)) < 1.0


def test_monte_carlo_alpha_star_near_theory(aligned_mc):
    s, mc = aligned_mc
    assert mc["alpha_star_mean_curve"] == pytest.approx(alt.optimal_alpha(s), abs=0.5)


def test_main_small_runs_end_to_end(tmp_path):
    args = ["--size", "small", "--seeds", "2", "--p", "100", "--paper-seeds", "1", "--out-dir", str(tmp_path)]
    res = alt.main(args)
    data = json.loads((tmp_path / "alpha_lora_theory.json").read_text())
    assert (tmp_path / "alpha_lora_theory.png").stat().st_size > 10_000
    assert data["parameters"]["p"] == 100
    assert len(data["configs"]) == len(alt.BETAS) * len(alt.RATIOS)
    assert res["configs"][0]["alpha_star"] == pytest.approx(0.0, abs=1e-12)
    for cfg in data["configs"]:
        assert len(cfg["mc"]["acc_mean"]) == len(cfg["theory_acc_at_mc_alphas"])
