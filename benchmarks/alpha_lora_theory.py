"""α-LoRA theory check: closed-form test accuracy of ``w = α·w̃ + Δ`` versus Monte Carlo.

Model (high-dimensional Gaussian binary classification, as in El Firdoussi et al., arXiv 2510.21345):

* source task: ``x = y·μ_s + z``, ``z ~ N(0, I_p)``, ``y = ±1``; the source classifier ``w̃`` is the ridge
  least-squares solution on ``N`` source samples with penalty ``γ_s``;
* target task: ``x = y·μ + z`` with ``‖μ‖ = ‖μ_s‖`` and alignment ``β = cos(μ, μ_s)``;
* fine-tuning: ``w = α·w̃ + Δ`` with ``Δ = argmin (1/n)Σ(y_i − (αw̃ + Δ)ᵀx_i)² + γ‖Δ‖²`` on ``n`` target
  samples, i.e. ``Δ = (XXᵀ/n + γI)⁻¹ X(y − α Xᵀw̃)/n``.

Given ``w`` the test accuracy is exactly ``Φ(μᵀw/‖w‖)``.  As ``n, p, N → ∞`` with ``p/n`` and ``p/N`` fixed,
``μᵀw → a0 + a1·α`` and ``‖w‖² → b0 + b1·α + b2·α²`` (random-matrix deterministic equivalents, see
``accuracy_coefficients``), so the accuracy curve and its maximiser ``α*`` have closed forms.  The script
evaluates them on a grid of alignments and sample ratios and checks them against simulation.

Run ``python benchmarks/alpha_lora_theory.py --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __name__ == "__main__":
    # The matrices here are at most a few thousand wide: BLAS threads add overhead and stall badly on a busy
    # machine (a 10x slowdown was seen at load 10 on 2 cores), so run single-threaded unless told otherwise.
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy import linalg  # noqa: E402
from scipy.stats import norm  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Closed-form theory
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One asymptotic configuration.

    p_over_n: target dimension ratio p/n.  p_over_N: source ratio p/N.  mu_t, mu_s: norms of the target
    and source class means.  beta: cosine between the two means.  gamma, gamma_s: ridge penalties (target,
    source).
    """

    p_over_n: float
    beta: float
    p_over_N: float = 0.1
    mu_t: float = 1.0
    mu_s: float = 1.0
    gamma: float = 1.0
    gamma_s: float = 1.0

    @property
    def mean_inner(self) -> float:
        """⟨μ, μ_s⟩."""
        return self.beta * self.mu_t * self.mu_s


def mp_delta(c: float, gamma: float) -> tuple[float, float]:
    """Positive root δ of ``γδ² + (1 + γ − c)δ − c = 0`` and its derivative dδ/dγ.

    δ = (1/n)·tr Q̄ for the ridge resolvent ``Q = (XXᵀ/n + γI)⁻¹`` with ``c = p/n`` (Marchenko–Pastur).
    """
    root = math.sqrt((c - gamma - 1.0) ** 2 + 4.0 * c * gamma)
    delta = (c - gamma - 1.0 + root) / (2.0 * gamma)
    return delta, -delta * (1.0 + delta) / root


def ridge_equivalents(c: float, gamma: float, m2: float) -> dict[str, float]:
    """Scalars of the deterministic equivalent ``Q̄ = q·(I − μμᵀ/λ)`` of ``Q = (XXᵀ/n + γI)⁻¹``.

    Columns of X (sign-flipped by their labels) are i.i.d. N(μ, I_p), ``m2 = ‖μ‖²``.  Returns δ,
    q = (1+δ)/(1+γ(1+δ)), λ = m2 + 1 + γ(1+δ), their γ-derivatives (d*), and ``norm2 = ‖Q X y/n‖²``, the
    squared norm of the plain ridge classifier, obtained as −∂γ of ``yᵀXᵀQXy/n² ≈ 1 − 1/(qλ)``.
    """
    delta, ddelta = mp_delta(c, gamma)
    k = 1.0 + gamma * (1.0 + delta)
    q = (1.0 + delta) / k
    dq = (ddelta - (1.0 + delta) ** 2) / k**2
    lam = m2 + 1.0 + gamma * (1.0 + delta)
    dlam = 1.0 + delta + gamma * ddelta
    norm2 = -(dq * lam + q * dlam) / (q * lam) ** 2
    return {"delta": delta, "ddelta": ddelta, "q": q, "dq": dq, "lam": lam, "dlam": dlam, "norm2": norm2}


def source_summaries(s: Setting) -> tuple[float, float]:
    """Deterministic equivalents of ``μᵀw̃`` and ``‖w̃‖²`` for the source ridge classifier."""
    src = ridge_equivalents(s.p_over_N, s.gamma_s, s.mu_s**2)
    return s.mean_inner / src["lam"], src["norm2"]


def accuracy_coefficients_given_source(
    c: float, gamma: float, m2: float, mw: float, ww: float
) -> tuple[float, float, float, float, float]:
    """(a0, a1, b0, b1, b2) for a fixed source vector w̃ with ``μᵀw̃ = mw`` and ``‖w̃‖² = ww``.

    Uses ``w = w_0 + αγQw̃`` (w_0 = QXy/n, the target-only ridge), ``μᵀQXy/n ≈ m2/λ``, ``μᵀQw̃ ≈ (1+δ)mw/λ``
    and, for the second-order terms, ``Q² = −∂Q/∂γ`` applied to ``w̃ᵀQXy/n ≈ mw/λ`` and ``w̃ᵀQ̄w̃``.
    """
    r = ridge_equivalents(c, gamma, m2)
    lam, dlam, q, dq, delta = r["lam"], r["dlam"], r["q"], r["dq"], r["delta"]
    a0 = m2 / lam
    a1 = gamma * (1.0 + delta) * mw / lam
    b0 = r["norm2"]
    b1 = 2.0 * gamma * mw * dlam / lam**2
    b2 = gamma**2 * (-dq * (ww - mw**2 / lam) - q * mw**2 * dlam / lam**2)
    return a0, a1, b0, b1, b2


def accuracy_coefficients(s: Setting) -> tuple[float, float, float, float, float]:
    """Asymptotic ``μᵀw = a0 + a1·α`` and ``‖w‖² = b0 + b1·α + b2·α²`` for the ridge source classifier."""
    mw, ww = source_summaries(s)
    return accuracy_coefficients_given_source(s.p_over_n, s.gamma, s.mu_t**2, mw, ww)


def accuracy_from_coefficients(alpha, coefs) -> np.ndarray:
    """``Φ((a0 + a1 α)/sqrt(b0 + b1 α + b2 α²))``, signed: below 0.5 when w points the wrong way."""
    a0, a1, b0, b1, b2 = coefs
    alpha = np.asarray(alpha, dtype=float)
    return norm.cdf((a0 + a1 * alpha) / np.sqrt(b0 + b1 * alpha + b2 * alpha**2))


def theory_accuracy(alpha, s: Setting) -> np.ndarray:
    """Closed-form asymptotic test accuracy of ``w = α w̃ + Δ``."""
    return accuracy_from_coefficients(alpha, accuracy_coefficients(s))


def alpha_star_from_coefficients(coefs) -> float:
    """Maximiser of ``(a0 + a1 α)/sqrt(b0 + b1 α + b2 α²)``.

    The only stationary point is ``α_c = (a1 b0 − a0 b1/2)/(a0 b2 − a1 b1/2)``; it is the maximiser when the
    ratio there beats its limits ``±a1/√b2`` at ±∞, otherwise the supremum is approached at ``sign(a1)·∞``.
    """
    a0, a1, b0, b1, b2 = coefs
    den = a0 * b2 - a1 * b1 / 2.0
    edge = math.copysign(math.inf, a1) if a1 != 0 else math.inf
    if den == 0.0:
        return edge
    alpha_c = (a1 * b0 - a0 * b1 / 2.0) / den
    ratio_c = (a0 + a1 * alpha_c) / math.sqrt(b0 + b1 * alpha_c + b2 * alpha_c**2)
    return alpha_c if ratio_c >= abs(a1) / math.sqrt(b2) else edge


def best_accuracy(coefs) -> float:
    """Accuracy at α* (its limit at ±∞ when the supremum is not attained)."""
    a_star = alpha_star_from_coefficients(coefs)
    if math.isfinite(a_star):
        return float(accuracy_from_coefficients(a_star, coefs))
    return float(norm.cdf(abs(coefs[1]) / math.sqrt(coefs[4])))


def optimal_alpha(s: Setting) -> float:
    """Closed-form α* for a setting."""
    return alpha_star_from_coefficients(accuracy_coefficients(s))


def chance_alpha(s: Setting) -> float:
    """α where ``μᵀw`` crosses 0 (accuracy 1/2); ±inf when a1 = 0."""
    a0, a1, *_ = accuracy_coefficients(s)
    return -a0 / a1 if a1 != 0 else math.inf


# ----------------------------------------------------------------------------------------------------
# Monte Carlo
# ----------------------------------------------------------------------------------------------------


def class_means(p: int, s: Setting) -> tuple[np.ndarray, np.ndarray]:
    """Target and source means: μ_s = ‖μ_s‖e1, μ = ‖μ‖(β e1 + sqrt(1 − β²) e2)."""
    mu_s = np.zeros(p)
    mu_s[0] = s.mu_s
    mu = np.zeros(p)
    mu[0] = s.mu_t * s.beta
    mu[1] = s.mu_t * math.sqrt(max(0.0, 1.0 - s.beta**2))
    return mu, mu_s


def gaussian_mixture(n: int, mean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(X of shape p×n, y of ±1 labels) with ``x_i = y_i·mean + z_i``."""
    y = rng.choice(np.array([-1.0, 1.0]), size=n)
    x = np.outer(mean, y) + rng.standard_normal((mean.size, n))
    return x, y


def ridge_classifier(x: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """``(XXᵀ/n + γI)⁻¹ X y / n``."""
    p, n = x.shape
    return linalg.solve(x @ x.T / n + gamma * np.eye(p), x @ y / n, assume_a="pos")


def fine_tune(x: np.ndarray, y: np.ndarray, w_src: np.ndarray, alphas, gamma: float) -> np.ndarray:
    """Rows ``w(α) = α w̃ + Δ(α)``, ``Δ(α) = (XXᵀ/n + γI)⁻¹ X (y − α Xᵀw̃)/n``, one per α."""
    p, n = x.shape
    factor = linalg.cho_factor(x @ x.T / n + gamma * np.eye(p))
    alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
    rhs = x @ (y[:, None] - np.outer(x.T @ w_src, alphas)) / n
    return (alphas[:, None] * w_src[None, :]) + linalg.cho_solve(factor, rhs).T


def exact_accuracy(w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Population accuracy of ``sign(wᵀx)`` on ``x = y·mean + z``: ``Φ(meanᵀw/‖w‖)`` (rows of w)."""
    w = np.atleast_2d(w)
    return norm.cdf(w @ mean / np.linalg.norm(w, axis=1))


def simulate_seed(
    s: Setting, p: int, alphas, seed: int, alpha_fine=None, w_src: np.ndarray | None = None
) -> dict[str, np.ndarray | float]:
    """One Monte Carlo draw at dimension p.

    Draws the source data (unless ``w_src`` is given) and the target data, fine-tunes at every α in ``alphas``
    and returns the exact accuracies there, plus the finite-p scalars ``μᵀw`` and ``‖w‖²`` at α = 0 and 1 and,
    because w is affine in α, the accuracy on ``alpha_fine`` and the per-draw optimum.
    """
    rng = np.random.default_rng(seed)
    mu, mu_s = class_means(p, s)
    if w_src is None:
        n_src = max(2, round(p / s.p_over_N))
        xs, ys = gaussian_mixture(n_src, mu_s, rng)
        w_src = ridge_classifier(xs, ys, s.gamma_s)
    n = max(2, round(p / s.p_over_n))
    x, y = gaussian_mixture(n, mu, rng)
    alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
    w = fine_tune(x, y, w_src, np.concatenate([[0.0, 1.0], alphas]), s.gamma)
    w0, direction = w[0], w[1] - w[0]  # w(α) = w0 + α·direction exactly
    coefs = (
        float(mu @ w0),
        float(mu @ direction),
        float(w0 @ w0),
        float(2.0 * w0 @ direction),
        float(direction @ direction),
    )
    out: dict[str, np.ndarray | float] = {
        "acc": exact_accuracy(w[2:], mu),
        "coefs": np.array(coefs),
        "alpha_star": alpha_star_from_coefficients(coefs),
        "mu_w_src": float(mu @ w_src),
        "w_src_norm2": float(w_src @ w_src),
    }
    if alpha_fine is not None:
        out["acc_fine"] = accuracy_from_coefficients(alpha_fine, coefs)
    return out


def monte_carlo(s: Setting, p: int, alphas, seeds, alpha_fine=None, sources=None) -> dict[str, object]:
    """Mean ± std over seeds of the exact accuracy at ``alphas``; α* estimates from the fine grid."""
    runs = [
        simulate_seed(s, p, alphas, seed, alpha_fine, None if sources is None else sources[i])
        for i, seed in enumerate(seeds)
    ]
    acc = np.array([r["acc"] for r in runs])
    res: dict[str, object] = {
        "alphas": [float(a) for a in np.atleast_1d(alphas)],
        "acc_mean": acc.mean(axis=0).tolist(),
        "acc_std": acc.std(axis=0, ddof=1).tolist() if len(runs) > 1 else [0.0] * acc.shape[1],
        "coefs_mean": np.mean([r["coefs"] for r in runs], axis=0).tolist(),
    }
    if alpha_fine is not None:
        fine = np.array([r["acc_fine"] for r in runs])
        per_seed = np.asarray(alpha_fine)[fine.argmax(axis=1)]
        res["alpha_star_mean_curve"] = float(np.asarray(alpha_fine)[fine.mean(axis=0).argmax()])
        res["alpha_star_per_seed_median"] = float(np.median(per_seed))
        res["alpha_star_per_seed_std"] = float(per_seed.std(ddof=1)) if len(runs) > 1 else 0.0
    return res


# ----------------------------------------------------------------------------------------------------
# Benchmark driver
# ----------------------------------------------------------------------------------------------------

SIZES = {"small": {"p": 200, "seeds": 5}, "full": {"p": 800, "seeds": 20}}
BETAS = (0.0, 0.3, 0.6, 0.9, 1.0)
RATIOS = (0.5, 2.0)
MC_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
ALPHA_RANGE = (-1.0, 4.0)
BASE = Setting(p_over_n=0.5, beta=0.0, p_over_N=0.1, mu_t=1.0, mu_s=1.0, gamma=1.0, gamma_s=1.0)
SWEEP_SOURCE_RATIOS = (0.1, 0.25, 1.0)
# The official code's Figure-1 configuration (N = 2000, n = 20, p = 500, ‖μ_s‖ = 1.5, target mean
# β μ_s + sqrt(1 − β²) μ_⊥ with ‖μ_⊥‖ = 0.5, γ = γ_s = 1), in our parametrisation.
PAPER = {"N": 2000, "n": 20, "p": 500, "mu": 1.5, "mu_orth": 0.5, "gamma": 1.0, "betas": (0.2, 0.5, 0.8)}


def paper_setting(beta_paper: float) -> Setting:
    """Translate the paper's (μ, μ_⊥, β) parametrisation into ``Setting`` (cosine and norms)."""
    mu, mo = PAPER["mu"], PAPER["mu_orth"]
    mu_t = math.sqrt((beta_paper * mu) ** 2 + (1.0 - beta_paper**2) * mo**2)
    return Setting(
        p_over_n=PAPER["p"] / PAPER["n"],
        beta=beta_paper * mu / mu_t,
        p_over_N=PAPER["p"] / PAPER["N"],
        mu_t=mu_t,
        mu_s=mu,
        gamma=PAPER["gamma"],
        gamma_s=PAPER["gamma"],
    )


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def run(
    size: str = "small",
    seeds: int | None = None,
    p: int | None = None,
    paper_seeds: int | None = None,
    log=print,
) -> dict[str, object]:
    """Compute everything; returns the JSON-ready result dictionary."""
    cfg = SIZES[size]
    p = int(p or cfg["p"])
    n_seeds = int(seeds or cfg["seeds"])
    n_paper_seeds = int(paper_seeds or 2 * n_seeds)
    seed_list = list(range(n_seeds))
    alpha_grid = np.linspace(*ALPHA_RANGE, 501)
    alpha_fine = np.linspace(*ALPHA_RANGE, 2001)
    t0 = time.perf_counter()

    # One source classifier per seed, shared by every (β, p/n): the source task does not depend on β here.
    src_rng = [np.random.default_rng(10_000 + k) for k in seed_list]
    _, mu_s = class_means(p, BASE)
    n_src = round(p / BASE.p_over_N)
    sources = [ridge_classifier(*gaussian_mixture(n_src, mu_s, rng), BASE.gamma_s) for rng in src_rng]
    mw_th, ww_th = source_summaries(replace(BASE, beta=1.0))
    source_check = {
        "theory_mu_s_w_src": mw_th,
        "mc_mu_s_w_src": float(np.mean([mu_s @ w for w in sources])),
        "theory_w_src_norm2": ww_th,
        "mc_w_src_norm2": float(np.mean([w @ w for w in sources])),
    }

    configs = []
    for ratio in RATIOS:
        for beta in BETAS:
            s = replace(BASE, p_over_n=ratio, beta=beta)
            coefs = accuracy_coefficients(s)
            a_star = alpha_star_from_coefficients(coefs)
            mc_alphas = np.array([*MC_ALPHAS, a_star]) if math.isfinite(a_star) else np.array(MC_ALPHAS)
            mc = monte_carlo(s, p, mc_alphas, [1000 * (k + 1) + 17 for k in seed_list], alpha_fine, sources)
            entry = {
                "p_over_n": ratio,
                "beta": beta,
                "n": round(p / ratio),
                "coefficients": {k: v for k, v in zip(("a0", "a1", "b0", "b1", "b2"), coefs, strict=True)},
                "alpha_star": _finite(a_star),
                "alpha_chance": _finite(chance_alpha(s)),
                "theory_acc_at_0": float(accuracy_from_coefficients(0.0, coefs)),
                "theory_acc_at_1": float(accuracy_from_coefficients(1.0, coefs)),
                "theory_acc_at_star": best_accuracy(coefs),
                "theory_curve": accuracy_from_coefficients(alpha_grid, coefs).tolist(),
                "theory_acc_at_mc_alphas": accuracy_from_coefficients(mc_alphas, coefs).tolist(),
                "mc": mc,
            }
            err = np.abs(np.array(entry["theory_acc_at_mc_alphas"]) - np.array(mc["acc_mean"]))
            entry["max_abs_theory_minus_mc"] = float(err.max())
            configs.append(entry)
            log(
                f"p/n={ratio:<4} beta={beta:<4} alpha*={a_star:6.3f} "
                f"(MC {mc['alpha_star_mean_curve']:6.3f})  "
                f"acc(1)={entry['theory_acc_at_1']:.4f}/{mc['acc_mean'][MC_ALPHAS.index(1.0)]:.4f}  "
                f"acc(a*)={entry['theory_acc_at_star']:.4f}  max|th-mc|={err.max():.4f}"
            )

    # Theory-only sweep: α* against β for several source sample ratios.
    beta_fine = np.linspace(0.0, 1.0, 101)
    sweep = {
        "beta": beta_fine.tolist(),
        "curves": [
            {
                "p_over_n": ratio,
                "p_over_N": src_ratio,
                "alpha_star": [
                    _finite(optimal_alpha(replace(BASE, p_over_n=ratio, p_over_N=src_ratio, beta=b)))
                    for b in beta_fine
                ],
            }
            for ratio in RATIOS
            for src_ratio in SWEEP_SOURCE_RATIOS
        ],
    }

    # The official code's Figure-1 setting (small n): theory α* and Monte Carlo α* at the paper's sizes.
    paper_fine = np.linspace(-5.0, 10.0, 3001)
    paper_rows = []
    for bp in PAPER["betas"]:
        s = paper_setting(bp)
        coefs = accuracy_coefficients(s)
        a_star = alpha_star_from_coefficients(coefs)
        mc = monte_carlo(
            s, PAPER["p"], [0.0, 1.0, a_star], [7 + 31 * k for k in range(n_paper_seeds)], paper_fine
        )
        paper_rows.append(
            {
                "beta_paper": bp,
                "cosine": s.beta,
                "mu_t": s.mu_t,
                "alpha_star": _finite(a_star),
                "theory_acc_at_0_1_star": accuracy_from_coefficients([0.0, 1.0, a_star], coefs).tolist(),
                "mc": mc,
            }
        )
        log(f"paper setting beta={bp}: alpha*={a_star:.3f}  MC(mean curve)={mc['alpha_star_mean_curve']:.3f}")

    elapsed = time.perf_counter() - t0
    return {
        "study": "alpha_lora_theory",
        "size": size,
        "parameters": {
            "p": p,
            "seeds": n_seeds,
            "paper_setting_seeds": n_paper_seeds,
            "betas": list(BETAS),
            "p_over_n": list(RATIOS),
            "base_setting": asdict(BASE),
            "n_source": n_src,
            "mc_alphas": list(MC_ALPHAS),
            "alpha_grid": alpha_grid.tolist(),
            "alpha_fine_range": [*ALPHA_RANGE, len(alpha_fine)],
            "accuracy": "exact population accuracy Phi(mu^T w / ||w||) of each trained w (signed)",
            "source_shared_across_configs": True,
            "paper_setting": {k: (list(v) if isinstance(v, tuple) else v) for k, v in PAPER.items()},
        },
        "source_check": source_check,
        "configs": configs,
        "alpha_star_sweep": sweep,
        "paper_setting": paper_rows,
        "runtime_s": elapsed,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
        },
    }


def plot(results: dict[str, object], path: Path) -> None:
    """Accuracy-vs-α panels per p/n (theory curves, MC error bars, α* stars) and an α*-vs-β panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array(results["parameters"]["alpha_grid"])
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(BETAS)))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for ax, ratio in zip(axes[:2], RATIOS, strict=True):
        for color, beta in zip(colors, BETAS, strict=True):
            e = next(c for c in results["configs"] if c["p_over_n"] == ratio and c["beta"] == beta)
            ax.plot(grid, e["theory_curve"], color=color, lw=1.8, label=f"β = {beta:g}")
            mc = e["mc"]
            k = len(MC_ALPHAS)
            ax.errorbar(
                mc["alphas"][:k],
                mc["acc_mean"][:k],
                yerr=mc["acc_std"][:k],
                fmt="o",
                ms=4,
                color=color,
                capsize=2,
                lw=1,
            )
            if isinstance(e["alpha_star"], float):
                ax.plot(e["alpha_star"], e["theory_acc_at_star"], marker="*", ms=15, color=color, mec="k")
        ax.axvline(1.0, color="grey", ls="--", lw=1)
        ax.set_title(f"p/n = {ratio:g} (p = {results['parameters']['p']}, p/N = {BASE.p_over_N:g})")
        ax.set_xlabel("α (scale of the frozen source classifier)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if ratio == RATIOS[0]:
            ax.legend(
                loc="lower left", fontsize=8, title="lines: theory, dots: MC ±1 sd, ★: α*", title_fontsize=8
            )
    ax = axes[2]
    sweep = results["alpha_star_sweep"]
    styles = {0.5: "-", 2.0: "--"}
    src_colors = dict(zip(SWEEP_SOURCE_RATIOS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for curve in sweep["curves"]:
        vals = np.array([v if isinstance(v, float) else np.nan for v in curve["alpha_star"]])
        ax.plot(
            sweep["beta"],
            vals,
            styles[curve["p_over_n"]],
            color=src_colors[curve["p_over_N"]],
            label=f"p/n={curve['p_over_n']:g}, p/N={curve['p_over_N']:g}",
        )
    for ratio, marker in ((0.5, "o"), (2.0, "s")):
        pts = [c for c in results["configs"] if c["p_over_n"] == ratio]
        ax.errorbar(
            [c["beta"] for c in pts],
            [c["mc"]["alpha_star_mean_curve"] for c in pts],
            yerr=[c["mc"]["alpha_star_per_seed_std"] for c in pts],
            fmt=marker,
            color="tab:blue",
            mfc="white",
            capsize=2,
            label=f"MC argmax, p/n={ratio:g}, p/N={BASE.p_over_N:g}",
        )
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("alignment β = cos(μ, μ_s)")
    ax.set_ylabel("α*")
    ax.set_title("optimal α* vs alignment (theory lines)")
    ax.set_ylim(-0.5, 6.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description="α-LoRA theory: closed-form accuracy of w = α·w̃ + Δ and its optimal α*, vs Monte Carlo."
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="small: p=200, 5 seeds; full: p=800, 20"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of Monte Carlo seeds (default: by size)"
    )
    parser.add_argument("--p", type=int, default=None, help="override the Monte Carlo dimension p")
    parser.add_argument(
        "--paper-seeds",
        type=int,
        default=None,
        help="seeds for the paper's own configuration (default 2x seeds)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where JSON/PNG go")
    args = parser.parse_args(argv)
    results = run(args.size, args.seeds, args.p, args.paper_seeds)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "alpha_lora_theory.json"
    png_path = args.out_dir / "alpha_lora_theory.png"
    results["command"] = " ".join(
        ["python", "benchmarks/alpha_lora_theory.py", *(argv if argv is not None else sys.argv[1:])]
    )
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} in {results['runtime_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
